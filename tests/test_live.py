"""Streamed reads sent from live memory (live.py): no copy unless a mutation comes first, and
then every run still of the read's version."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gradwire
from gradwire import codec, wire
from gradwire._pb import trainer_pb2 as pb
from gradwire_server import convert
from gradwire_server.app import Running
from gradwire_server.convert import SpareMemory
from gradwire_server.errors import OverLimit
from gradwire_server.fills import FillSpec
from gradwire_server.live import LiveReads, StreamedRead
from gradwire_server.trainer import Trainer
from tests.background import eventually
from tests.test_streaming import CHUNK_PATH, lower_value_limit

ONES = FillSpec("ones", (4, 3, 10, 10))
LABELS = torch.tensor([0, 1, 2, 3])
LINEAR = "linear.weight"  # 64,000 float32 values


class CountedMemory(SpareMemory):
    """The server's spare memory, counting the copies taken from it."""

    def __init__(self) -> None:
        super().__init__()
        self.taken = 0
        self.shapes: list[tuple[int, ...]] = []
        self.given_back = 0

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        self.taken += 1
        self.shapes.append(shape)
        return super().take(shape, dtype, device)

    def give_back(self, tensor: torch.Tensor) -> None:
        self.given_back += 1
        super().give_back(tensor)


def runs(read: StreamedRead, step: int, start: int = 0) -> Iterator[torch.Tensor]:
    """Copies of the read's runs from `start` on, each made inside its run's block and
    handed out after it, as stream_chunks encodes them."""
    for offset in range(start, read.numel, step):
        with read.run(offset, min(step, read.numel - offset)) as host:
            copy = host.clone()
        yield copy


def read_all(read: StreamedRead, step: int, start: int = 0) -> torch.Tensor:
    return torch.cat(list(runs(read, step, start)))


def trained(trainer: Trainer) -> Trainer:
    """Gradients in place, so that every kind of mutation has something to change."""
    trainer.forward(ONES, LABELS)
    trainer.backward()
    return trainer


def test_a_read_nothing_interrupts_copies_nothing(trainer: Trainer) -> None:
    memory = CountedMemory()
    before = trainer.parameters[LINEAR].detach().clone().reshape(-1)
    selection, read = trainer.stream_read(LINEAR, (), memory)
    assert read is not None and selection.version == trainer.version
    assert selection.full_shape == (20, 3200)
    values = read_all(read, 1000)
    read.close()
    assert torch.equal(values, before)
    assert not read.copied
    assert memory.taken == 0 and memory.given_back == 0


def test_a_read_hands_out_views_of_the_live_tensor(trainer: Trainer) -> None:
    _, read = trainer.stream_read(LINEAR, (), CountedMemory())
    assert read is not None
    live = trainer.parameters[LINEAR]
    with read.run(1000, 10) as host:
        assert host.data_ptr() == live.reshape(-1)[1000:].data_ptr()
    read.close()


def mutations(tmp_path: Path) -> dict[str, Callable[[Trainer], Any]]:
    path = tmp_path / "checkpoint.safetensors"
    return {
        "step": lambda t: t.step(),
        "write whole": lambda t: t.write(LINEAR, (), torch.full((20, 3200), 7.0)),
        "write part": lambda t: t.write(LINEAR, [(slice(0, 1),)], torch.tensor(7.0)),
        "fill": lambda t: t.fill_parameters(7.0),
        "zero grads to zeros": lambda t: t.zero_grad(set_to_none=False),
        "backward": lambda t: (t.forward(ONES, LABELS), t.backward()),
        "train step": lambda t: t.train_step(ONES, LABELS, use=lambda s: s),
        "reset": lambda t: t.reset(5),
        "load": lambda t: (Trainer(device="cpu", seed=5).save(path), t.load(path)),
    }


MUTATIONS = list(mutations(Path()).keys())


@pytest.mark.parametrize("name", [LINEAR, "linear.weight.grad"])
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_mutation_first_copies_what_a_read_has_not_sent(
    trainer: Trainer, tmp_path: Path, mutation: str, name: str
) -> None:
    trained(trainer)
    memory = CountedMemory()
    _, tensor, _ = trainer._lookup(name)
    before = tensor.detach().clone().reshape(-1)
    selection, read = trainer.stream_read(name, (), memory)
    assert read is not None
    sent = []
    for run in runs(read, 1000):  # three runs sent before the mutation
        sent.append(run)
        if len(sent) == 3:
            break
    mutations(tmp_path)[mutation](trainer)
    assert trainer.version != selection.version  # a load restores an older version
    assert read.copied and memory.taken == 1
    # The whole selection's size, as the spare keeps it, though only the rest is copied.
    assert memory.shapes == [tuple(selection.full_shape or ())]
    rest = read_all(read, 1000, start=3000)
    assert torch.equal(torch.cat([*sent, rest]), before)
    read.close()
    assert memory.given_back == 1


class MarkedMemory(CountedMemory):
    """Spare memory whose blocks come filled with NaN, so that what a copy wrote into one
    shows: the blocks handed out are in `blocks`."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[torch.Tensor] = []

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        block = super().take(shape, dtype, device).fill_(math.nan)
        self.blocks.append(block)
        return block


def test_a_mutation_copies_only_the_rest_a_read_has_not_sent(trainer: Trainer) -> None:
    """The step that interrupts a read pays for the copy of what is left to send, not of
    the whole selection: the values already sent are not copied again, though the block
    is of the whole selection's size."""
    trained(trainer)
    before = trainer.parameters[LINEAR].detach().clone().reshape(-1)
    memory = MarkedMemory()
    _, read = trainer.stream_read(LINEAR, (), memory)
    assert read is not None
    sent = runs(read, 1000)
    for _ in range(3):  # three runs sent
        next(sent)
    trainer.fill_parameters(7.0)
    (block,) = memory.blocks
    copied = block.reshape(-1)
    assert torch.isnan(copied[:3000]).all()  # sent: not copied
    assert torch.equal(copied[3000:], before[3000:])
    read.close()


def test_a_mutation_copies_the_last_value_a_read_has_not_sent(trainer: Trainer) -> None:
    """One value left to send is a rest to copy like any other: left live, the read
    had neither the live tensor nor a copy to send it from."""
    trained(trainer)
    before = trainer.parameters[LINEAR].detach().clone().reshape(-1)
    _, read = trainer.stream_read(LINEAR, (), CountedMemory())
    assert read is not None
    with read.run(0, read.numel - 1) as host:
        sent = host.clone()
    trainer.fill_parameters(7.0)
    assert read.copied
    assert torch.equal(torch.cat([sent, read_all(read, 1, start=read.numel - 1)]), before)


def test_a_mutation_detaches_every_read_in_flight(trainer: Trainer) -> None:
    """Two streamed reads of one tensor open at once: the mutation copies the rest of
    each, not of one alone, and both still send the version they opened at."""
    trained(trainer)
    before = trainer.parameters[LINEAR].detach().clone().reshape(-1)
    reads = [trainer.stream_read(LINEAR, (), CountedMemory())[1] for _ in range(2)]
    trainer.fill_parameters(7.0)
    for read in reads:
        assert read is not None and read.copied
        assert torch.equal(read_all(read, 4096), before)
        read.close()
    assert len(trainer._live) == 0


def test_a_mutation_changes_the_live_tensor_but_not_the_read(trainer: Trainer) -> None:
    trained(trainer)
    _, read = trainer.stream_read(LINEAR, (), CountedMemory())
    assert read is not None
    before = trainer.parameters[LINEAR].detach().clone().reshape(-1)
    trainer.fill_parameters(7.0)
    assert torch.all(trainer.parameters[LINEAR] == 7.0)  # the model did change
    assert torch.equal(read_all(read, 4096), before)
    read.close()


def test_reads_between_runs_leave_a_read_live(trainer: Trainer, tmp_path: Path) -> None:
    trained(trainer)
    memory = CountedMemory()
    _, read = trainer.stream_read(LINEAR, (), memory)
    assert read is not None
    trainer.read(LINEAR, [(0,)])
    trainer.read("conv1.weight")  # a small read, on the caller's thread
    trainer.read_many([(LINEAR, ()), ("conv2.weight", ())], lambda s: s, lambda snap: snap)
    trainer.save(tmp_path / "kept.safetensors")
    trainer.stage(torch.ones(2, 3, 10, 10), "input")
    trainer.list_tensors()
    trainer.zero_grad()  # to None: sets attributes, changes no tensor's values
    assert not read.copied and memory.taken == 0
    read.close()


def test_a_strided_selection_is_copied_when_the_read_opens(trainer: Trainer) -> None:
    memory = CountedMemory()
    expected = trainer.parameters[LINEAR].detach()[:, ::2].clone().reshape(-1)
    _, read = trainer.stream_read(LINEAR, [(slice(None), slice(None, None, 2))], memory)
    assert read is not None and read.copied and memory.taken == 1
    trainer.fill_parameters(7.0)
    assert torch.equal(read_all(read, 999), expected)
    read.close()
    assert memory.given_back == 1


def test_an_absent_tensor_opens_no_read(trainer: Trainer) -> None:
    selection, read = trainer.stream_read("conv1.weight.grad", (), CountedMemory())
    assert read is None and selection.full_shape is None


def test_a_closed_read_is_no_longer_detached(trainer: Trainer) -> None:
    memory = CountedMemory()
    _, read = trainer.stream_read(LINEAR, (), memory)
    assert read is not None
    next(runs(read, 1000))
    read.close()  # the client went away mid-stream
    trainer.fill_parameters(7.0)
    assert memory.taken == 0 and not read.copied


def test_a_read_fully_sent_needs_no_copy_when_a_mutation_follows(trainer: Trainer) -> None:
    memory = CountedMemory()
    _, read = trainer.stream_read(LINEAR, (), memory)
    assert read is not None
    read_all(read, 64_000)
    trainer.fill_parameters(7.0)  # before the stream's end was seen
    assert memory.taken == 0
    read.close()


class LandsFirst:
    """The trainer's lock, with a mutation that lands while a run waits for it: the
    mutation (detaching every read, then changing `values`) takes the lock first, once."""

    def __init__(self, reads: LiveReads, values: torch.Tensor) -> None:
        self._lock = threading.RLock()
        self._reads, self._values = reads, values
        self.landed = False

    def __enter__(self) -> None:
        self._lock.acquire()
        if not self.landed:
            self.landed = True
            self._reads.detach_all()
            self._values.fill_(7.0)

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_a_run_that_waited_for_the_lock_behind_a_mutation_comes_from_the_copy() -> None:
    """A run looks whether its read is still live before it takes the lock, and again
    under it: a mutation can detach the read in between, and the run is then sent from
    the copy, of the read's version."""
    values = torch.arange(5000, dtype=torch.float32)
    before = values.clone()
    reads = LiveReads()
    lock = LandsFirst(reads, values)
    memory = CountedMemory()
    read = StreamedRead(values, lock, memory, reads)
    assert torch.equal(read_all(read, 1000), before)
    assert lock.landed and memory.taken == memory.given_back == 1
    assert torch.all(values == 7.0)


def test_reads_of_every_dtype_come_out_exactly() -> None:
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64):
        values = torch.arange(5000).to(dtype)
        read = StreamedRead(values, threading.RLock(), CountedMemory(), LiveReads())
        assert torch.equal(read_all(read, 777), values)
        read.close()


# --- through the server ------------------------------------------------------------------


def test_a_stream_its_reader_cancels_leaves_the_trainer_and_copies_nothing(
    client: gradwire.Client, server: Running, trainer: Trainer
) -> None:
    """A reader that cancels after its first chunk: its read is closed as the stream ends,
    so a mutation after it copies nothing into the spare memory for a reader long gone
    (a read left open held its place among the live reads, and the next Step copied the
    rest of the tensor for it, and kept the copy)."""
    server.servicer.spare = memory = CountedMemory()
    request = pb.GetTensorRequest(name=LINEAR, chunk_bytes=4000)  # 64 chunks of 1,000
    stream = client._methods["GetTensorStream"](request, timeout=30)
    next(stream)
    assert len(trainer._live) == 1
    stream.cancel()
    eventually(lambda: len(trainer._live) == 0, "the cancelled stream's read is still open")
    client.fill_parameters(7.0)
    assert memory.taken == 0


def test_a_step_while_a_client_holds_a_stream_open_leaves_it_one_version(
    client: gradwire.Client, trainer: Trainer
) -> None:
    """A reader stops after its first chunk; steps run on; the rest is still the first
    version's values, and the steps did not wait for the reader."""
    client.fill_parameters(0.0)
    start = client.set(f"{LINEAR}.grad", -1.0)  # each Step (lr 1) adds 1 to every weight
    request = pb.GetTensorRequest(name=LINEAR, chunk_bytes=4000)  # 64 chunks of 1,000
    stream = client._methods["GetTensorStream"](request, timeout=30)
    first = next(stream)
    for _ in range(3):
        client.step()  # returns: the open stream holds nothing up
    assert trainer.version == start + 3
    splits = [wire.split(data, pb.GetTensorChunk) for data in [first, *stream]]
    assert len(splits) == 64
    assert {split.message.version for split in splits} == {start}
    assembler = codec.Assembler(LINEAR)
    for split in splits:
        assembler.add(split, CHUNK_PATH, split.message.chunk)
    values = assembler.numpy()
    assert np.all(values == 0.0), np.unique(values)
    assert np.all(client.get(LINEAR) == 3.0)


def test_the_last_run_ends_the_read_and_gives_back_its_copy(trainer: Trainer) -> None:
    memory = CountedMemory()
    _, read = trainer.stream_read(LINEAR, (), memory)
    assert read is not None
    first = next(runs(read, 1000))
    trainer.fill_parameters(7.0)  # detached: the rest comes from a copy
    rest = read_all(read, 1000, start=1000)
    assert memory.taken == 1 and memory.given_back == 1  # before the stream's end is seen
    assert len(trainer._live) == 0
    read.close()  # the stream's own close, after: nothing more to do
    assert memory.given_back == 1
    assert torch.cat([first, rest]).numel() == 64_000


def test_a_live_read_leaves_the_trainer_once_its_last_run_is_out(trainer: Trainer) -> None:
    _, read = trainer.stream_read(LINEAR, (), CountedMemory())
    assert read is not None and len(trainer._live) == 1
    read_all(read, 64_000)
    assert len(trainer._live) == 0


class NoMemory(CountedMemory):
    """Spare memory that has none to give, as a server out of memory: torch's error by
    default, or the one given."""

    def __init__(self, error: type[Exception] = RuntimeError) -> None:
        super().__init__()
        self.error = error

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        self.taken += 1
        raise self.error(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate\n"
            "Exception raised from alloc_cpu at c10/core/impl/alloc_cpu.cpp:117"
        )


@pytest.mark.parametrize("error", [RuntimeError, MemoryError])  # torch's, and Python's
def test_no_memory_for_the_copy_fails_the_read_not_the_mutation(
    trainer: Trainer, error: type[Exception]
) -> None:
    _, read = trainer.stream_read(LINEAR, (), NoMemory(error))
    assert read is not None
    next(runs(read, 1000))
    version, _ = trainer.fill_parameters(7.0)  # goes ahead
    assert version == trainer.version and torch.all(trainer.parameters[LINEAR] == 7.0)
    with pytest.raises(OverLimit, match="could not copy the rest") as caught:
        read_all(read, 1000, start=1000)
    assert caught.value.reason == "OUT_OF_MEMORY"
    # Why, in the allocator's first line alone: not torch's trace after it.
    assert "(DefaultCPUAllocator: can't allocate memory: you tried to allocate); " in str(
        caught.value
    )
    assert "alloc_cpu.cpp" not in str(caught.value)
    read.close()
    assert len(trainer._live) == 0


def test_a_stream_whose_copy_fails_ends_resource_exhausted(
    client: gradwire.Client, server: Running
) -> None:
    server.servicer.spare = NoMemory()
    request = pb.GetTensorRequest(name=LINEAR, chunk_bytes=4000)
    stream = client._stream("GetTensorStream", request)
    next(stream)
    client.fill_parameters(7.0)
    with pytest.raises(gradwire.errors.ResourceExhausted) as caught:
        list(stream)
    assert caught.value.reason == "OUT_OF_MEMORY"
    assert "read it again" in str(caught.value)
    assert np.all(client.get(LINEAR) == 7.0)  # the server carries on


def cut_short(monkeypatch: pytest.MonkeyPatch, trainer: Trainer, times: int) -> list[int]:
    """Lands a mutation (every parameter filled with the count so far) after the first chunk
    of each of the server's first `times` streamed reads, as a step landing mid-read would;
    the versions of the reads that got that far are listed in the list returned."""
    real = convert.stream_chunks
    reads: list[int] = []

    def stream_chunks(selection: Any, read: Any, chunk_bytes: int) -> Iterator[bytes]:
        chunks = real(selection, read, chunk_bytes)
        yield next(chunks)
        reads.append(selection.version)
        if len(reads) <= times:
            trainer.fill_parameters(float(len(reads)))
        yield from chunks

    monkeypatch.setattr(convert, "stream_chunks", stream_chunks)
    return reads


@pytest.fixture
def streamed(
    client: gradwire.Client, server: Running, monkeypatch: pytest.MonkeyPatch
) -> gradwire.Client:
    """A client whose reads of linear.weight stream, in 64 chunks, from a server that has
    no memory to keep a read at its version when a mutation lands mid-read."""
    lower_value_limit(monkeypatch)
    client.chunk_bytes = 4000
    server.servicer.spare = NoMemory()
    return client


def test_a_read_cut_short_by_a_mutation_is_read_again(
    streamed: gradwire.Client, trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = cut_short(monkeypatch, trainer, times=1)
    read = streamed.read(LINEAR)
    assert len(reads) == 2  # the first ended OUT_OF_MEMORY after its first chunk
    assert read.version == trainer.version == reads[1]
    assert read.value is not None and read.value.shape == (20, 3200)
    assert np.all(read.value == 1.0)  # all of the second read's version


def test_reading_again_into_out_fills_it_from_one_read(
    streamed: gradwire.Client, trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = cut_short(monkeypatch, trainer, times=2)
    out = np.full((20, 3200), -5.0, dtype=np.float32)
    read = streamed.read(LINEAR, out=out)
    assert len(reads) == 3 and read.value is out
    assert np.all(out == 2.0)


def test_a_read_cut_short_every_time_fails_after_the_retries(
    streamed: gradwire.Client, trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = cut_short(monkeypatch, trainer, times=100)
    streamed.retries = 1
    with pytest.raises(gradwire.errors.ResourceExhausted) as caught:
        streamed.read(LINEAR)
    assert caught.value.reason == "OUT_OF_MEMORY" and "read it again" in str(caught.value)
    assert len(reads) == 2  # the first attempt and one retry
    streamed.retries = 0
    with pytest.raises(gradwire.errors.ResourceExhausted):
        streamed.read(LINEAR)
    assert len(reads) == 3
    streamed.retries = -1  # none, as 0: one attempt
    with pytest.raises(gradwire.errors.ResourceExhausted):
        streamed.read(LINEAR)
    assert len(reads) == 4


def test_no_memory_to_open_a_read_is_not_read_again(
    streamed: gradwire.Client, server: Running
) -> None:
    """A strided selection is copied when its read opens: without memory for that, the read
    fails before its first chunk, and reading again at once would not help."""
    with pytest.raises(gradwire.errors.ResourceExhausted) as caught:
        streamed.read(f"{LINEAR}[:, ::2]")  # 128,000 bytes: over the lowered limit
    assert caught.value.reason == "OUT_OF_MEMORY"
    assert isinstance(server.servicer.spare, NoMemory) and server.servicer.spare.taken == 1
