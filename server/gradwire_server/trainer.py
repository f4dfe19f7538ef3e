"""The training step in plain PyTorch: model, optimizer, loss, device, one lock and a state version.

No grpc here. Every method that reads or changes the state runs under the trainer's lock, so a
reader never sees half a step: on the trainer's one torch thread where it does tensor math
(on_torch_thread), on the caller's thread where it does none (under_lock) and for reads of
small tensors (INLINE_READ_ELEMENTS). Every mutation either completes and adds one to
`version`, or raises a DomainError and changes nothing.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import logging
import math
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, overload

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils.flop_counter import FlopCounterMode

from gradwire import codec
from gradwire.codec import numel
from gradwire.display import listed
from gradwire_server import (
    checkpoint,
    fills,
    host_memory,
    live,
    openmp,
    optim,
    optimizers,
    pass_memory,
    random_stream,
    staging,
)
from gradwire_server.assignment import check_holds, no_repeats, without_leading_ones, writable_slot
from gradwire_server.buffers import Before, Buffers
from gradwire_server.devices import check_device
from gradwire_server.errors import (
    DeadlinePassed,
    DomainError,
    InvalidInput,
    ModelCodeError,
    ModelFault,
    OverLimit,
    UnknownTensor,
    VersionMismatch,
    WrongOrder,
    device_lost,
    device_memory,
    fewer_elements,
    out_of_memory,
)
from gradwire_server.fills import (
    FillSpec,
    TensorInput,
    dtype_name,
    fill_dtype,
    scalar_for,
)
from gradwire_server.indexing import (
    MAX_GRAD_FN_BYTES,
    Autograd,
    AutogradOf,
    IndexChain,
    own_autograd,
    select,
)
from gradwire_server.meta_copy import meta_copy
from gradwire_server.models import BUILT, SIMPLE, ModelSpec
from gradwire_server.optimizers import (
    KIND_NAMES,
    STATE_KEPT,
    STATE_KEYS,
    OptimizerSettings,
    check_settings_kind,
)
from gradwire_server.results import (
    ForwardResult,
    Kind,
    Listing,
    Read,
    Selection,
    Snapshot,
    TensorInfo,
    TrainResult,
)
from gradwire_server.torch_thread import TorchThread, time_left, waited_past
from gradwire_server.watch import Subscription, Subscriptions

log = logging.getLogger(__name__)

#: Reads of tensors up to this size skip the torch thread (torch's parallel grain size).
INLINE_READ_ELEMENTS = 32768

#: Calls on the torch thread that change no tensor: the only ones that leave the streamed
#: reads in flight sending from live memory (live.py). Any other call copies what those reads
#: have not sent yet before it runs, so a name missing here costs a copy, never a torn read.
_CHANGES_NO_TENSOR = frozenset(
    {"_read_with", "_read_many", "stage", "stream_buffer", "save", "copy_of"}
)
#: Trainer methods that change no state: they leave the guard of the call they serve
#: (expected version, deadline) to the mutation that follows. A value streamed to a GPU
#: took its buffer first (stream_buffer), which used the guard up, and the write itself
#: then ran whatever the version had become meanwhile.
_UNGUARDED = _CHANGES_NO_TENSOR | {"subscribe", "list_tensors", "put_back"}


#: Held while a model is built from the process's CPU generator (Trainer._build_model), so
#: that two builds never draw from it at once. It does not stop other draws from that
#: generator meanwhile (a custom model's dropout training on a CPU session, say).
_BUILDING = threading.Lock()


#: Default cap on the elements of one tensor made or received (1 GiB of float32).
DEFAULT_MAX_ELEMENTS = 1 << 28

#: Small work runs on the torch thread alone, without torch's OpenMP team (openmp.py says
#: why): a Forward, Backward or TrainStep of at most this many floating-point operations in
#: its passes (a forward pass counted on meta tensors, a backward pass as two), about 1 ms on
#: one core of the benchmark's VM, where a second thread saved at most 4% of it back to back.
ONE_THREAD_MAX_FLOPS = 1 << 25
#: ... and a Step or a ZeroGrad to zeros of at most this many parameter values (SGD's step:
#: 68 us on one thread, 62 us on two).
ONE_THREAD_MAX_VALUES = 1 << 18
#: Input shapes whose forward pass's run on meta tensors is remembered (Trainer._meta_run).
_SHAPES_REMEMBERED = 64

T = TypeVar("T")
U = TypeVar("U")
P = ParamSpec("P")


@dataclass(frozen=True)
class Guard:
    """Conditions a mutation must meet when it runs, checked under the lock just before."""

    expected_version: int | None = None  # the state version the caller last saw
    deadline: float | None = None  # time.monotonic() after which it must not run


_GUARD: contextvars.ContextVar[Guard | None] = contextvars.ContextVar("guard", default=None)


class guarded:  # named as the function it replaced: `with guarded(guard):`
    """The next Trainer call made in this context runs only if `guard`'s conditions hold.

    A class rather than a generator: every mutation enters one."""

    __slots__ = ("_guard", "_token")

    def __init__(self, guard: Guard | None) -> None:
        self._guard = guard

    def __enter__(self) -> None:
        self._token = _GUARD.set(self._guard)

    def __exit__(self, *exc: object) -> None:
        _GUARD.reset(self._token)


def _take_guard() -> Guard | None:
    # Taken once, by the outermost call: calls that one makes (TrainStep's parts) are not
    # guarded again, since each of them changes the version the guard speaks of.
    guard = _GUARD.get()
    if guard is not None:
        _GUARD.set(None)
    return guard


def under_lock(method: Callable[P, T]) -> Callable[P, T]:
    """Runs a Trainer method on the calling thread under the lock: for methods that do no
    tensor math, which would otherwise pay the hand-off to the torch thread for nothing.
    They change no tensor in place either, so streamed reads in flight are left as they are
    (live.py): a method that does must run on the torch thread."""

    unguarded = method.__name__ in _UNGUARDED

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        trainer: Any = args[0]
        guard = None if unguarded else _take_guard()
        return _locked(trainer, guard, method.__name__, method, *args, **kwargs)

    return wrapper


def _locked(
    trainer: Any, guard: Guard | None, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """fn(*args) on the calling thread under the trainer's lock, once `guard` holds there.
    As run_until on the torch thread, a mutation with a deadline (ZeroGrad to None,
    SetOptimizer) still waiting for the lock behind another's Forward then is refused,
    nothing changed, rather than waiting however long that Forward runs (found by a
    review)."""
    lock = trainer._lock
    if guard is None or guard.deadline is None:
        lock.acquire()
    elif not lock.acquire(timeout=time_left(guard.deadline)):
        raise waited_past(guard.deadline)
    try:
        with trainer._announcing(name):
            trainer._check(guard)
            return fn(*args, **kwargs)
    finally:
        lock.release()


def on_torch_thread(method: Callable[P, T]) -> Callable[P, T]:
    """Runs a Trainer method on its torch thread, under its lock (see Trainer.__init__)."""

    unguarded = method.__name__ in _UNGUARDED

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        trainer: Any = args[0]
        guard = None if unguarded else _take_guard()
        return trainer._run(method, *args, _guard=guard, **kwargs)  # type: ignore[no-any-return]

    return wrapper


_FORWARD_NAMES: tuple[Kind, ...] = ("input", "target", "output", "loss")
#: Name parts of the read-only tensors: "conv1.output", "optimizer.conv1.weight.exp_avg",
#: "conv1.weight.delta".
ACTIVATION_SUFFIX = ".output"
OPTIMIZER_PREFIX = "optimizer."
DELTA_SUFFIX = ".delta"
#: The RPC each mutating Trainer method serves: the `cause` of a watch update.
CAUSES = {
    "forward": "Forward",
    "backward": "Backward",
    "step": "Step",
    "zero_grad": "ZeroGrad",
    "write": "SetTensor",
    "fill_parameters": "FillParameters",
    "reset": "Reset",
    "set_optimizer": "SetOptimizer",
    "train_step": "TrainStep",
    "load": "Load",
    "restore": "LoadCheckpoint",
}
# Integer dtypes taken as class indices; CrossEntropyLoss wants them as int64.
_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


#: Longer names are refused before any lookup: PyTorch's own are far shorter (but for a
#: model whose own are longer: Trainer.max_name_chars).
MAX_NAME_CHARS = 256
#: The longest suffix a name of a parameter's takes: its optimizer state's longest key
#: (".momentum_buffer"; a gradient's ".grad", a change's ".delta" and a module output's
#: ".output" are shorter).
_LONGEST_SUFFIX = 1 + max(len(key) for keys in STATE_KEYS.values() for key in keys)


def _autograd_source(output: torch.Tensor) -> Autograd | torch.Tensor:
    """Where a module output's autograd is read once its pass is over. A view of a leaf (a
    module returning `self.weight.t()`) as it is: it holds its own node and the leaf, no
    graph, and a later in-place change of the leaf (a Step) renames its node, as a print of
    it then shows (AsStridedBackward0; read once, at the pass's end, it said TBackward0:
    found by a review). Any other's read now, for it would hold its pass's graph."""
    base = output._base if output._is_view() else None
    if base is not None and base.is_leaf:
        return output
    return own_autograd(output)


def described_bytes(name: str, full_shape: Sequence[int], shape: Sequence[int]) -> int:
    """A bound on what a tensor takes in an answer besides its values, when an answer holds
    many (TrainStep's fetched, a Watch update): its name, 10 bytes (a varint's most) for each
    dimension of its two shapes, and 64 for the rest (version, dtype, tags, lengths, the
    alignment padding). Counting only values let 2,150 fetched slices that fit pass the
    check and then overflow the message limit, after the step had been applied. A fetched
    tensor's device and autograd fields come on top (`shown_bytes`)."""
    return len(name.encode()) + 10 * (len(full_shape) + len(shape)) + 64


def shown_bytes(kind: Kind, on_cpu: bool) -> int:
    """A bound on a read's fields that say how PyTorch shows the tensor (GetTensorResponse),
    for a tensor of `kind`: its device's name off the CPU ("cuda:0"; 2 bytes of tag and
    length and at most 16), and its autograd: two flags and the node's name with its tag
    and length. A parameter's node is its indexing's (SelectBackward0, UnsqueezeBackward0:
    under 32 bytes); any other tensor's may be the model's own, cut to MAX_GRAD_FN_BYTES:
    the output's, the loss's and a module output's, but also a buffer a module assigns its
    output to, or a gradient a hook made with a graph (found by a review: 50 fetches of such
    a buffer sent 13,049 bytes over a bound of 6,200)."""
    device = 0 if on_cpu else 18
    return device + 7 + (32 if kind == "parameter" else MAX_GRAD_FN_BYTES)


#: Unicode's control characters (Cc): C0, DEL and C1. C1 (U+0080-U+009F) was let through
#: to NOT_FOUND, where the .proto said control characters are BAD_NAME.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_name(name: str, example: str = "conv1.weight", limit: int = MAX_NAME_CHARS) -> None:
    """Refuses names no tensor can have: empty, over-long, or with control characters.
    `example`: a name the model has, for the message (Trainer.example_name); `limit`: the
    longest name taken (Trainer.max_name_chars)."""
    if not name:
        raise InvalidInput(f"a tensor name is required, e.g. {example!r}", reason="BAD_NAME")
    if len(name) > limit:
        raise InvalidInput(
            f"a tensor name of {len(name)} characters is over the limit of {limit}",
            reason="BAD_NAME",
        )
    if _CONTROL_CHARACTER.search(name):  # a character loop cost 10 us a read here
        raise InvalidInput(
            f"tensor name {name!r} holds control characters (NUL, newline, ...)",
            reason="BAD_NAME",
        )


#: How a read-only tensor is named in the error that refuses a write to it; other kinds are
#: "the last Forward's input", "... output", "... loss", "... activation".
_WHAT_IT_IS = {
    "delta": "the last Step's change to a parameter",
    "optimizer_state": "the optimizer's state",
    "buffer": "a buffer of the model (a module's state that does not train, such as "
    "BatchNorm's running statistics)",
}


def _kept_output(
    keep_output: weakref.WeakMethod[Any],
    name: str,
    module: nn.Module,
    args: Any,
    output: Any,
) -> None:
    """A forward hook: the trainer keeps the module's output, while the trainer lives."""
    keep = keep_output()
    if keep is not None:
        keep(name, module, args, output)


def _differentiable(dtype: torch.dtype) -> bool:
    """Whether torch keeps gradients for tensors of `dtype`."""
    return dtype.is_floating_point or dtype.is_complex


def _refusal(error: BaseException, x: torch.Tensor) -> bool:
    """Whether a model's `error` on input `x` is its refusal of that input: a ValueError, or
    an IndexError on integer input (ids past an Embedding's table, on the CPU: it answered
    INTERNAL, found by the twenty-first session's review of the contract)."""
    if isinstance(error, ValueError):
        return True
    return isinstance(error, IndexError) and not x.is_floating_point()


def _said_elsewhere(error: BaseException) -> bool:
    """Whether an error the model's code raised is answered as it is, not as the model's
    fault: a refusal of the trainer's own, or memory running out (a MemoryError; a
    device's, which `_device_memory` answers)."""
    return isinstance(error, (DomainError, MemoryError)) or out_of_memory(error)


#: The most `Trainer._update_bytes` counts, in the parameters' bytes: gradients, two
#: moments, the buffers of deltas and three temporaries (Adam with weight decay).
_UPDATE_MOST = 7


def _state_tensors(settings: OptimizerSettings) -> int:
    """How many tensors as large as a parameter the optimizer of `settings` keeps for it,
    made at its first Step: Adam two (its moments), SGD one with momentum (its buffer)."""
    return 2 if settings.kind == "adam" else int(bool(settings.momentum))


def _step_temporaries(settings: OptimizerSettings) -> int:
    """How many temporaries as large as the largest parameter the optimizer of `settings`
    holds at once in a Step on the CPU, where torch's optimizers update one parameter at a
    time: Adam two (the second moment's root, and its quotient), one more for weight decay
    (the gradient plus the decay); SGD one for Nesterov momentum (the gradient plus the
    momentum) and one for weight decay, plain SGD and momentum none. Measured (the
    process's highest resident memory over a Step of a model whose largest parameter is a
    quarter of its bytes; Trainer._update_bytes), not read from torch's source alone."""
    decay = int(bool(settings.weight_decay))
    if settings.kind == "adam":
        return 2 + decay
    return int(bool(settings.nesterov)) + decay


@contextmanager
def _checkpoint_errors(path: Path) -> Iterator[None]:
    """A checkpoint's read failing, as a load answers it: one that cannot be read or is not
    what a save writes (OSError, ValueError) BAD_CHECKPOINT, one the host has not the memory
    for OUT_OF_MEMORY. For the read of the whole and for each parameter's, read again as it
    is copied in (checkpoint.Loaded)."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise InvalidInput(f"cannot load {path}: {err}", reason="BAD_CHECKPOINT") from err
    except MemoryError as err:
        raise OverLimit(
            f"cannot load {path}: it does not fit in this machine's free memory ({err}); "
            f"free some{checkpoint.AT_START}",
            reason="OUT_OF_MEMORY",
        ) from err


#: What a model's own code may raise in a pass, to be answered as its error: besides any
#: Exception, SystemExit and KeyboardInterrupt, which no signal raises on the torch thread.
_MODELS_OWN = (Exception, SystemExit, KeyboardInterrupt)


def _failed_in_model(error: BaseException, name: str, where: str) -> DomainError | None:
    """What an `error` the model's own code raised in its `where` ("forward pass",
    "backward pass") is answered as, where it is none of the trainer's own refusals, memory
    running out or a device lost (each answered as it is elsewhere): one it cannot be
    served with (torch.utils.checkpoint's reentrant form, whose backward pass only
    loss.backward() runs), else ModelCodeError. Both were INTERNAL with no words, the
    first though the model trains locally (found by a review of serving one's own model).
    A sys.exit() or KeyboardInterrupt of the model's is its error too: the pass runs on the
    torch thread, where no signal is delivered, and they were answered INTERNAL as the
    server's own fault (found by a review of the error catalogue)."""
    if not isinstance(error, _MODELS_OWN) or _said_elsewhere(error) or device_lost(error):
        return None
    if isinstance(error, RuntimeError) and "use_reentrant=True" in str(error):
        return ModelFault(
            f"{name} uses torch.utils.checkpoint with use_reentrant=True, whose backward "
            "pass runs only through loss.backward(), and gradwire takes the gradients with "
            "torch.autograd.grad (to add them to .grad only once every one is made): pass "
            "use_reentrant=False to checkpoint(), as PyTorch advises",
            reason="REENTRANT_CHECKPOINT",
        )
    return ModelCodeError(
        f"{name}'s {where} raised {type(error).__name__}; the server's log has its traceback",
    )


def _first_line(error: BaseException) -> str:
    """A model's refusal in its own words: the first line of its error that has any, else
    the error's type (a ValueError() with no words)."""
    lines = (line for line in str(error).splitlines() if line.strip())
    return next(lines, type(error).__name__)


def _refusal_hint(said: str) -> str:
    """What to do about a model's refusal `said`, where torch's words do not say (BatchNorm
    in training mode given one sample a channel: an integrator's probe)."""
    if "more than 1 value per channel when training" in said:
        return (
            "; a BatchNorm layer in training mode needs 2 or more samples a batch: send more, "
            "or, for a Forward, ask for evaluation mode (eval_mode, forward --eval)"
        )
    return ""


@dataclass(frozen=True)
class _MetaRun:
    """What a forward pass on an input of one shape does, from a run on meta tensors
    (`Trainer._meta_run`): its floating-point operations, the module outputs its hooks
    kept (meta tensors: shapes and dtypes, no memory), and the bytes its operations made
    (pass_memory.py: about what a real pass and its backward pass take at their highest)."""

    flops: int
    outputs: dict[str, torch.Tensor]
    made_bytes: int


def _initialise_lazy_layers(model: nn.Module, spec: ModelSpec) -> None:
    """Gives a model's lazy layers (nn.LazyLinear, nn.LazyConv2d: parameters without a
    shape until their first call) their shapes and values, from one forward pass on zeros
    of [2, *sample_shape], in evaluation mode and without gradients (no statistics moved, no
    dropout drawn), as PyTorch's documentation has it done before training: at build time,
    so that they draw from the model's seed as its other layers do, in the order a first
    forward pass in plain PyTorch would. Left lazy, every call that lists or reads the
    tensors, and checkpoints, failed INTERNAL until a Forward, which a command-line user
    could never send (each command lists the tensors first), and the values drawn then came
    from whatever the process's generator held (found by a review of serving one's own
    model). A lazy layer that only training runs (an auxiliary head) is made by a second
    pass, in training mode, the buffers it moves put back after (a review found it left
    lazy). A model without lazy layers is not run."""

    def lazy() -> bool:
        return any(nn.parameter.is_lazy(t) for t in [*model.parameters(), *model.buffers()])

    if not lazy():
        return
    zeros = torch.zeros([2, *spec.sample_shape], dtype=spec.input_dtype)
    model.eval()
    with torch.no_grad():
        model(zeros)
    if lazy():
        buffers = Buffers(model)
        before = buffers.keep()
        model.train()
        with torch.no_grad():
            model(zeros)
        buffers.put_back(before)


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Each module of `model`, in order, and whether it is in training mode, where they are
    not all in one mode: a factory that put a part in evaluation mode (a frozen backbone's
    BatchNorm, `model.backbone.eval()`), or all but a part (`model.eval();
    model.head.train()`: a review found it trained whole), meant it so. Empty otherwise: a
    model handed over in evaluation mode whole is trained in training mode, as the README
    says."""
    pairs = [(module, module.training) for module in model.modules()]
    return pairs if len({mode for _, mode in pairs}) > 1 else []


def _to_training_mode(model: nn.Module, modes: list[tuple[nn.Module, bool]]) -> None:
    """model.train(), then each module in `modes` back in the mode its factory left it in
    (parents before their children, as train() sets a whole subtree). Every module was put
    in training mode, a factory's frozen BatchNorm moving its statistics (found by a review
    of serving one's own model)."""
    model.train()
    for module, mode in modes:
        if module.training != mode:
            module.train(mode)


@functools.cache
def _carried(dtype: torch.dtype) -> bool:
    """Whether the wire carries tensors of `dtype`, as they are or widened (complex and
    float8 ones it does not)."""
    return codec.sent_as(dtype_name(dtype)) is not None


def _laid_out_as(param: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
    """`grad` laid out as backward() lays a gradient out: in `param`'s strides. A sparse one
    (nn.Embedding(sparse=True)'s) is made dense: every read, write, optimizer and checkpoint
    takes it so, where it failed Backward, TrainStep and Train INTERNAL (found by a review
    of served models); the memory it spares in PyTorch is not spared here."""
    if grad is None:
        return None
    if grad.layout != torch.strided:
        grad = grad.to_dense()
    strides = _gradient_layout(param).stride()
    if grad.stride() == strides:
        return grad
    return grad.new_empty_strided(param.shape, strides).copy_(grad)


def _gradient_layout(param: torch.Tensor) -> torch.Tensor:
    """A tensor of `param`'s shape laid out as backward() lays out its gradient (as
    empty_like does): the parameter's strides where it is dense and no two of its elements
    share memory, else contiguous. A parameter made with `expand` (one value in three
    places) failed every Backward INTERNAL, its gradient copied into its strides, and a
    streamed write of its absent gradient was refused (found by a mutation review). A
    contiguous parameter is its own, without the meta tensor (1.2 us of a Backward's time a
    parameter, where is_contiguous takes 0.1)."""
    return param if param.is_contiguous() else torch.empty_like(param, device="meta")


def _carried_if_present(tensor: torch.Tensor | None) -> bool:
    """Whether the wire carries `tensor`, a tensor that may be absent (None: it does)."""
    return tensor is None or _carried(tensor.dtype)


def _owner(name: str) -> str | None:
    """The parameter a gradient's, Step change's or optimizer state's name belongs to
    ("conv1.weight" of "conv1.weight.grad", "conv1.weight.delta" and
    "optimizer.conv1.weight.exp_avg"); None for any other name."""
    if name.endswith(".grad"):
        return name.removesuffix(".grad")
    if name.endswith(DELTA_SUFFIX):
        return name.removesuffix(DELTA_SUFFIX)
    if name.startswith(OPTIMIZER_PREFIX):
        return name.removeprefix(OPTIMIZER_PREFIX).rpartition(".")[0]
    return None


@dataclass(frozen=True)
class _Fit:
    """What a load does with buffers, once a checkpoint is checked against the model."""

    buffers: dict[str, torch.Tensor]  # the model's persistent buffers, by name
    registered: list[str]  # held by the checkpoint, registered by the model's forward pass
    lacking: list[str]  # kept by `save`, not held: made as a new model makes them


class Trainer:
    """One model on one device, driven step by step."""

    def __init__(
        self,
        spec: ModelSpec = SIMPLE,
        *,
        device: torch.device | str = "cpu",
        optimizer: OptimizerSettings | None = None,
        seed: int | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        track_deltas: bool = False,
        one_thread_for_small_work: bool = False,
    ) -> None:
        """`track_deltas`: record each Step's change of every parameter ("conv1.weight.delta")
        from the start. It costs a copy of the parameters per Step, so by default a
        parameter's change is recorded only once its own delta is first asked for (read,
        fetched or watched), and from then on (`_deltas_asked`).
        `one_thread_for_small_work`: on the CPU, run steps under ONE_THREAD_MAX_FLOPS (and
        updates under ONE_THREAD_MAX_VALUES) on the torch thread alone (openmp.py): much
        faster after idle time on a small machine, but a sum split over threads rounds
        differently, so results can differ in the last bits from torch's default. Off: every
        op on torch's threads, bit for bit what a local run with torch's defaults computes."""
        self.spec = spec
        self.device = check_device(device)  # ValueError for a device it cannot run on
        self.max_elements = max_elements
        self.track_deltas = track_deltas
        self.one_thread_for_small_work = one_thread_for_small_work
        self._meta_runs: dict[tuple[tuple[int, ...], torch.dtype], _MetaRun | None] = {}
        self._lock = random_stream.TrainerLock()  # (random_stream.py says why not an RLock)
        self._version = 0
        self._settings = (optimizer or OptimizerSettings()).resolved()
        # Every torch call runs on one thread, on the CPU the one every CPU trainer in the
        # process shares (torch_thread.py says why).
        self._torch = TorchThread(shared=self.device.type == "cpu")
        self._torch.run(openmp.start_team)  # while memory is there: openmp.py says why
        if self.device.type == "cuda" and self.device.index is not None:
            # The thread's current device is this trainer's: events, pinned memory and
            # caches that follow the current device then follow the model (cuda:1 and on).
            self._torch.run(torch.cuda.set_device, self.device)
        self._subscriptions = Subscriptions()
        self._depth = 0  # nesting of mutating calls: only the outermost one announces
        self._live = live.LiveReads()  # streamed reads sending from live memory
        #: Streamed values assembled on this trainer's GPU at one time (stream_buffer): each
        #: holds its whole size there while it arrives. Others arrive on the host, as on a CPU.
        self.device_assemblies = threading.BoundedSemaphore(1)
        self._cause = "Watch"  # the RPC of the last applied mutation, for watch updates
        #: The seed the model was first built with (a server's --seed, a session's own; one
        #: drawn now if none is given): a new model built with it gives the buffers an old
        #: checkpoint lacks, the same at every load.
        self._seed = seed if seed is not None else secrets.randbits(63)
        self._run(self._init_state, self._seed)

    def _init_state(self, seed: int | None) -> None:
        # A new session's model, or a Reset's, may not fit beside the others on the device.
        with self._device_memory("a new model"):
            model, state = self._build_model(seed)
        self._adopt(model)
        #: where the model's random stream is (random_stream.py)
        self._random_state = state
        self._optimizer = optimizers.build(self._model.parameters(), self._settings)
        self._clear_forward()
        self._criterion = self.spec.criterion()  # CrossEntropyLoss, or MSELoss

    def _run(
        self, fn: Callable[..., T], *args: Any, _guard: Guard | None = None, **kwargs: Any
    ) -> T:
        """fn(*args) on the torch thread (directly when already on it), under the lock,
        once `_guard`'s conditions are checked there."""
        if self._torch.on_it():
            name = getattr(fn, "__name__", "")
            with self._lock, self._announcing(name):
                self._check(_guard)
                if self._live and name not in _CHANGES_NO_TENSOR:
                    self._live.detach_all()  # before anything can change what they send
                return fn(*args, **kwargs)
        if random_stream.held_here():
            # Called from another trainer's pass on a GPU (a model asking a teacher), whose
            # streams wait aside meanwhile: held, they would stop this one's passes.
            with random_stream.set_aside():
                return self._hand_over(fn, _guard, *args, **kwargs)
        return self._hand_over(fn, _guard, *args, **kwargs)

    def _hand_over(self, fn: Callable[..., T], guard: Guard | None, *args: Any, **kwargs: Any) -> T:
        """fn(*args) run by `_run` on the torch thread, this thread waiting for it."""
        step = functools.partial(self._run, _guard=guard)
        if guard is not None and guard.deadline is not None:
            until: T = self._torch.run_until(guard.deadline, step, fn, *args, **kwargs)
            return until
        result: T = self._torch.run(step, fn, *args, **kwargs)
        return result

    def _check(self, guard: Guard | None) -> None:
        """Refuses to run a mutation whose guard fails; nothing has changed yet."""
        if guard is None:
            return
        if guard.deadline is not None and time.monotonic() > guard.deadline:
            raise DeadlinePassed(
                "the call's deadline passed before it could run; nothing was changed"
            )
        if guard.expected_version is not None and guard.expected_version != self._version:
            raise VersionMismatch(
                f"expected state version {guard.expected_version}, but the server is at "
                f"{self._version}; nothing was changed: read the state again and retry",
                metadata={"version": str(self._version)},
            )

    def close(self) -> None:
        """Ends every subscription, and stops the torch thread once the calls in flight are
        done."""
        with self._lock:
            self._subscriptions.close()
        self._torch.close()

    @contextmanager
    def _announcing(self, method: str) -> Iterator[None]:
        """Tells subscribers when the (outermost) call in this block changed the state."""
        before = self._version
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._version != before:
                self._cause = cause = CAUSES.get(method.lstrip("_"), method)
                # Every watcher hears of a state replaced whole, whatever its step count
                # (a LoadCheckpoint was heard only once that count moved on: a review).
                replaced = cause in ("Reset", "LoadCheckpoint")
                self._subscriptions.announce(self._steps, reset=replaced)

    # --- state helpers ------------------------------------------------------------

    def _build_model(
        self, seed: int | None, on_device: bool = True
    ) -> tuple[nn.Module, random_stream.State | None]:
        """The model, built as the spec says under `seed` (a fresh one if None), and where
        its random stream starts (random_stream.py)."""
        # Initialise on the CPU with a private RNG stream, so a seed gives the same weights
        # on every device and the process-wide generator is left alone. One build at a
        # time: the stream is the process's one generator, and GPU trainers build on threads
        # of their own (seeded models built at once came out with each other's draws).
        with _BUILDING, torch.random.fork_rng(devices=[]):
            # The CPU's generator alone: torch.manual_seed seeds every GPU's too, which
            # fork_rng(devices=[]) does not put back. Unseeded, a fresh draw: the forked
            # state, put back after, made every unseeded model of the process the same (a
            # plain Reset repeated the last weights, sessions opened unseeded were alike).
            generator = torch.default_generator
            if seed is None:
                seed = generator.seed()
            else:
                generator.manual_seed(seed)
            model = self._built()
            if model in BUILT:
                raise ModelFault(
                    f"{self.spec.name}'s factory returned the model object it returned "
                    "before (one it keeps, such as a model loaded once): every session would "
                    "train that one model, and a Reset keep its weights; the factory must "
                    "build a new model each call (for one loaded once, return copy.deepcopy "
                    "of it)",
                    reason="SHARED_MODEL",
                )
            modes = _modes(model)
            try:
                _initialise_lazy_layers(model, self.spec)
            except _MODELS_OWN as err:
                raise self._not_built(err, "its lazy layers' first pass") from err
            state = random_stream.built_state(self.device, seed)
        _to_training_mode(model, modes)
        return (model.to(self.device) if on_device else model), state

    def _built(self) -> nn.Module:
        """A new model from the spec's factory; ModelFault (MODEL_BUILD_FAILED) where the
        factory fails: at a Reset or an OpenSession (a file it loads removed since the
        start) that was INTERNAL with no words (found by a review of serving one's own
        model); at start, `load_spec`'s own build says it first. A sys.exit() in it too,
        which was INTERNAL, the server's own fault (found by a review of the error
        catalogue)."""
        try:
            return self.spec.factory()
        except _MODELS_OWN as err:
            raise self._not_built(err, "its factory") from err

    def _not_built(self, error: BaseException, what: str) -> BaseException:
        """The error a build of the model that failed in `what` is answered with."""
        if _said_elsewhere(error):
            return error
        log.error("building a new %s failed in %s", self.spec.name, what, exc_info=error)
        return ModelFault(
            f"building a new {self.spec.name} failed: {what} raised "
            f"{type(error).__name__} (the server's log has its traceback); nothing was changed",
            reason="MODEL_BUILD_FAILED",
        )

    def _training(self) -> bool:
        """Whether a pass now runs a module in training mode: the model's own mode, or, where
        its factory left its modules in mixed modes, any one's (the model's own may be
        evaluation, its head training: _modes)."""
        if not self._modes:
            return self._model.training
        return any(module.training for module, _ in self._modes)

    def _adopt(self, model: nn.Module) -> None:
        """Makes `model` this trainer's, with hooks that keep each module's last output."""
        BUILT.add(model)
        self._model = model
        #: the modules the factory left in evaluation mode, kept so in training (_modes)
        self._modes = _modes(model)
        self._parameters = dict(model.named_parameters())
        #: their bytes: a step's gradients and optimizer state are at most three times that
        self._parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        #: the parameters that can have a gradient, and so a Step's change and optimizer state
        self._learnable = {n for n, p in self._parameters.items() if _differentiable(p.dtype)}
        #: the parameters that view one value in several places (made with `expand`): no
        #: optimizer can update them in place (`_check_steppable`)
        self._repeating = [n for n, p in self._parameters.items() if not no_repeats(p)]
        #: the parameters of a dtype the wire does not carry (a complex phase): they train,
        #: FillParameters fills them and checkpoints keep them, but no call lists them or
        #: carries their values, nor their gradients', changes' or optimizer state's
        #: (`_off_the_wire`)
        self._off_wire = frozenset(n for n, p in self._parameters.items() if not _carried(p.dtype))
        self._example_name = next(
            (n for n in self._parameters if n not in self._off_wire), "output"
        )
        # The longest name taken: MAX_NAME_CHARS, or more for a model whose own names are
        # longer, with the longest prefix and suffix they take ("optimizer.",
        # ".momentum_buffer"): a deep model's 241-character parameter listed optimizer state of 267,
        # which ListTensors refused BAD_NAME (found by a review of served models).
        own = [*self._parameters, *(n for n, _ in model.named_modules()), *self._buffers()]
        longest = max(map(len, own), default=0) + len(OPTIMIZER_PREFIX) + _LONGEST_SUFFIX
        self._max_name_chars = max(MAX_NAME_CHARS, longest)
        self._activations: dict[str, torch.Tensor] = {}
        # Where each kept output's autograd is read (`_autograd_source`): kept detached, it
        # has none of its own.
        self._activations_tracked: dict[str, Autograd | torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._modules = []  # names of the modules whose output is kept, the model's own aside
        self._buffers_kept = Buffers(model)  # put back after a failed pass
        # The hooks hold the trainer weakly: held strongly, the model and the trainer would
        # hold each other, and a closed session's memory would wait for the cycle collector.
        keep_output = weakref.WeakMethod(self._keep_output)
        for name, module in model.named_modules():
            if name:
                self._modules.append(name)
                module.register_forward_hook(functools.partial(_kept_output, keep_output, name))
        self._deltas: dict[str, torch.Tensor] = {}  # the last Step's change, per parameter
        self._delta_buffers: dict[str, torch.Tensor] = {}
        #: the parameters whose delta has been asked for: their changes are recorded from
        #: then on, beside every parameter's with track_deltas. Per parameter: one delta of
        #: 40 bytes read made every Step copy all of a 1.41 GB model, and hold a copy of it
        #: for good (found by a review serving a large model). Kept through Reset and
        #: LoadCheckpoint, as the parameters' names are.
        self._deltas_asked: set[str] = set()
        self._steps = 0  # Steps applied to this model
        self._reached = 0  # parameters the last Backward made a gradient for

    @property
    def _computes(self) -> torch.dtype:
        """The dtype the model computes in, as its output and loss will be before a pass has
        made them: its first floating-point parameter's, float32 without one (the first
        parameter's, an integer or complex one, made a fetch's bound the wrong size)."""
        return next(
            (p.dtype for p in self._parameters.values() if p.dtype.is_floating_point),
            torch.float32,
        )

    @property
    def _target_dtype(self) -> torch.dtype:
        return torch.float32 if self.spec.loss == "mse" else torch.int64

    def _keep_output(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        # Kept aside until the Forward succeeds, so a failed one leaves the last one's. Kept
        # without a copy, as a forward hook sees it: an output the model changes in place
        # later in the Forward (ReLU(inplace=True) after it, a residual `out += x`) reads as
        # changed. The forty-fourth session copied those (found by a run on meta tensors
        # before the first Forward, and at each Forward's end) and took it out again: the
        # meta run broke models that cache a tensor in forward, and a refusal at the end of
        # a Forward made a TrainStep's fetch fail after its step and ended Watches.
        # Detached once the pass is over (`_forward`), its autograd read then. Of a tuple or
        # list, its first item where that is a tensor: an LSTM's or GRU's output sequence,
        # a MultiheadAttention's output (each listed and always absent before: a review of
        # serving one's own model); the rest (an LSTM's state) is not kept.
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        if isinstance(output, torch.Tensor):
            self._pending[name + ACTIVATION_SUFFIX] = output

    def _clear_forward(self) -> None:
        self._input: torch.Tensor | None = None
        self._target: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self._graph_alive = False  # the loss's graph can still be backpropagated
        #: the graph was let go of by a pass that then failed (_let_go_of_last_pass)
        self._graph_let_go = False
        self._parameters_changed = False  # parameters written in place since the Forward
        self._activations, self._activations_tracked = {}, {}

    def _bump(self) -> int:
        self._version += 1
        return self._version

    def _device_memory(self, what: str) -> AbstractContextManager[None]:
        """Turns running out of device memory into OverLimit, leaving the state as it was."""
        return device_memory(what, self.device)

    @property
    def version(self) -> int:
        return self._version

    @property
    def example_name(self) -> str:
        """A name this model has, for messages that show one: its first parameter's that the
        wire carries (the tutorial's "conv1.weight"; they cited that whatever the model
        served)."""
        return self._example_name

    @property
    def max_name_chars(self) -> int:
        """The longest tensor name this trainer takes (GetServerInfo's max_name_chars)."""
        return self._max_name_chars

    @property
    def example_input(self) -> str:
        """An input's shape this model takes, for messages: [8, *sample_shape]."""
        return str([8, *self.spec.sample_shape])

    @property
    def model_bytes(self) -> int:
        """The bytes of the model's parameters and buffers: what building another takes."""
        buffers = sum(b.numel() * b.element_size() for b in self._model.buffers())
        return self._parameter_bytes + buffers

    @property
    def parameters(self) -> dict[str, nn.Parameter]:
        """Parameters by name, in model order (the model's own walk, cached per model)."""
        return self._parameters

    def names(self) -> list[str]:
        """Every name a call can read, as ListTensors lists them: none of a tensor the wire
        does not carry (`_off_the_wire`)."""
        params = [p for p in self.parameters if p not in self._off_wire]
        learnable = [p for p in params if p in self._learnable]
        names = [
            *params,
            *(f"{p}.grad" for p in learnable),
            *(n for n, t in self._forward_tensors().items() if _carried_if_present(t)),
            *(
                m + ACTIVATION_SUFFIX
                for m in self._modules
                if _carried_if_present(self._activations.get(m + ACTIVATION_SUFFIX))
            ),
            *(f"{OPTIMIZER_PREFIX}{p}.{key}" for p in learnable for key in self._state_keys()),
            *(p + DELTA_SUFFIX for p in learnable),
        ]
        taken = set(names)  # a buffer named as another tensor is ("output") is that tensor
        return names + [b for b in self._buffers() if b not in taken]

    def _buffers(self) -> dict[str, torch.Tensor]:
        """The model's buffers by name ("norm.running_mean"), as they are now: a module may
        replace one in its forward, so they are looked up each time, not kept. Those of a
        dtype the wire does not carry (a rotary model's complex64 table) are left out: listed,
        one made ListTensors fail INTERNAL (found by a review); `_unknown` names them."""
        return {n: b for n, b in self._model.named_buffers() if _carried(b.dtype)}

    def _state_keys(self) -> tuple[str, ...]:
        """The per-parameter state the optimizer in use keeps, by torch's own keys."""
        if self._settings.kind == "sgd" and not self._settings.momentum:
            return ()
        return STATE_KEYS[self._settings.kind]

    def _optimizer_state(self, name: str) -> tuple[str, str] | None:
        """(parameter, key) for a name like "optimizer.conv1.weight.exp_avg", else None."""
        if not name.startswith(OPTIMIZER_PREFIX):
            return None
        param, _, key = name[len(OPTIMIZER_PREFIX) :].rpartition(".")
        if param in self._learnable and key in self._state_keys():
            return param, key
        return None

    def _forward_tensors(self) -> dict[str, torch.Tensor | None]:
        """The last Forward's tensors by name, None where there are none yet."""
        return {
            "input": self._input,
            "target": self._target,
            "output": self._output,
            "loss": self._loss,
        }

    def _lookup(
        self, name: str, asking: bool = True
    ) -> tuple[Kind, torch.Tensor | None, torch.Tensor | None]:
        """(kind, tensor or None when absent, the parameter it belongs to if any).

        `asking` for a delta turns that parameter's recording on, from the next Step (see
        track_deltas); ListTensors does not ask.
        """
        check_name(name, self.example_name, self.max_name_chars)
        if self._off_wire and (name in self._off_wire or _owner(name) in self._off_wire):
            raise self._unknown(name)
        params = self.parameters
        if name in params:
            return "parameter", params[name], params[name]
        if name.endswith(".grad") and name[: -len(".grad")] in self._learnable:
            param = params[name[: -len(".grad")]]
            return "gradient", param.grad, param
        forward = self._forward_tensors()
        if name in forward:
            if not _carried_if_present(forward[name]):
                raise self._unknown(name)
            return name, forward[name], None  # type: ignore[return-value]
        if name.endswith(ACTIVATION_SUFFIX) and name[: -len(ACTIVATION_SUFFIX)] in self._modules:
            output = self._activations.get(name)
            if not _carried_if_present(output):
                raise self._unknown(name)
            return "activation", output, None
        if name.endswith(DELTA_SUFFIX) and name[: -len(DELTA_SUFFIX)] in self._learnable:
            owner = name[: -len(DELTA_SUFFIX)]
            if asking:
                self._deltas_asked.add(owner)
            return "delta", self._deltas.get(owner), None
        state = self._optimizer_state(name)
        if state is not None:
            owner, key = state
            value = self._optimizer.state.get(params[owner], {}).get(key)
            if value is not None and not isinstance(value, torch.Tensor):
                value = torch.tensor(value)  # a plain number in some optimizers' state
            return "optimizer_state", value, None
        buffer = self._buffers().get(name)
        if buffer is not None:
            return "buffer", buffer, None
        raise self._unknown(name)

    def _unknown(self, name: str, dtype: torch.dtype | None = None) -> UnknownTensor:
        """NOT_FOUND for `name`, naming the closest names there are, or saying why it is
        not one (`_off_the_wire` says of `dtype`)."""
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        owner = self._without_gradient(name)
        if owner is not None:
            hint = (
                f"{owner} is {dtype_name(self._parameters[owner].dtype)}, and torch keeps "
                "gradients only for floating-point tensors: it has no gradient, Step change or "
                "optimizer state. "
            )
        tied = self._tied(name)
        if tied is not None:
            hint = (
                f"{name} is the same tensor as {tied!r} (tied weights), which lists, reads "
                "and writes it under that name alone. "
            )
            close = [tied]
        unkept = self._unkept_state(name)
        if unkept is not None:
            hint, close = unkept
        originals = self._parametrized(name)
        owner = _owner(name)
        made_of = self._parametrized(owner) if not originals and owner is not None else []
        if owner is not None and made_of:
            # Its gradient, Step change or optimizer state: theirs, named as `name` is.
            at = 0 if name.endswith((".grad", DELTA_SUFFIX)) else len(OPTIMIZER_PREFIX)
            originals = [name[:at] + n + name[at + len(owner) :] for n in made_of]
            hint = (
                f"{name} belongs to {owner}, which is computed by a parametrization "
                f"(weight_norm, say) from the parameters that train: read theirs, "
                f"{', '.join(repr(n) for n in originals)}. "
            )
            close = originals
        elif originals:
            hint = (
                f"{name} is computed by a parametrization (weight_norm, say) from "
                f"{', '.join(repr(n) for n in originals)}, the parameters that train: read "
                "those. "
            )
            close = originals
        hint = self._off_the_wire(name, dtype) or hint
        return UnknownTensor(
            f"no tensor named {name!r}; {hint}ListTensors (gradwire list) lists all "
            f"{len(names)} names",
            metadata={"name": name, "closest": ",".join(close)},
        )

    def _parametrized(self, name: str) -> list[str]:
        """The parameters a parametrization (weight_norm, spectral_norm, orthogonal), or an
        older norm's hook, computes `name` ("0.weight") from, which the model lists under
        names of their own ("0.parametrizations.weight.original0", "0.weight_orig"); []
        when it is none such. A read of it was told "did you mean '2.weight'" (found by a
        review of served models); of its gradient, Step change or optimizer state, "did you
        mean '2.weight.grad'" (`_unknown` names theirs: a review of serving real models)."""
        path, _, key = name.rpartition(".")
        try:
            module = self._model.get_submodule(path)
        except AttributeError:
            return []
        at = f"{path}." if path else ""
        if not parametrize.is_parametrized(module, key):
            # The older torch.nn.utils.spectral_norm and weight_norm compute it in a hook
            # before each pass, from weight_orig, or weight_g and weight_v: the read was told
            # "did you mean '0.weight_v', '0.weight_u', '2.weight'", buffers and another
            # layer's weight (a review of serving real models).
            ends: tuple[str, ...] = ()
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, SpectralNorm | WeightNorm) and hook.name == key:
                    ends = ("_orig",) if isinstance(hook, SpectralNorm) else ("_g", "_v")
            return [f"{at}{key}{end}" for end in ends if f"{at}{key}{end}" in self._parameters]
        prefix = f"{at}parametrizations.{key}."
        return [n for n in self._parameters if n.startswith(prefix)]

    def _off_the_wire(self, name: str, dtype: torch.dtype | None = None) -> str:
        """Why no call serves `name`, when it names a tensor of a dtype the wire does not
        carry (a complex one); "" when it does not. Such a tensor is left out of the listing
        rather than failing it, and refused by every call that would send or take its values
        (a model with a complex parameter answered INTERNAL to ListTensors, GetTensor,
        FillParameters and SetTensor, and to a TrainStep fetching its complex module output
        once the step was applied). `dtype`: a module output's in a pass not yet run (a
        TrainStep's fetch, checked before it)."""
        carried = ", ".join(sorted(codec.DTYPE_NAMES.values()))
        carried = f"which the wire does not carry ({carried})"
        owner = name if name in self._off_wire else _owner(name)
        if owner in self._off_wire:
            param = f"a parameter of {dtype_name(self._parameters[owner].dtype)}, {carried}"
            of = f"{owner} is {param}" if owner == name else f"{name} belongs to {owner}, {param}"
            return (
                f"{of}: it trains, FillParameters fills it and a checkpoint keeps it, but no "
                "call lists it or carries its values. "
            )
        buffer = dict(self._model.named_buffers()).get(name)
        if buffer is not None and not _carried(buffer.dtype):  # one _buffers leaves out
            return f"{name} is a buffer of {dtype_name(buffer.dtype)}, {carried}. "
        module = name.removesuffix(ACTIVATION_SUFFIX)
        if name.endswith(ACTIVATION_SUFFIX) and module in self._modules:
            output = self._activations.get(name)
            if dtype is None and output is not None and not _carried(output.dtype):
                made = dtype_name(output.dtype)
                return f"{name}, {module}'s output, is {made} in the last pass, {carried}. "
            if dtype is not None and not _carried(dtype):
                return (
                    f"{name}, {module}'s output, is {dtype_name(dtype)} in this pass, {carried}. "
                )
        last = self._forward_tensors().get(name)
        if last is not None and not _carried(last.dtype):
            return f"{name} is the last Forward's {name}, of {dtype_name(last.dtype)}, {carried}. "
        return ""

    def _unkept_state(self, name: str) -> tuple[str, list[str]] | None:
        """For the name of optimizer state that the optimizer in use does not keep for a
        parameter that can have state ("optimizer.conv1.weight.exp_avg" under SGD, its
        momentum_buffer under SGD with momentum 0): what it keeps instead, and the names of
        that state; else None. Such a name was answered "did you mean 'conv1.weight.delta'"
        (found by a review integrating from Node.js)."""
        if not name.startswith(OPTIMIZER_PREFIX):
            return None
        owner, _, key = name.removeprefix(OPTIMIZER_PREFIX).rpartition(".")
        kinds = [kind for kind, keys in STATE_KEYS.items() if key in keys]
        if owner not in self._learnable or not kinds:
            return None
        settings = self._settings
        using = KIND_NAMES[settings.kind]
        if settings.kind == "sgd":
            using += f" with momentum {settings.momentum or 0:g}"
        kept = self._state_keys()
        if kept:
            what = f"keeps {listed(kept)} for {owner}, not {key}"
        elif key in self._optimizer.state.get(self.parameters[owner], {}):
            # Left by a keep_state change to momentum 0: torch keeps it, unused, and uses it
            # again if momentum is set again in place.
            what = f"uses no state for {owner} (the {key} it had before momentum 0 stays, unused)"
        else:
            what = f"keeps no state for {owner}"
        hint = (
            f"the optimizer in use, {using}, {what}: {STATE_KEPT[kinds[0]]}. SetOptimizer "
            "(gradwire optimizer) changes the optimizer. "
        )
        return hint, [f"{OPTIMIZER_PREFIX}{owner}.{k}" for k in kept]

    def _tied(self, name: str) -> str | None:
        """The name the model's tensors list for `name`, a second name of the same tensor
        (`head.weight`, tied to `embed.weight`: named_parameters() gives each tensor once,
        under its first name), with `name`'s suffix (.grad, .delta); None when it is no such
        name (a review found it answered NOT_FOUND with no word of the other). Its optimizer
        state too ("optimizer.head.weight.exp_avg": a review of serving real models found
        it named the first's only among its closest names)."""
        if name.startswith(OPTIMIZER_PREFIX):
            owner = _owner(name) or ""
            first = self._tied(owner) if owner else None
            if first is None:
                return None
            return f"{OPTIMIZER_PREFIX}{first}{name[len(OPTIMIZER_PREFIX) + len(owner) :]}"
        for suffix in ("", ".grad", DELTA_SUFFIX):
            if suffix and not name.endswith(suffix):
                continue
            base = name.removesuffix(suffix) if suffix else name
            seen: dict[int, str] = {}
            for tensors in (
                self._model.named_parameters(remove_duplicate=False),
                self._model.named_buffers(remove_duplicate=False),
            ):
                for other, tensor in tensors:
                    first = seen.setdefault(id(tensor), other)
                    if other == base and first != base:
                        return first + suffix
        return None

    def _without_gradient(self, name: str) -> str | None:
        """The parameter `name` would be the gradient, Step change or optimizer state of,
        when that parameter can have none (an integer or bool one); else None."""
        owner = _owner(name)
        if owner is None:
            return None
        return owner if owner in self._parameters and owner not in self._learnable else None

    # --- inputs -------------------------------------------------------------------

    def _check_size(self, shape: Sequence[int], what: str) -> None:
        if any(d < 0 for d in shape):
            # Only a fill's shape can be negative: a tensor's was checked as it was decoded.
            raise InvalidInput(
                f"{what}: shape {list(shape)} has a negative dimension", reason="BAD_FILL"
            )
        count = numel(shape)
        if count > self.max_elements:
            raise OverLimit(
                f"{what}: {count} elements is over this server's limit of "
                f"{self.max_elements}: {fewer_elements(what)}",
                reason="TOO_MANY_ELEMENTS",
            )

    def _make(self, source: TensorInput, default_dtype: torch.dtype, what: str) -> torch.Tensor:
        """`source` on the device: a tensor moved there, or a fill made there (fills.py), once
        its size is within this server's limit."""
        self._check_size(source.shape, what)
        if isinstance(source, FillSpec):
            return fills.make(source, default_dtype, self.device, what)
        with self._device_memory(what):
            return staging.to_device(source, self.device)

    # --- the training step --------------------------------------------------------

    def _inputs(
        self, input: TensorInput, target: TensorInput | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(input, FillSpec):
            # Before the fill is made: one of 2**28 values took 11 s and 2 GB to be refused.
            self._check_size(input.shape, "input")
            self.spec.check_input_shape(input.shape)
            dtype = fill_dtype(input, self.spec.input_dtype)
            if dtype is not None:  # else _make says what is wrong with it
                self._check_pass_memory(input.shape, dtype, target is not None)
        x = self._make(input, self.spec.input_dtype, "input")
        self.spec.check_input_shape(tuple(x.shape))
        self.spec.check_input_dtype(x.dtype)
        if x.dtype != self.spec.input_dtype:  # as the wire carries it: widened
            x = self._narrowed(x)
        if not isinstance(input, FillSpec):
            self._check_pass_memory(x.shape, x.dtype, target is not None)
        if target is None:
            return x, None
        batch, classes = x.shape[0], self.spec.num_classes
        if isinstance(target, FillSpec):  # the server's limit first, as for a tensor
            self._check_size(target.shape, "target")
        if isinstance(target, FillSpec) and numel(target.shape) > batch * classes:
            # Before it is made, as the input's fill: a target of 2**28 values of complex128
            # took 4 GiB to be refused for its shape.
            indices = "" if self.spec.loss == "mse" else f"class indices [{batch}] or "
            raise InvalidInput(
                f"target has shape {list(target.shape)}; {self.spec.name} takes a target of "
                f"{indices}the output's shape [{batch}, {classes}]",
                reason="BAD_TARGET_SHAPE",
            )
        # Fills default to what the loss takes: class indices, or floats like the output.
        y = self._make(target, self._target_dtype, "target")
        if y.dtype in _INDEX_DTYPES and self.spec.loss != "mse":
            y = y.to(torch.int64)
        self.spec.check_target(y, x.shape[0])
        return x, y.to(x.dtype) if y.is_floating_point() and x.is_floating_point() else y

    def _narrowed(self, x: torch.Tensor) -> torch.Tensor:
        """An integer input the wire widened (int32 for uint8), in the model's dtype, once
        every value fits it (BAD_VALUE otherwise, as a write's value is checked)."""
        check_holds(x, self.spec.input_dtype, "input")
        return x.to(self.spec.input_dtype)

    def _check_pass_memory(self, shape: Sequence[int], dtype: torch.dtype, training: bool) -> None:
        """Refuses (OUT_OF_MEMORY) a forward pass on the CPU of an input of `shape` that the
        host has not the memory left for (pass_memory.py), before anything is made for it:
        run, it would have left the server to the kernel's out-of-memory killer.
        `training`: a backward pass is to follow (the pass has a target). The estimate
        comes from the run on meta tensors kept per input shape; of a model that does not run
        on them, only the input's own bytes are checked."""
        if self.device.type != "cpu":
            return
        run = self._meta_run(shape, dtype)
        if run is None:
            # No estimate; the input, made first, is the least the pass takes: a fill of
            # 2**28 values of complex128, of a dtype no run on meta tensors of a float model
            # takes, was made (4 GiB) and only then refused for its dtype.
            made, factor = numel(shape) * dtype.itemsize, 1
        else:
            made = run.made_bytes
            factor = pass_memory.TRAINING if training else pass_memory.FORWARD
        fixed = 0  # counted where it could matter: a small model's step does not feel it
        most = made * factor + _UPDATE_MOST * self._parameter_bytes
        if training and most >= pass_memory.CHECKED_FROM_BYTES:
            fixed = self._update_bytes()
        pass_memory.check(
            "a forward pass with its backward pass" if training else "a forward pass",
            made,
            shape[0] if shape else 1,
            factor,
            host_memory.available_bytes,
            fixed,
        )

    def _update_bytes(self) -> int:
        """What a backward pass and a Step hold for the parameters at their highest, beyond
        what the server holds already; a pass's estimate does not see it, and with a large
        model it is most of a step. Measured by the process's highest resident memory
        (VmHWM) over a TrainStep of a 100M-parameter model (four 5000x5000 Linears, S = 400
        MB of parameters; docs/RELIABILITY.md), on the CPU, whose estimates these are:

        - a whole new set of gradients, every step: made by the backward pass where there are
          none, and where there are, beside them. A TrainStep keeps the gradients it began
          with, to put them back if it fails, through its ZeroGrad, backward pass and Step;
          without a ZeroGrad they are kept as well, and autograd, finding them referenced,
          adds out of place; a Backward computes all of them before adding any. (Counted
          only where none existed, a second TrainStep with SGD took S more than it was
          checked for, and was taken with 1 GB left of a 1.4 GB model: a review.)
        - the optimizer's state not made yet (Adam's two moments, SGD's momentum), and the
          buffers the changes of Steps are recorded in (those of the parameters recorded:
          `_records_delta`), not made yet;
        - the optimizer's temporaries (`_step_temporaries`): one parameter at a time, as
          torch's optimizers do it on the CPU, as many as the largest parameter takes
          (Adam: 2, 3 with weight decay; measured at +1.50 S and +1.75 S over a later step's
          gradients, whose largest parameter is S/4).

        Each step, not once: the first Adam step of that model peaked at 3.53 S over what
        the server held before it (gradients S, moments 2 S, temporaries 0.5 S), each later
        one at 1.50 S; counted 3 S for the first and nothing for the next, a first step was
        taken with 3 GB left of a 1.4 GB model and grew the server 6.4 GB."""
        settings = self._settings
        states = _state_tensors(settings)
        made, deltas = self._optimizer.state, self._delta_buffers
        held, largest = 0, 0
        for name, p in self._parameters.items():
            if not p.requires_grad:
                continue
            size = p.numel() * p.element_size()
            new_deltas = self._records_delta(name) and name not in deltas
            held += size * (1 + states * (p not in made) + new_deltas)
            largest = max(largest, size)
        return held + _step_temporaries(settings) * largest

    def _let_go_of_last_pass(self) -> None:
        """Lets go of the last pass's activations and graph, as a pass begins and before it
        makes its own. Kept through it, for a failed pass to leave them as they were, they
        held two passes' at once: after five TrainSteps at batch 8192 of the tutorial's
        model (its activations 151 MiB) a server's peak was 953 MiB against 803 MiB, and
        five Forwards without a Backward between them 744 MiB against 595 MiB; on a GPU,
        twice what a training loop holds. The last output and loss stay, as values. A pass
        that fails leaves no activations (read, absent, as before a first Forward) and no
        graph (Backward: GRAPH_FREED, saying so)."""
        self._activations, self._activations_tracked = {}, {}
        if self._graph_alive:
            self._graph_let_go = True
        self._graph_alive = False
        # A Forward without a target has a graph too, never to be backpropagated: its
        # output's. Detached, the output and loss hold no graph.
        if self._output is not None:
            self._output = self._output.detach()
        if self._loss is not None:
            self._loss = self._loss.detach()

    def _forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        buffers: Before | None = None,
    ) -> ForwardResult:
        """`buffers`: the model's buffers as a caller has kept them already (buffers.py),
        put back if the pass fails; else kept here. The caller lets go of the last pass
        first (`_let_go_of_last_pass`), or keeps it on purpose (a TrainStep's fetch checked
        only after the pass)."""
        self._pending = {}
        with self._device_memory("forward"):
            if buffers is None:
                buffers = self._buffers_kept.keep()
            try:
                # The model's own random stream: dropout's masks follow its seed.
                with random_stream.drawing(self._random_state) as drawn:
                    output = self._model(x)
                    self.spec.check_output(output, x.shape[0])
                    loss = self._criterion(output, y) if y is not None else None
                if x.device.type == "cuda" and not x.is_floating_point():
                    # Integer inputs index something (an Embedding's table), and on a GPU an
                    # id past its end is a device-side assert, raised at the next
                    # synchronisation: a Forward without a loss answered OK, and another
                    # caller's next call failed (found by a review). Raised here, in the
                    # call that caused it.
                    torch.cuda.synchronize(x.device)
            except BaseException as err:
                # The layers' outputs so far go now (on a GPU, perhaps most of its memory),
                # not at the next Forward; the last Forward's went as the pass began.
                self._pending = {}
                self._buffers_kept.put_back(buffers)
                if not _refusal(err, x):
                    failed = _failed_in_model(err, self.spec.name, "forward pass")
                    if failed is None:
                        raise
                    raise failed from err
                # A model's own refusal of an input (BatchNorm given one sample, an Embedding
                # an id past its table): the caller's to fix. Any other error inside the
                # model is the model's fault: INTERNAL.
                said = _first_line(err)
                raise InvalidInput(
                    f"{self.spec.name} refused this input: {said}{_refusal_hint(said)}",
                    reason="MODEL_REFUSED",
                ) from err
        if self._training():  # a pass in eval mode leaves what training changes alone
            self._buffers_kept.learn(buffers)
        self._input, self._target, self._output, self._loss = x, y, output, loss
        self._random_state = drawn.state  # replaced, not changed: a TrainStep's undo keeps it
        # Kept detached, with their own autograd as it is now that the pass is over (a node
        # a later in-place op made, ReluBackward0, included), so that a read prints it as
        # PyTorch does: held as they came, they kept the graph of a module output the loss
        # does not use, which Backward never frees (64 MiB of a GELU at batch 1024, found
        # by a review).
        kept, self._pending = self._pending, {}
        self._activations = {name: out.detach() for name, out in kept.items()}
        self._activations_tracked = {name: _autograd_source(out) for name, out in kept.items()}
        self._graph_alive = loss is not None
        self._graph_let_go = False
        self._parameters_changed = False
        # loss.item() is where the device is synchronised: the value leaves it here.
        value = None if loss is None else float(loss.item())
        nonfinite = 0
        # Counted only when the input's sum shows that there is something to count (NaN and
        # infinities make it non-finite, as can finite values past the dtype's range): one
        # reduction, where a mask and its count took 0.08-0.5 ms of a 4-6 ms step at batch
        # 256 (the fortieth session's profile of the in-process step). math.isfinite, not
        # torch's: on a 0-d tensor that is several ops, 4.8 us against 1.5.
        if x.is_floating_point() and not math.isfinite(x.sum().item()):
            nonfinite = int(x.numel() - torch.isfinite(x).sum().item())
        return ForwardResult(self._bump(), tuple(output.shape), value, nonfinite)

    @on_torch_thread
    def stream_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
        """Uninitialised memory on the model's device for a value that arrives in pieces (a
        streamed SetTensor value or Forward input, assembled there as it comes: convert.py).
        Taken on the torch thread under the lock, as the model's every allocation is, so that
        it cannot fall between a Step's reservation of memory and the Step's use of it."""
        self._check_size(shape, what)
        with self._device_memory(what):
            return torch.empty(shape, dtype=dtype, device=self.device)

    @on_torch_thread
    def stage(self, source: TensorInput, what: str) -> TensorInput:
        """A run's data where its steps use it: a tensor on the model's device, copied there
        once rather than by every step of the run (`_make` then finds it there); a fill as it
        is, as each step makes its own. `what` names it in errors ("input", "target")."""
        if isinstance(source, FillSpec):
            return source
        staged = self._make(source, source.dtype, what)
        if what == "input" and staged.dtype == self.spec.input_sent_as != self.spec.input_dtype:
            staged = self._narrowed(staged)  # once, not by every step (a review)
        return staged

    @on_torch_thread
    def copy_of(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """A copy of a run's staged `tensor`, made on the torch thread (on a gRPC thread, a
        copy past torch's grain size started an OpenMP team there, which slowed every later
        step: found by a review), where the device's memory is counted as any other."""
        with self._device_memory(what):
            return tensor.clone()

    @on_torch_thread
    def put_back(self, tensor: torch.Tensor, copy: torch.Tensor) -> None:
        """`tensor`, a run's staged data that a step changed in place, made `copy` again: on
        the torch thread, under the lock, as any change to a tensor a read may be sending."""
        with torch.no_grad():
            tensor.copy_(copy)

    @on_torch_thread
    def forward(
        self, input: TensorInput, target: TensorInput | None = None, eval_mode: bool = False
    ) -> ForwardResult:
        """model(input), and CrossEntropyLoss(output, target) when a target is given; with
        `eval_mode`, the model in evaluation mode (model.eval()) for this one call."""
        x, y = self._inputs(input, target)
        with self._threads_for(x, passes=1), self._evaluating(eval_mode):
            self._let_go_of_last_pass()
            return self._forward(x, y)

    @contextmanager
    def _evaluating(self, eval_mode: bool) -> Iterator[None]:
        """The model in evaluation mode inside, with `eval_mode`; in training mode after,
        as it always is otherwise, whatever happens inside."""
        if not eval_mode:
            yield
            return
        self._model.eval()
        try:
            yield
        finally:
            _to_training_mode(self._model, self._modes)

    @overload
    def train_step(
        self,
        input: TensorInput,
        target: TensorInput,
        *,
        zero_grad: bool = ...,
        fetch: Sequence[tuple[str, IndexChain]] = ...,
        use: Callable[[Selection], T],
        max_fetch_bytes: int | None = ...,
    ) -> TrainResult[T]: ...

    @overload
    def train_step(
        self,
        input: TensorInput,
        target: TensorInput,
        *,
        zero_grad: bool = ...,
        fetch: Sequence[tuple[str, IndexChain]] = ...,
        use: Callable[[Selection], T],
        max_fetch_bytes: int | None = ...,
        finish: Callable[[TrainResult[T]], U],
    ) -> U: ...

    @on_torch_thread
    def train_step(
        self,
        input: TensorInput,
        target: TensorInput,
        *,
        zero_grad: bool = False,
        fetch: Sequence[tuple[str, IndexChain]] = (),
        use: Callable[[Selection], T],
        max_fetch_bytes: int | None = None,
        finish: Callable[[TrainResult[T]], U] | None = None,
    ) -> TrainResult[T] | U:
        """[zero_grad,] forward, backward, step, then use() each fetched selection.

        Everything that can be refused (inputs, fetch names and indices) is checked before
        anything changes; each part then adds one to the version, as the separate calls do.
        A module output's shape comes from a run of the model on meta tensors; of a model
        that cannot run on them, its fetches are checked after the forward pass instead, and
        a refusal then puts back what the pass changed of the trainer's state and the
        model's buffers (buffers.py; not other attributes a model may change in forward).
        `finish`, when given, makes the answer of the result still under the lock: `use` may
        then keep views of live tensors, and `finish` join them into the reply in one copy.
        """
        x, y = self._inputs(input, target)
        assert y is not None
        try:
            checked = self._check_fetch(fetch, x, y, max_fetch_bytes)
        except DomainError:
            # Refused on the module outputs' shapes a run on meta tensors gave for this input
            # shape, kept from an earlier call: a model whose outputs' shapes change with its
            # own state refused a fetch that fitted them now (a review). A new run, then.
            if not any(name.endswith(ACTIVATION_SUFFIX) for name, _ in fetch):
                raise
            self._meta_runs.pop((tuple(x.shape), x.dtype), None)
            checked = self._check_fetch(fetch, x, y, max_fetch_bytes)
        recheck = None if checked else max_fetch_bytes
        with self._threads_for(x, passes=3, update=True):
            return self._train_step(x, y, zero_grad, fetch, use, finish, checked, recheck)

    def _train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        zero_grad: bool,
        fetch: Sequence[tuple[str, IndexChain]],
        use: Callable[[Selection], T],
        finish: Callable[[TrainResult[T]], U] | None,
        checked: bool = True,
        max_fetch_bytes: int | None = None,
    ) -> TrainResult[T] | U:
        # A Forward or Backward that fails, for any reason (the model refusing its input,
        # memory), and a Step that runs out of memory leave the state as it was before the
        # call, ZeroGrad undone, but for the last pass's activations and graph, let go of
        # as the pass begins: the first two replace the attributes they change rather than
        # change them in place, so the old references are all there is to keep, and the Step
        # runs out, if at all, before it changes anything (it takes the memory its state
        # and temporaries need first: _reserve_step_memory). Any other failure inside the
        # Step may have updated some parameters in place: that one is the optimizer's
        # fault, answered INTERNAL.
        if checked:
            # The last pass's activations and graph go first: a step that fails from here
            # leaves neither. A fetch still to check after the pass keeps them until the
            # pass has succeeded: a refused fetch changes nothing.
            self._let_go_of_last_pass()
        kept = dict(vars(self))
        grads = [(p, p.grad) for p in self._parameters.values()]
        # A failure after the forward pass (a fetch checked only then, `checked` false; no
        # memory for Backward) puts back its changes to the model's buffers (BatchNorm's
        # running statistics) from these copies.
        stepping = False
        buffers: Before | None = None
        try:
            if zero_grad:
                self._zero_grad(True)
            with self._device_memory("forward"):
                buffers = self._buffers_kept.keep()
            result = self._forward(x, y, buffers)
            if not checked:
                self._check_fetch(fetch, x, y, max_fetch_bytes, self._activations)
            self._backward(retain_graph=False)
            if not self._reached:
                # Refused here, undone with the rest: the Step refused it only after the
                # ZeroGrad, Forward and Backward had been applied (version 0 to 3).
                raise WrongOrder(
                    "the loss reached no parameter that trains (the model's output comes "
                    "from frozen ones, or from the input alone): the step would change "
                    "nothing, and nothing changed",
                    reason="NO_GRADIENTS",
                )
            self._check_steppable()  # refused here, undone with the rest
            stepping = True
            if all(p.grad is None for p in self._parameters.values()):
                # The model's hooks stepped each parameter as its gradient landed and let go
                # of the gradient (an optimizer in backward, PyTorch's pattern for it): the
                # step is done, and the Step would refuse it, NO_GRADIENTS, the parameters
                # changed all the same (found by a review).
                version, updated = self._stepped_in_backward()
            else:
                version, updated = self._step()
        except BaseException as err:
            if stepping and not isinstance(err, OverLimit):
                raise
            vars(self).update(kept)
            for p, grad in grads:
                p.grad = grad
            if buffers is not None:
                self._buffers_kept.put_back(buffers)
            if stepping:
                # The Step began by copying the parameters into the buffers the last Step's
                # changes were kept in: those are gone (as after a failed Step alone).
                self._deltas = {}
            raise
        fetched = [self.read_with(name, chain, use) for name, chain in fetch]
        assert result.loss is not None
        done = TrainResult(
            version, result.loss, result.output_shape, updated, fetched, result.nonfinite_inputs
        )
        return done if finish is None else finish(done)

    def _check_fetch(
        self,
        fetch: Sequence[tuple[str, IndexChain]],
        x: torch.Tensor,
        y: torch.Tensor,
        max_bytes: int | None,
        outputs: dict[str, torch.Tensor] | None = None,
    ) -> bool:
        """Refuses unknown names, bad indices and too many bytes, against what the step leaves.

        Indexing runs on meta tensors: shapes and dtypes only, no memory. The module outputs'
        shapes are those of `outputs`, the ones a forward pass kept, when given; else those
        of a run of the model on meta tensors (`_meta_run`). False where a module output is
        fetched and `outputs` was not given: the caller checks again with the forward pass's
        outputs, before its backward pass, for the run's shapes may not be the pass's (a
        model whose outputs' shapes change with its own state: a fetch that the run's passed
        was refused after the step, the step applied; found by a review), or the run failed
        (the model reads a value, or mixes in a tensor of its own) and left them unchecked.
        """
        computes = self._computes
        after: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "input": (tuple(x.shape), x.dtype),
            "target": (tuple(y.shape), y.dtype),
            "output": ((x.shape[0], self.spec.num_classes), computes),
            "loss": ((), computes),
        }
        checked = True
        total = 0
        for name, chain in fetch:
            kind, tensor, param = self._lookup(name)
            if param is not None:
                shape, dtype = tuple(param.shape), param.dtype
            elif kind == "buffer":
                assert tensor is not None
                shape, dtype = tuple(tensor.shape), tensor.dtype
            elif kind == "activation":
                if outputs is None:
                    run = self._meta_run(x.shape, x.dtype)
                    outputs, checked = {} if run is None else run.outputs, False
                if name not in outputs:  # no tensor returned, or not known yet: see above
                    continue
                shape, dtype = tuple(outputs[name].shape), outputs[name].dtype
                if not _carried(dtype):
                    raise self._unknown(name, dtype)
            elif kind in ("delta", "optimizer_state"):
                state = self._optimizer_state(name)
                owner = self._parameters[state[0] if state else name[: -len(DELTA_SUFFIX)]]
                shape, dtype = tuple(owner.shape), owner.dtype
                if state and state[1] == "step":
                    shape, dtype = (), torch.float32
            else:
                shape, dtype = after[kind]
            part = select(torch.empty(shape, dtype=dtype, device="meta"), chain, name)
            total += part.numel() * part.element_size() + described_bytes(name, shape, part.shape)
            total += shown_bytes(kind, self.device.type == "cpu")
        if max_bytes is not None and total > max_bytes:
            raise OverLimit(
                f"the fetched tensors take {total} bytes with their names and shapes, over the "
                f"{max_bytes} one answer may carry: fetch less, and read the rest with "
                "GetTensorStream after the step",
                reason="FETCH_TOO_LARGE",
                metadata={"bytes": str(total), "limit": str(max_bytes)},
            )
        return checked

    def _meta_run(self, shape: Sequence[int], dtype: torch.dtype) -> _MetaRun | None:
        """What a forward pass on an input of `shape` and `dtype` does, from a run on meta
        tensors made once per input shape and dtype (the model is in training mode outside
        a call, so the run is in that mode); None when the model does not run on meta
        tensors (it reads a value, or a layer makes its parameters when first called): the
        caller does without.
        Kept per shape, as a model's layers are; for a model whose outputs' shapes change
        with state of its own, train_step checks its fetches again against the forward
        pass's, and makes a new run where the kept shapes refuse one."""
        key = (tuple(shape), dtype)
        if key not in self._meta_runs:
            if len(self._meta_runs) >= _SHAPES_REMEMBERED:
                del self._meta_runs[next(iter(self._meta_runs))]  # the shape seen first
            try:
                self._meta_runs[key] = self._run_on_meta(key[0], dtype)
            except _MODELS_OWN as err:  # the pass itself says what the model does
                log.debug("no run on meta tensors for input %s: %s", key, err)
                self._meta_runs[key] = None
        return self._meta_runs[key]

    def _run_on_meta(self, shape: Sequence[int], dtype: torch.dtype) -> _MetaRun:
        """A forward pass for an input of `shape` and `dtype` on a meta copy of the model
        (`meta_copy`: shapes and dtypes, no memory, no arithmetic, nothing of the model's own
        changed), its operations counted by torch's FlopCounterMode, and the bytes they made
        (the input's among them)."""
        # Copied outside the counters: only the pass is counted.
        model = meta_copy(self._model, _kept_output)
        counter, made = FlopCounterMode(display=False), pass_memory.MadeBytes()
        with counter, made:
            outputs = self._forward_on_meta(model, shape, dtype)
        return _MetaRun(counter.get_total_flops(), outputs, made.total)

    def _forward_on_meta(
        self, model: nn.Module, shape: Sequence[int], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """`model`, a meta copy of the trainer's (`meta_copy`), run on an input of `shape`
        and `dtype` (meta, without gradients); the module outputs the trainer's hooks kept
        of it, which go nowhere else (not into the outputs of the last Forward)."""
        self._pending = {}
        try:
            # Forked: a model that draws CPU noise of its own (torch.rand without a device)
            # draws it in this run too, and moved the process's generator (a review).
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                model(torch.empty(shape, dtype=dtype, device="meta"))
            return self._pending
        finally:
            self._pending = {}

    # --- how many threads a job runs on ----------------------------------------------

    def _threads_for(
        self, x: torch.Tensor | None, passes: int = 0, update: bool = False
    ) -> AbstractContextManager[None]:
        """Runs a small job on the torch thread alone (openmp.py says why), else on torch's
        threads: `passes` forward passes' worth of operations on input `x` (a backward pass
        is two), and, with `update`, one pass over the parameters that train."""
        small = self.one_thread_for_small_work and self.device.type == "cpu"
        if small and passes:
            run = None if x is None else self._meta_run(x.shape, x.dtype)
            small = run is not None and passes * run.flops <= ONE_THREAD_MAX_FLOPS
        if small and update:
            values = sum(p.numel() for p in self._parameters.values() if p.requires_grad)
            small = values <= ONE_THREAD_MAX_VALUES
        return openmp.one_thread(small)

    @on_torch_thread
    def backward(self, retain_graph: bool = False) -> int:
        """loss.backward(): gradients accumulate into every parameter's .grad."""
        with self._threads_for(self._input, passes=2):
            return self._backward(retain_graph)

    def _backward(self, retain_graph: bool) -> int:
        if self._loss is None:
            if self._output is None:
                raise WrongOrder("no loss to backpropagate: call Forward first", reason="NO_LOSS")
            raise WrongOrder(
                "the last Forward had no target, so there is no loss: call Forward with a target",
                reason="NO_LOSS",
            )
        if not self._graph_alive:
            raise WrongOrder(
                "the graph of the last Forward was let go of as a later call's pass began, "
                "and that call failed: call Forward again"
                if self._graph_let_go
                else "the graph of the last Forward was already freed by Backward: call "
                "Forward again, or pass retain_graph to Backward to keep it",
                reason="GRAPH_FREED",
            )
        if self._parameters_changed:
            raise WrongOrder(
                "parameters were changed (Step, SetTensor or FillParameters) after the last "
                "Forward, so its graph is stale: call Forward again",
                reason="GRAPH_STALE",
            )
        # loss.backward() adds each gradient to its .grad as soon as it is computed: running out
        # of memory halfway would leave some added and others not. So all are computed first,
        # laid out as backward() lays them out, and added only once every one of them fits.
        params = [p for p in self._parameters.values() if p.requires_grad]
        if not params or not self._loss.requires_grad:
            # torch's words: "element 0 of tensors does not require grad", INTERNAL (a model
            # fine-tuned with its every layer on the loss's path frozen: found by a review).
            raise WrongOrder(
                "the loss depends on no parameter that trains: each is frozen "
                "(requires_grad=False) or the model's output does not come from them, so "
                "Backward has no gradient to make",
                reason="NO_GRADIENTS",
            )
        try:
            # A backward pass draws from the model's stream too (a hook adding gradient
            # noise, a custom autograd Function): from the process's, such draws followed
            # no seed, and moved every other session's masks.
            with (
                self._device_memory("backward"),
                random_stream.drawing(self._random_state) as drawn,
            ):
                grads = [
                    _laid_out_as(p, g)
                    for p, g in zip(
                        params,
                        torch.autograd.grad(
                            self._loss, params, retain_graph=retain_graph, allow_unused=True
                        ),
                        strict=True,
                    )
                ]
        except BaseException as err:
            self._graph_alive = retain_graph  # torch frees the graph as it goes, failing or not
            if self._input is not None and _refusal(err, self._input):  # as in forward
                raise InvalidInput(
                    f"{self.spec.name} refused this input in its backward pass: {_first_line(err)}",
                    reason="MODEL_REFUSED",
                ) from err
            failed = _failed_in_model(err, self.spec.name, "backward pass")
            if failed is None:
                raise
            raise failed from err
        self._random_state = drawn.state  # replaced only once the pass succeeded, as _forward's
        self._reached = sum(1 for g in grads if g is not None)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
            for p, g in zip(params, grads, strict=True):
                # What loss.backward() runs once a parameter's .grad holds its gradient
                # (register_post_accumulate_grad_hook: clipping each gradient, an optimizer
                # stepped in backward), which autograd.grad does not: a model clipping its
                # gradients so trained unclipped (found by a review of served models).
                hooks = getattr(p, "_post_accumulate_grad_hooks", None)
                if g is not None and hooks:
                    for hook in list(hooks.values()):
                        hook(p)
        self._graph_alive = retain_graph
        return self._bump()

    @on_torch_thread
    def step(self) -> tuple[int, int]:
        """optimizer.step(); returns (version, parameters updated)."""
        with self._threads_for(None, update=True):
            self._check_steppable()  # a TrainStep checks before its Step, to undo the rest
            return self._step()

    def _step(self) -> tuple[int, int]:
        with_grad = sum(1 for p in self._parameters.values() if p.grad is not None)
        if with_grad == 0:
            raise WrongOrder(
                "no gradients to apply: call Backward first (ZeroGrad with set_to_none "
                "removes them)",
                reason="NO_GRADIENTS",
            )
        with self._device_memory("step"):
            recording = self.track_deltas or self._deltas_asked
            before = self._keep_before_step() if recording else {}
            had_state = set(self._optimizer.state)
            try:
                self._reserve_step_memory()
                optim.step(self._optimizer)
            except BaseException:
                # State the failed step began (Adam's zero moments) goes; what it updated in
                # place cannot fail after the reservation above.
                for p in [p for p in self._optimizer.state if p not in had_state]:
                    del self._optimizer.state[p]
                self._deltas = {}  # their buffers now hold `before`, not the last Step's change
                raise
        # delta = after - before, in one pass, into the buffer that held `before`.
        for name, kept in before.items():
            torch.sub(self._parameters[name].detach(), kept, out=kept)
        self._deltas = before  # the recorded parameters' alone: empty while none is
        self._steps += 1
        self._parameters_changed = True
        return self._bump(), with_grad

    def _check_steppable(self) -> None:
        """Refuses a Step that would update a parameter viewing one value in several places
        (made with `expand`), before anything changes: torch's optimizers refuse to write
        to it in place ("more than one element of the written-to tensor refers to a single
        memory location"), as they do in PyTorch, and a Step answered that INTERNAL, its
        words in the server's log alone."""
        stepped = [n for n in self._repeating if self._parameters[n].grad is not None]
        if stepped:
            raise ModelFault(
                f"{', '.join(stepped)} of {self.spec.name} views one value in several places "
                "(a stride of 0, as expand makes it): no optimizer can update it in place, "
                "PyTorch's neither, and nothing was changed. Its operator's to fix: "
                "expand(...).clone() in the model's __init__ gives it a place for each "
                "value, requires_grad=False freezes it",
                reason="EXPANDED_PARAMETER",
            )

    def _stepped_in_backward(self) -> tuple[int, int]:
        """A TrainStep's step that the model's post-accumulate hooks made during Backward:
        counted as a Step is, with no change kept (the hooks' update is theirs)."""
        self._deltas = {}
        self._steps += 1
        self._parameters_changed = True
        return self._bump(), self._reached

    def _reserve_step_memory(self) -> None:
        """Takes, and gives back, the memory the optimizer's step will need, for its state
        not made yet and its temporaries.

        torch's optimizers update one parameter after another, allocating as they go: SGD
        the gradient plus weight decay, and at the first step with momentum each
        parameter's buffer; Adam its moments for all parameters first, then for each the
        root of the second moment and its quotient (and the gradient plus weight decay);
        Nesterov momentum the gradient plus the momentum. Running out at a later parameter
        would leave the earlier ones updated, the Step half applied. Allocating as much
        first makes running out happen before anything changed; given back, the memory is
        there for the step (CUDA's caching allocator keeps it; on the CPU the process keeps
        it, with gradwire's malloc settings, or the address space is free).

        How much: the state (`_update_bytes` counts the same), and for the temporaries two
        or three as large as the largest parameter (torch's per-parameter loop, its CPU
        default), or one as large as all of them (its foreach form, CUDA's default), the
        larger. The first cut took the temporaries alone, and only for Adam and Nesterov:
        a one-parameter model ran out halfway through a later Adam step, and a model whose
        last parameter was its largest was half stepped by SGD with weight decay, a first
        step with momentum and Adam's first step (each found by a review).

        Not a guarantee: under a cap of the address space (the tests' stand-in for a
        device's memory) a step can still run out in a band just above what it needs,
        where the other threads' allocations decide (glibc gives each arena 64 MiB of
        address space at a time): a model of 72 MiB was half stepped by Adam's first step
        now and then under 272-286 MiB of headroom, it needing 272.
        """
        settings = self._settings
        states = _state_tensors(settings)
        per_parameter = _step_temporaries(settings)
        if not states and not per_parameter:
            return  # plain SGD allocates nothing
        made = self._optimizer.state
        sizes, new_state = [], 0
        for p in self._parameters.values():
            if p.grad is None:
                continue
            size = p.numel() * p.element_size()
            sizes.append(size)
            new_state += states * size * (p not in made)
        temporaries = max(sum(sizes), per_parameter * max(sizes)) if per_parameter and sizes else 0
        if new_state + temporaries == 0:
            return  # momentum, once its buffers exist, allocates nothing
        reserved = torch.empty(new_state + temporaries, dtype=torch.uint8, device=self.device)
        del reserved

    def _records_delta(self, name: str) -> bool:
        """Whether a Step records parameter `name`'s change: with track_deltas every
        parameter's, else those whose delta has been asked for."""
        return self.track_deltas or name in self._deltas_asked

    def _keep_before_step(self) -> dict[str, torch.Tensor]:
        """Copies of the parameters a Step will update whose change is recorded
        (`_records_delta`), in buffers kept from step to step."""
        kept = {}
        for name, p in self._parameters.items():
            if p.grad is None or not self._records_delta(name):
                continue
            buffer = self._delta_buffers.get(name)
            if buffer is None or buffer.shape != p.shape or buffer.dtype != p.dtype:
                buffer = self._delta_buffers[name] = torch.empty_like(p, requires_grad=False)
            kept[name] = buffer.copy_(p.detach())
        return kept

    def zero_grad(self, set_to_none: bool = True) -> int:
        """optimizer.zero_grad(set_to_none); None gradients, as PyTorch >= 2.0, by default."""
        guard = _take_guard()
        if set_to_none:  # no tensor math: the lock is enough, no hand-off to the torch thread
            return _locked(self, guard, "zero_grad", self._zero_grad, True)
        result: int = self._run(self._zero_grad, False, _guard=guard)
        return result

    def _zero_grad(self, set_to_none: bool) -> int:
        # optim.py: without torch's profiler range, which costs more than the zeroing.
        if set_to_none:
            optim.zero_grad(self._optimizer, set_to_none=True)
        else:
            with self._threads_for(None, update=True):
                optim.zero_grad(self._optimizer, set_to_none=False)
        return self._bump()

    # --- reading and writing tensors -------------------------------------------------

    def read_with(
        self,
        name: str,
        chain: IndexChain,
        use: Callable[[Selection], T],
        *,
        copies_only: bool = False,
    ) -> T:
        """use(tensor[chain...]) under the lock, indexed where the tensor lives.

        The selection may share memory with the live tensor: `use` must copy what it keeps
        (encoding it for the wire is such a copy, and the only one on the CPU).
        `copies_only`: `use` does no more than copy the selection to the host (GetTensor).
        """
        if not self._torch.on_it():
            # Reads of small tensors run on the caller's thread, where the hand-off to the
            # torch thread (about 0.15 ms measured) would cost more than the read: on the
            # CPU too small for torch to parallelise, so no OpenMP team wakes; on a GPU, when
            # the read is a view and one small copy to the host, on the device's default
            # stream as the torch thread's work is, so after it (GetTensor of 3 elements on
            # an H200: 1.76x an echo through the torch thread). Other GPU work stays on the
            # torch thread: cuBLAS, say, keeps a handle and workspace for each thread that
            # calls it, never freed.
            with self._lock:
                kind, tensor, _ = self._lookup(name)
                if tensor is None:
                    return self._use(name, kind, tensor, chain, use)
                if tensor.numel() <= INLINE_READ_ELEMENTS:
                    if tensor.device.type == "cpu":
                        return self._use(name, kind, tensor, chain, use)
                    if tensor.device.type == "cuda" and copies_only:
                        # The device the torch thread has current (a server on cuda:1).
                        with torch.cuda.device(tensor.device):
                            return self._use(name, kind, tensor, chain, use)
        result: T = self._run(self._read_with, name, chain, use)
        return result

    def _read_with(self, name: str, chain: IndexChain, use: Callable[[Selection], T]) -> T:
        kind, tensor, _ = self._lookup(name)
        return self._use(name, kind, tensor, chain, use)

    def _use(
        self,
        name: str,
        kind: Kind,
        tensor: torch.Tensor | None,
        chain: IndexChain,
        use: Callable[[Selection], T],
    ) -> T:
        """use(tensor[chain...]), `tensor` being what `name` holds now (None: nothing yet)."""
        if tensor is None:
            return use(Selection(self._version, name, None, None))
        part = select(tensor.detach(), chain, name)
        autograd = self._autograd_of(name, kind, tensor, chain)
        device = "" if tensor.is_cpu else str(tensor.device)
        with self._device_memory(f"reading {name}"):
            return use(Selection(self._version, name, part, tuple(tensor.shape), autograd, device))

    def _autograd_of(
        self, name: str, kind: Kind, tensor: torch.Tensor, chain: IndexChain
    ) -> AutogradOf:
        """What a print of tensor[chain...] shows of autograd, `tensor` being what `name`
        holds: a module output's read where `_autograd_source` left it."""
        source = self._activations_tracked.get(name) if kind == "activation" else None
        if isinstance(source, torch.Tensor):
            return AutogradOf(source, chain)
        return AutogradOf(tensor, chain, source)

    def stream_read(
        self, name: str, chain: IndexChain, memory: live.Memory
    ) -> tuple[Selection, live.StreamedRead | None]:
        """A read of tensor[chain...] to be sent run by run, every run of this version; None
        with the selection when the tensor is absent. A contiguous CPU selection is sent from
        the live tensor and copied (from `memory`) only if a mutation comes first; anything
        else is copied now (live.py). Close the read when its stream ends, however it ends."""

        def open_read(selection: Selection) -> tuple[Selection, live.StreamedRead | None]:
            if selection.part is None:
                return selection, None
            read = live.StreamedRead(selection.part, self._lock, memory, self._live)
            # Its autograd worked out now, under the lock, as the other reads' is.
            return dataclasses.replace(
                selection, part=None, autograd=selection.autograd.get()
            ), read

        return self.read_with(name, chain, open_read)

    def read(self, name: str, chain: IndexChain = ()) -> Read:
        """A copy on the host of tensor[chain...], indexed on the device first."""

        def copy(selection: Selection) -> Read:
            part = selection.part
            if part is None:
                return Read(selection.version, name, None, None)
            host = part.to("cpu", copy=True, memory_format=torch.contiguous_format)
            return Read(selection.version, name, host, selection.full_shape)

        return self.read_with(name, chain, copy, copies_only=True)

    def read_many(
        self,
        selectors: Sequence[tuple[str, IndexChain]],
        use: Callable[[Selection], T],
        finish: Callable[[Snapshot[T]], U],
        subscription: Subscription | None = None,
    ) -> U:
        """use() of each selection, all at one version, with what led to it, then
        finish(snapshot) still under the lock: for watchers, whose `use` may keep views of
        live tensors and `finish` join them into the update, the one copy of the values.
        `subscription`'s due updates are taken at the same time (Snapshot.updates)."""
        result: U = self._run(self._read_many, selectors, use, finish, subscription)
        return result

    def _read_many(
        self,
        selectors: Sequence[tuple[str, IndexChain]],
        use: Callable[[Selection], T],
        finish: Callable[[Snapshot[T]], U],
        subscription: Subscription | None,
    ) -> U:
        used = [self._read_with(name, chain, use) for name, chain in selectors]
        updates = 0 if subscription is None else subscription.take()
        return finish(Snapshot(self._version, self._cause, self._steps, used, updates))

    @under_lock
    def subscribe(self, every_steps: int = 0) -> Subscription:
        """A subscription told of each applied mutation (or every `every_steps` Steps)."""
        subscription = Subscription(every_steps, self._steps)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Without the model's lock (watch.Subscriptions says why)."""
        self._subscriptions.remove(subscription)

    @on_torch_thread
    def write(
        self,
        name: str,
        chain: IndexChain,
        value: TensorInput,
        *,
        replaced: Callable[[torch.Tensor], None] | None = None,
    ) -> int:
        """tensor[chain...] = value, for parameters and gradients; value broadcasts and casts.

        `replaced`: the caller gives `value` away (a tensor nothing else will touch). When it
        can stand for a whole parameter as it is (same dtype, shape, strides and device) and
        nothing but the parameter holds the parameter's memory, it becomes the parameter's
        memory instead of being copied into it (512 MiB: one copy fewer), and `replaced` gets
        the memory it replaces, which nothing reads any more.
        """
        kind, tensor, param = self._writable(name)
        if isinstance(value, FillSpec):
            # Before the fill is made: one of 2**28 values took 17 s and 3.6 GB to be refused.
            self.check_write(name, chain, value.shape)
        source = self._make(value, param.dtype, "value")
        whole = kind == "parameter" and not chain
        if replaced is not None and whole and self._adoptable(param, source, value):
            old = param.detach()  # a second handle on the memory the parameter lets go of
            param.data = source
            replaced(old)
            self._parameters_changed = True
            return self._bump()
        if kind == "gradient" and tensor is None:
            tensor = torch.zeros_like(param)
            fresh = True
        else:
            assert tensor is not None
            fresh = False
        target = writable_slot(tensor, chain, name, tuple(source.shape))
        check_holds(source, target.dtype, name)
        source = source.reshape(without_leading_ones(tuple(source.shape), target.dim()))
        if not source.dtype.is_floating_point and param.dtype.is_floating_point:
            source = source.to(param.dtype)
        with torch.no_grad():
            target.copy_(source)
        if fresh:
            param.grad = tensor
        if kind == "parameter":
            self._parameters_changed = True
        return self._bump()

    def _writable(self, name: str) -> tuple[Kind, torch.Tensor | None, torch.Tensor]:
        """_lookup's (kind, tensor, parameter) for a name write() takes; READ_ONLY for others."""
        kind, tensor, param = self._lookup(name)
        if param is None:
            what = _WHAT_IT_IS.get(kind) or f"the last Forward's {kind}"
            raise InvalidInput(
                f"{name!r} is {what}; only parameters and gradients can be written",
                reason="READ_ONLY",
            )
        if kind == "gradient" and not param.requires_grad:
            # Written, the next Step trained the frozen parameter, where the .proto says a
            # Step leaves it as it is (found by a review of the contract).
            owner = _owner(name)
            raise InvalidInput(
                f"{name!r} is the gradient of {owner}, which is frozen (requires_grad=False): "
                "a Step leaves a frozen parameter as it is, so no gradient of it is written; "
                f"write {owner} itself, or unfreeze it in the model to train it",
                reason="READ_ONLY",
            )
        return kind, tensor, param

    def check_write(self, name: str, chain: IndexChain, shape: Sequence[int]) -> None:
        """What write() would refuse of a value of `shape` for tensor[chain...], found before
        the value is made or has come in full: a SetTensorStream whose first chunk named a
        shape the selection cannot take ([16, 3, 3, 4] for conv1.weight) was refused only
        when the stream ended, its values all sent (found by a walkthrough of the contract).
        Its dtype is checked with its values, as they come. Without the lock, which would
        hold the upload behind a Forward or Step in progress (a review measured 17 of 64
        chunks received during a 2 s Forward, against all 64 without it): it reads names and
        shapes only, which change at a Reset alone, and write() checks again under it."""
        _, tensor, param = self._writable(name)
        self._check_size(shape, "value")
        # An absent gradient is written as zeros_like(param) makes it, in the strides it
        # takes (contiguous for a parameter made with `expand`).
        base = _gradient_layout(param) if tensor is None else tensor
        writable_slot(base, chain, name, tuple(shape))

    def check_input(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        """What forward() would refuse of an input of `shape` and `dtype`, found at a
        ForwardStream's first chunk rather than once every chunk has come (a walkthrough of
        the contract found [8, 3, 10, 9] refused only at the stream's end)."""
        self.spec.check_input_shape(tuple(shape))
        self.spec.check_input_dtype(dtype)

    def _adoptable(self, param: torch.Tensor, source: torch.Tensor, value: TensorInput) -> bool:
        """Whether `source` can become `param`'s memory: see write()."""
        if source is not value or source.dtype != param.dtype or source.device != param.device:
            return False  # converted or moved: already a copy
        if source.shape != param.shape or source.stride() != param.stride():
            return False  # a broadcast, or another layout
        memory = param.untyped_storage()
        if param.storage_offset() or memory.nbytes() != param.numel() * param.element_size():
            return False  # part of a larger block, which may hold other tensors
        # Nothing else may hold this memory: a tied parameter, a buffer or a module's cached
        # view over it, an activation that views it (a module that returns its parameter), the
        # graph of a Forward not yet backpropagated. Those must go on seeing what is written,
        # so they are written through. torch counts the memory's holders: the parameter and
        # `memory` make two. Without that count (a private function), always copy.
        holders = getattr(torch._C, "_storage_Use_Count", None)
        return holders is not None and holders(memory._cdata) == 2

    @on_torch_thread
    def fill_parameters(self, value: float, names: Sequence[str] = ()) -> tuple[int, list[str]]:
        """p.data.fill_(value) for the named parameters, or all of them."""
        params = self.parameters
        chosen = list(dict.fromkeys(names)) or list(params)  # each once, as first named
        scalars: dict[str, float | int] = {}  # each value as its parameter's fill_ takes it
        for name in chosen:
            check_name(name, self.example_name, self.max_name_chars)
            if name not in params and name in self.names():
                raise InvalidInput(
                    f"{name!r} is not a parameter: FillParameters fills parameters only "
                    "(SetTensor writes a gradient)",
                    reason="NOT_A_PARAMETER",
                )
            if name not in params:
                raise self._unknown(name)
            # Every parameter checked before any changes: a float16 parameter was changed
            # after another of the same call.
            scalars[name], why = scalar_for(value, params[name].dtype)
            if why:
                dtype = dtype_name(params[name].dtype)
                raise InvalidInput(
                    f"{value!r} does not fit {name}'s dtype {dtype}: {why}", reason="BAD_VALUE"
                )
        with torch.no_grad():
            for name in chosen:
                params[name].fill_(scalars[name])
        self._parameters_changed = True
        return self._bump(), chosen

    @under_lock
    def list_tensors(self) -> Listing:
        """Every name GetTensor reads, with kind, dtype, shape and whether it exists now."""
        infos: list[TensorInfo] = []
        for name in self.names():
            kind, t, param = self._lookup(name, asking=False)
            if t is not None:
                # A module output's as a read of it says (kept detached, it has none itself).
                source = self._activations_tracked.get(name, t) if kind == "activation" else t
                infos.append(
                    TensorInfo(name, kind, t.dtype, tuple(t.shape), True, source.requires_grad)
                )
                continue
            infos.append(TensorInfo(name, kind, self._absent_dtype(name, kind, param), (), False))
        return Listing(
            self._version, self.spec.name, str(self.device), self._settings, infos, self.spec
        )

    def _absent_dtype(self, name: str, kind: str, param: torch.Tensor | None) -> torch.dtype:
        """What an absent tensor will hold once present: a Forward's input is made in the
        model's input dtype (it was listed float32 for a float16 or bfloat16 model); a
        parameter's gradient, last change and optimizer state (but Adam's step count) in
        the parameter's (a float16 one's delta was listed float32: found by a review)."""
        if name == "input":
            return self.spec.input_dtype
        if name == "target":
            return self._target_dtype
        if kind in ("output", "loss", "activation"):
            # As a pass will make them (a float16 model's were listed float32 until its
            # first pass: found by a review of served models); a module output's is a guess.
            return self._computes
        if param is None and kind == "delta":
            param = self.parameters[name.removesuffix(DELTA_SUFFIX)]
        if param is None and kind == "optimizer_state":
            owner, key = self._optimizer_state(name) or ("", "step")
            param = None if key == "step" else self.parameters[owner]
        return torch.float32 if param is None else param.dtype

    # --- whole-state changes -------------------------------------------------------

    @on_torch_thread
    def reset(self, seed: int | None = None) -> int:
        """A new model, PyTorch's default initialisation (seeded if asked), and a new optimizer."""
        # Built on the host beside the old one (on a GPU, built there and then moved): the
        # host's memory, on every device.
        pass_memory.check_model(
            "a Reset's new model, built beside the one it replaces,",
            self.model_bytes,
            "free memory on the host (close sessions), or make a new session instead",
            host_memory.available_bytes,
        )
        with self._device_memory("reset"):
            model, state = self._build_model(seed)
        self._optimizer = optimizers.build(model.parameters(), self._settings)
        self._adopt(model)
        self._random_state = state
        self._clear_forward()
        return self._bump()

    @under_lock
    def set_optimizer(
        self, settings: OptimizerSettings, keep_state: bool = False, *, kind_given: bool = True
    ) -> tuple[int, OptimizerSettings]:
        """Replaces the optimizer; its state (momentum, Adam's moments) starts afresh, and
        the settings left None take their defaults. With `keep_state`, changes the settings
        given (those not None) in the optimizer in place instead, as assigning to torch's
        param_groups does: the others keep their values, and the optimizer keeps its state;
        without `kind_given`, settings.kind is taken to be the kind in place. Returns the
        version and the settings in force."""
        if not keep_state:
            check_settings_kind(settings)
            resolved = settings.resolved()
            self._optimizer = optimizers.build(self._model.parameters(), resolved)
            self._settings = resolved
            return self._bump(), resolved
        current = self._settings
        if not kind_given:  # here, under the lock, where no other call can change the kind
            settings = dataclasses.replace(settings, kind=current.kind)
        if settings.kind != current.kind:
            raise InvalidInput(
                f"the optimizer is {KIND_NAMES[current.kind]}, and keep_state "
                f"(--keep-state) changes its settings in place: {KIND_NAMES[settings.kind]} "
                "needs a new optimizer (without keep_state, its state starts afresh)",
                reason="BAD_OPTIMIZER",
            )
        check_settings_kind(settings, in_place=True)
        given = {
            f.name: getattr(settings, f.name)
            for f in dataclasses.fields(settings)
            if f.name != "kind" and getattr(settings, f.name) is not None
        }
        merged = dataclasses.replace(current, **given)
        # An optimizer made with the merged settings, on a stand-in parameter: torch's own
        # checks refuse what a new optimizer would (nesterov without momentum), before
        # anything changed, and its group holds every setting as a new optimizer's would
        # (SGD's foreach follows nesterov), to copy into the groups in place.
        try:
            made = optimizers.build([torch.zeros(1, requires_grad=True)], merged)
        except InvalidInput as err:
            kept = [
                f"{f.name}={getattr(current, f.name)}"
                for f in dataclasses.fields(current)
                if f.name not in given and f.name != "kind"
                if getattr(current, f.name) is not None
            ]
            raise InvalidInput(
                f"{err.message}; keep_state (--keep-state) keeps the settings not given "
                f"({', '.join(kept)}): give those that must change too, in the same call",
                reason="BAD_OPTIMIZER",
            ) from err
        settings_made = {k: v for k, v in made.param_groups[0].items() if k != "params"}
        for group in self._optimizer.param_groups:
            group.update(settings_made)
        self._optimizer.defaults.update(made.defaults)
        self._settings = merged
        return self._bump(), merged

    # --- checkpoints ----------------------------------------------------------------

    @on_torch_thread
    def save(
        self, path: Path, keep_free: bool = False, began: Callable[[], None] | None = None
    ) -> checkpoint.Saved:
        """Writes parameters, gradients, buffers, optimizer state, version and the count of
        Steps to `path` (safetensors); returns the version saved and the file's size.
        `keep_free`: a caller's save, refused where it would leave the disk nearly full
        (checkpoint.py).
        `began`: called as the save begins, once the call running before it has ended."""
        if began is not None:
            began()
        written = checkpoint.save(
            path,
            version=self._version,
            model=self.spec.name,
            optimizer=self._optimizer,
            settings=self._settings,
            parameters=self._parameters,
            buffers=self._saved_buffers(),
            random=None
            if self._random_state is None
            else random_stream.for_checkpoint(self._random_state),
            keep_free=keep_free,
            steps=self._steps,
        )
        return checkpoint.Saved(self._version, written)

    def _saved_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers a checkpoint keeps: those PyTorch keeps in a state_dict, so not one a
        module registered as not persistent (a table it can make again), of any dtype (a
        complex one too, which the wire does not carry), but one that views the same values
        in several places (a stride of 0, as `expand` makes): a load cannot write to it, and
        refused it halfway through, the parameters already replaced (found by a review)."""
        return {name: b for name, b in self._persistent_buffers().items() if no_repeats(b)}

    def _persistent_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers a state_dict keeps: all but those registered as not persistent."""
        persistent = self._model.state_dict(keep_vars=True)
        return {name: b for name, b in self._model.named_buffers() if name in persistent}

    def _registered_in_forward(self, names: Iterable[str]) -> bool | None:
        """Whether a forward pass registers buffers `names`, which the model lacks now, from
        a pass on zeros of [2, *sample_shape] on a meta copy of it (`meta_copy`: nothing of
        the model's changes): True when it did, before it ended or failed (a model that
        makes its buffer on the CPU, not the input's device, fails on meta tensors after);
        False when it ran to its end without; None when it failed first: no telling."""
        try:
            model = meta_copy(self._model, _kept_output)
        except Exception as err:
            log.debug("no meta copy to see the buffers a pass registers: %s", err)
            return None
        before = {name for name, _ in model.named_buffers()}
        ran = True
        try:
            self._forward_on_meta(model, [2, *self.spec.sample_shape], self.spec.input_dtype)
        except Exception as err:
            log.debug("a pass on meta tensors failed, looking for buffers it registers: %s", err)
            ran = False
        made = {name for name, _ in model.named_buffers()} - before
        if set(names) <= made:
            return True
        return False if ran else None

    def _could_register(self, name: str) -> bool:
        """Whether buffer `name` ("norm.positions") names nothing yet on a module the model
        has: one it could register later, as a model does in its first forward pass, and a
        load can register now."""
        path, _, key = name.rpartition(".")
        try:
            module = self._model.get_submodule(path)
        except AttributeError:
            return False
        return key.isidentifier() and not hasattr(module, key)

    @on_torch_thread
    def load(self, path: Path) -> int:
        """Restores what `save` wrote, version included, as a server does at start (`_load`
        says what is refused); the version."""
        self._version = self._load(path)
        return self._version

    @on_torch_thread
    def restore(self, path: Path) -> tuple[int, int]:
        """`load` as a call that changes the state (LoadCheckpoint): the version moves on by
        one rather than back to the saved one, which watchers and a caller's expected
        version count on; (the version now, the version saved)."""
        try:
            saved = self._load(path)
        except (InvalidInput, OverLimit) as err:
            # Named as the caller named it: the path is the server's own business (a caller
            # was told where the server keeps its files: found by an integrator's probe).
            message = err.message.replace(str(path), f"checkpoint {checkpoint.name_of(path)!r}")
            if "replaced" in err.metadata:  # partly loaded: a change, which watchers hear of
                self._clear_forward()
                self._bump()
            else:
                message = checkpoint.at_runtime(message)
            raise type(err)(message, reason=err.reason, metadata=err.metadata) from err
        return self._bump(), saved

    def _load(self, path: Path) -> int:
        """Restores what `save` wrote but the version, which it returns. Refuses a checkpoint
        of another model, and one that does not fit in memory (OUT_OF_MEMORY). Gradients and
        optimizer state are made before anything is replaced, so a refusal while reading the
        file or making them changes nothing; the parameters and buffers are copied in place
        last, and on a GPU a copy that runs out of pinned memory partway could leave some
        replaced (`gradwire serve` stops then, serving nothing). Buffers a checkpoint lacks
        (one written before checkpoints kept them) are loaded as a new model makes them;
        buffers it holds that the model has not registered yet, and that a forward pass
        registers (a model that makes one when first needed), are registered where the pass
        would have (`_registered_in_forward`). The model's random stream goes on from the
        state the checkpoint holds for its type of device, where it holds one."""
        loaded, settings, random_state = self._read_checkpoint(path)
        with loaded:  # the file open for the parameters' values, closed however this ends
            return self._put_in(path, loaded, settings, random_state)

    def _put_in(
        self,
        path: Path,
        loaded: checkpoint.Loaded,
        settings: OptimizerSettings,
        random_state: random_stream.State | None,
    ) -> int:
        """`_load` of a checkpoint read (`_read_checkpoint`), each parameter's values read
        from its file as they are copied in (one at a time: the host never holds them all)."""
        fit = self._check_checkpoint(path, loaded, settings.kind)
        params, buffers = self._parameters, fit.buffers
        with self._device_memory(f"cannot load {path}"):
            # Everything new is on the device before anything is replaced.
            try:
                optimizer = optimizers.build(self._model.parameters(), settings)
            except InvalidInput as err:  # torch's own checks: a negative lr, say
                damaged = checkpoint.damaged(f"its {err.message}")
                raise InvalidInput(
                    f"cannot load {path}: {damaged}", reason="BAD_CHECKPOINT"
                ) from err
            # None for a frozen parameter: a checkpoint of the model trained whole, loaded
            # into one frozen for fine-tuning, would have its next Step train it.
            gradients = {
                name: staging.to_device(grad, self.device)
                for name, grad in loaded.gradients.items()
                if params[name].requires_grad
            }
            state = {
                name: {
                    k: staging.to_device(v, self.device)
                    if isinstance(v, torch.Tensor) and k != "step"
                    else v
                    for k, v in values.items()
                }
                for name, values in loaded.optimizer_state.items()
            }
            # Written before checkpoints kept buffers (or before the model registered one in
            # its forward pass): as a new model makes them, so that the load gives one state
            # whatever this trainer held (left as they were, a trained session's running
            # statistics met the checkpoint's weights: found by a review). The whole model is
            # built, on the CPU, for them: only for such a checkpoint.
            registered = {
                name: staging.to_device(loaded.buffers[name], self.device)
                for name in fit.registered
            }
            made = {}
            if fit.lacking:
                built, _ = self._build_model(self._seed, on_device=False)
                new = dict(built.named_buffers())
                made = {  # but one the model registers in its forward pass: as it is
                    name: staging.to_device(new[name], self.device)
                    for name in fit.lacking
                    if name in new
                }
        replaced: list[str] = []
        try:
            with self._device_memory(f"cannot load {path}"), torch.no_grad():
                for name, p in params.items():
                    staging.copy_into(p.detach(), self._saved_parameter(path, loaded, name))
                    replaced.append(name)
                for name, b in {**loaded.buffers, **made}.items():
                    if name in buffers and no_repeats(buffers[name]):
                        staging.copy_into(buffers[name], b)
                        replaced.append(name)
                for name, b in registered.items():
                    path_to, _, key = name.rpartition(".")
                    self._model.get_submodule(path_to).register_buffer(key, b)
                    replaced.append(name)
        except DomainError as err:
            if not replaced:
                raise
            # Some are replaced: saying "nothing changed" would be false (found by a review).
            shown = ", ".join(replaced[:5]) + (", ..." if len(replaced) > 5 else "")
            raise type(err)(
                f"{err.message}; {len(replaced)} parameters and buffers were replaced by then "
                f"({shown}), the rest, the gradients and the optimizer not: load again, or Reset",
                reason=err.reason,
                metadata={**err.metadata, "replaced": str(len(replaced))},
            ) from err
        for name, p in params.items():
            p.grad = gradients.get(name)
        for name, values in state.items():
            optimizer.state[params[name]] = values
        self._optimizer, self._settings = optimizer, settings
        if random_state is not None:
            self._random_state = random_state
        self._clear_forward()
        self._deltas = {}  # the last Step's change was made to the weights just replaced
        if loaded.steps is not None:  # a watch's count goes on from the saved state's
            self._steps = loaded.steps
        return loaded.version

    @staticmethod
    def _saved_parameter(path: Path, loaded: checkpoint.Loaded, name: str) -> torch.Tensor:
        """Parameter `name`'s values in the checkpoint at `path`, read now (Loaded.parameter):
        BAD_CHECKPOINT where they changed since the load checked them, OUT_OF_MEMORY where
        the host has not the room for them."""
        with _checkpoint_errors(path):
            values = loaded.parameter(name)
        return values

    def _read_checkpoint(
        self, path: Path
    ) -> tuple[checkpoint.Loaded, OptimizerSettings, random_stream.State | None]:
        """`path` read into the host's memory but for its parameters' values (read as they
        are copied in: checkpoint.Loaded), its optimizer settings and the random stream it
        holds for this device, each checked: BAD_CHECKPOINT, or OUT_OF_MEMORY where the host
        has not the room for it. The caller closes what it returns."""
        with suppress(OSError):  # a file that cannot be looked at: checkpoint.load says why
            # Read into the host's memory (on any device), beside the state it replaces: a
            # checkpoint the host has not the room for was the out-of-memory killer's
            # (pass_memory.py). Asked for whole, though a load now holds the file less its
            # parameters at once, and each parameter as it is copied in: a little over.
            pass_memory.check_model(
                f"loading {path}",
                path.stat().st_size,
                checkpoint.NO_MEMORY,
                host_memory.available_bytes,
            )
        with _checkpoint_errors(path):
            loaded = checkpoint.load(path)
            try:
                settings = checkpoint.optimizer_settings(loaded.settings)
                # The stream goes on from where the save left it (random_stream.py), when the
                # checkpoint holds one for this type of device.
                saved = (
                    loaded.random.get(self.device.type) if self._random_state is not None else None
                )
                random_state = (
                    None if saved is None else random_stream.from_checkpoint(saved, self.device)
                )
            except BaseException:
                loaded.close()
                raise
        return loaded, settings, random_state

    def _check_checkpoint(self, path: Path, loaded: checkpoint.Loaded, kind: str) -> _Fit:
        """Refuses (BAD_CHECKPOINT) a checkpoint of another model, or one holding
        gradients, optimizer state or buffers that match nothing in this one; what the load
        is then to do with buffers, checked against the model's own."""
        params = self._parameters
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        other = checkpoint.other_model(
            path, loaded.model, loaded.parameters, self.spec.name, params
        )
        if other:
            raise InvalidInput(other + checkpoint.OTHER_MODEL, reason="BAD_CHECKPOINT")
        # A checkpoint may hold an expanded buffer (saved before they were left out): known,
        # so not refused, but not copied into either (below).
        buffers = self._persistent_buffers()
        odd = [
            name for name, grad in loaded.gradients.items() if shapes.get(name) != tuple(grad.shape)
        ] + [name for name in loaded.optimizer_state if name not in params]
        unknown = [name for name in loaded.buffers if name not in buffers]
        odd_buffers = unknown + [
            f"{name} as {dtype_name(t.dtype)} {list(t.shape)}, where it is "
            f"{dtype_name(buffers[name].dtype)} {list(buffers[name].shape)}"
            for name, t in loaded.buffers.items()
            if name in buffers and (t.shape, t.dtype) != (buffers[name].shape, buffers[name].dtype)
        ]
        # Same model, one that registers a buffer in its forward pass, when first needed: a
        # new one lacks it, and the load registers it where the model would have. Refused,
        # a server could not start again from the state it saved at its stop (reviews). A
        # forward pass on a meta copy of the model says which it registers: registered on
        # the name alone, another model's (BatchNorm's statistics loaded into a LayerNorm)
        # were taken in (a review of that change).
        could = bool(unknown) and odd_buffers == unknown
        could = could and all(map(self._could_register, unknown))
        registers = self._registered_in_forward(unknown) if could else False
        if registers is None:  # the model does not run on meta tensors: cannot tell
            raise InvalidInput(
                f"{path} holds buffers this server's {self.spec.name} has not registered: "
                f"{', '.join(unknown)}. If the model registers them in its forward pass, "
                "when first needed, a new one lacks them: register them in its __init__ (or "
                "with persistent=False, to keep them out of checkpoints). Else it is another "
                f"model's: {checkpoint.OTHER_MODEL}",
                reason="BAD_CHECKPOINT",
            )
        if registers:
            odd_buffers = []
        if odd_buffers:
            raise InvalidInput(
                f"{path} holds buffers this server's {self.spec.name} does not have as they are "
                f"there: {', '.join(odd_buffers)}; {checkpoint.OTHER_MODEL}",
                reason="BAD_CHECKPOINT",
            )
        kept = [name for name, b in buffers.items() if no_repeats(b)]  # as `save` keeps them
        lacking = [name for name in kept if name not in loaded.buffers]
        odd += sorted(  # an integer parameter's: torch keeps it none
            name
            for name in {*loaded.gradients, *loaded.optimizer_state}
            if name in params and name not in self._learnable and name not in odd
        )
        if odd:
            raise InvalidInput(
                f"{path} holds gradients or optimizer state that match no floating-point "
                f"parameter: "
                f"{', '.join(odd)}",
                reason="BAD_CHECKPOINT",
            )
        unfit = checkpoint.unfit(loaded, params, kind)
        if unfit:
            raise InvalidInput(
                f"cannot load {path}: {checkpoint.damaged('it holds ' + '; '.join(unfit))}",
                reason="BAD_CHECKPOINT",
            )
        return _Fit(buffers, unknown if registers else [], lacking)

    @property
    def optimizer_settings(self) -> OptimizerSettings:
        return self._settings
