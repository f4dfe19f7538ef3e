"""Each model's own random stream: what its passes draw (dropout's masks, a gradient's noise)
follows its seed, whatever else the process draws between its calls.

PyTorch draws dropout's masks from the process's one generator, and a server holds several
models (sessions), so a model's masks depended on what the others, and the server itself, had
drawn before: two runs of one seed came out different, and none matched a local run. A CPU
trainer keeps its stream's state instead and puts it in the generator around each of its
forward and backward passes (`drawing`), the process's own put back after; a pass that fails
leaves the stream where it was, as a failed call leaves the rest. A draw made on another
thread while a pass runs (an embedding caller's) still takes its numbers from the model's
stream: PyTorch has no way to give dropout a generator of its own.

A stream starts where the model's build left the seeded generator (`built_state`), so that a
model without lazy layers draws the masks a local run of `torch.manual_seed(seed); model =
factory()` draws in the same passes. A checkpoint keeps the state (`checkpoint.py`), so a load
goes on with the masks a run would have drawn from it.

On a GPU the stream is a generator of the model's device, seeded as `torch.manual_seed(seed)`
seeds the device's own, and a pass points the device's generator at (a copy of) its state
(`graphsafe_set_state`) rather than copying a state in (`set_state`). Measured on an H200
(the fifty-first session): the pointer swap takes 0.3 us and synchronises nothing;
`set_state` takes 4 us, and it marks cuDNN's RNN dropout state stale, so that every pass of
an LSTM with dropout made a new one, with a device synchronisation (566 us a pass against
352) and masks no local run draws. The swap's lock is the device's: sessions on one device
launch their passes one at a time, the host's part of one (its Python, its kernel launches)
no longer beside another's; what that costs with several busy sessions was not measured.

A thread with streams in GPU generators never waits for another trainer while it holds
their lock: a pass that hands a call to another trainer's thread (a model whose forward
pass asks a teacher) sets them aside while it waits (`set_aside`), and so does one that
waits for another trainer's lock (`TrainerLock`: a read or a listing of the teacher's, while
the teacher's own pass holds it and waits for the stream). Left: a GPU model whose backward
pass (a hook, an autograd Function) calls another trainer on its device waits forever, as
CUDA's backward runs on autograd's thread for the device, which holds nothing to set aside.
Not the model's draws: cuDNN's RNN dropout (an LSTM or GRU with dropout between its layers)
draws from cuDNN's own state, one per device, shared by the sessions there; and a GPU
model's draws on the CPU come from the process's generator.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: Where a model's stream is: on the CPU, the generator's state; on a GPU, a generator of the
#: device holding it.
State = torch.Tensor | torch.Generator

#: Held while a stream is in the CPU's generator. Every CPU trainer runs on one thread
#: (torch_thread.py), so it is contended only by callers of an embedded trainer; re-entrant
#: for a model whose forward pass runs another CPU trainer's (a teacher's), whose stream is
#: swapped in and out inside its own.
_LOCK = threading.RLock()
#: Held while a stream is in a GPU's generator, by its device index. Each GPU trainer has a
#: thread of its own, so sessions on one device take turns here.
_DEVICE_LOCKS: dict[int, threading.RLock] = {}


@dataclass
class Drawn:
    """Where a block's draws left a stream (`drawing`)."""

    state: State | None


@dataclass
class _Frame:
    """A GPU stream in its device's generator, on the thread that put it there."""

    generator: torch.Generator  # the device's own
    lock: threading.RLock
    stream: torch.Generator  # the pass's copy of the stream, where the draws go
    process: torch.Generator  # what the device's generator held before: put back after


class _Here(threading.local):
    def __init__(self) -> None:
        #: the GPU streams this thread has in its devices' generators, outermost first
        self.frames: list[_Frame] = []


_HERE = _Here()


def built_state(device: torch.device, seed: int) -> State | None:
    """Where the stream of a model built for `device` from `seed` starts: called inside the
    build's seeded, forked generator once the build is done, the state it left there (on a
    GPU, the device's generator as `torch.manual_seed(seed)` leaves it); None where models
    keep no stream of their own (devices other than the CPU and CUDA's)."""
    if device.type == "cpu":
        return torch.default_generator.get_state()
    if device.type == "cuda":
        stream = torch.Generator(device=device)
        stream.manual_seed(seed)
        return stream
    return None


def for_checkpoint(state: State) -> tuple[str, torch.Tensor]:
    """The stream as a checkpoint keeps it: the type of device whose generator's state it
    is, and that state."""
    if isinstance(state, torch.Generator):
        return state.device.type, state.get_state()
    return "cpu", state


def from_checkpoint(state: torch.Tensor, device: torch.device) -> State:
    """The stream a checkpoint's `state` puts back for a model on `device`, checked first:
    ValueError when it is not a state of that device's generator (a damaged checkpoint)."""
    if device.type == "cuda":
        stream = torch.Generator(device=device)
        try:
            stream.set_state(state)  # refuses a wrong size, type or offset
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"its random state is not one of a cuda generator: {err}") from None
        return stream
    _check_cpu_state(state)
    # A copy of its own (5 KB): a view of a mapped checkpoint kept the whole file mapped for
    # as long as the server ran (found by a review, serving a 1.4 GB model).
    return state.clone()


def _check_cpu_state(state: torch.Tensor) -> None:
    """ValueError when `state` is not a state of the CPU's generator (a damaged checkpoint):
    put in place, it would fail every forward pass after, or, its normal sample kept for the
    next draw not a number, make the next normal draw NaN (found by a review: a forward
    pass adding torch.randn(1) answered NaN)."""
    try:
        for dtype in (torch.float32, torch.float64):
            generator = torch.Generator()
            generator.set_state(state)
            if not torch.randn(1, dtype=dtype, generator=generator).isfinite().all():
                raise ValueError("its random state draws a normal sample that is not finite")
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"its random state is not one of a cpu generator: {err}") from None


@contextmanager
def drawing(state: State | None) -> Iterator[Drawn]:
    """The block draws from the stream at `state` (None: from the process's generator);
    where it left the stream is in what it yields once the block ends, however it ends
    (on a GPU a new generator: `state`'s is left as it was, for a caller that undoes the
    block), and the process's generator is as it was before."""
    drawn = Drawn(state)
    if state is None:
        yield drawn
        return
    if isinstance(state, torch.Generator):
        with _on_device(state, drawn):
            yield drawn
        return
    generator = torch.default_generator
    with _LOCK:
        process = generator.get_state()
        generator.set_state(state)
        try:
            yield drawn
        finally:
            drawn.state = generator.get_state()
            generator.set_state(process)


@contextmanager
def _on_device(state: torch.Generator, drawn: Drawn) -> Iterator[None]:
    index = state.device.index
    if index is None:
        index = torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    lock = _DEVICE_LOCKS.get(index) or _DEVICE_LOCKS.setdefault(index, threading.RLock())
    stream = state.clone_state()
    frames = _HERE.frames
    with lock:
        frame = _Frame(generator, lock, stream, generator.graphsafe_get_state())
        generator.graphsafe_set_state(stream)
        frames.append(frame)
        try:
            yield
        finally:
            frames.pop()
            generator.graphsafe_set_state(frame.process)
            drawn.state = stream


def held_here() -> bool:
    """Whether this thread has streams in GPU generators (`set_aside`)."""
    return bool(_HERE.frames)


@contextmanager
def set_aside() -> Iterator[None]:
    """This thread's GPU streams out of their devices' generators, and their locks free,
    while the block runs: a pass waiting on another trainer (its model asks a teacher) would
    otherwise hold the lock the teacher's pass waits for. Each stream goes back in, where it
    was, once the block ends; inside the block the thread holds none (a `set_aside` there
    does nothing)."""
    frames = _HERE.frames
    if not frames:
        yield
        return
    _HERE.frames = []
    for frame in reversed(frames):
        frame.generator.graphsafe_set_state(frame.process)
        frame.lock.release()
    try:
        yield
    finally:
        for frame in frames:
            frame.lock.acquire()
            frame.process = frame.generator.graphsafe_get_state()
            frame.generator.graphsafe_set_state(frame.stream)
        _HERE.frames = frames


class TrainerLock:
    """A trainer's lock, re-entrant. A thread that must wait for it while it has streams in
    GPU generators sets them aside while it waits: held, they would close a cycle, a model
    asking a teacher during its pass waiting for the teacher's lock, which the teacher's own
    pass holds while it waits for the device's stream lock (found by a review)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if not blocking:
            return False
        if _HERE.frames:
            with set_aside():
                return self._lock.acquire(timeout=timeout)
        return self._lock.acquire(timeout=timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
