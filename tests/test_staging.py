"""Host values onto the device in runs through two buffers (staging.py).

The runs' bookkeeping is the same on every device, so it is checked here on the CPU with
ordinary buffers; the pinned buffers and asynchronous copies of a GPU are checked in
tests/test_gpu.py, where there is one.
"""

from __future__ import annotations

import threading
from typing import cast

import pytest
import torch

from gradwire import codec, wire
from gradwire._pb import trainer_pb2 as pb
from gradwire_server import convert, staging
from gradwire_server.errors import OverLimit
from gradwire_server.trainer import Trainer

RUN = 64  # bytes: 16 float32 values a run


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 32, 33, 1000])
def test_every_value_arrives_whatever_the_runs(count: int) -> None:
    source = torch.arange(count, dtype=torch.float32)
    out = torch.full((count,), -1.0)
    staging.copy_in_runs(source, out, RUN, pinned=False)
    assert torch.equal(out, source)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.bool]
)
def test_each_dtype_arrives_bit_for_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    source = torch.randint(0, 2 if dtype == torch.bool else 1000, (7, 13), generator=gen).to(dtype)
    out = torch.empty_like(source)
    staging.copy_in_runs(source, out, RUN, pinned=False)
    assert torch.equal(out, source)


def test_a_strided_source_arrives_in_order() -> None:
    source = torch.arange(40 * 30, dtype=torch.float32).reshape(40, 30).t()[::2]
    assert not source.is_contiguous()
    out = torch.empty(source.shape)
    staging.copy_in_runs(source, out, RUN, pinned=False)
    assert torch.equal(out, source)


def test_out_must_match_the_source() -> None:
    with pytest.raises(ValueError, match="contiguous `out` of the source's shape and dtype"):
        staging.copy_in_runs(torch.zeros(4), torch.zeros(5), RUN, pinned=False)
    with pytest.raises(ValueError, match="contiguous"):
        staging.copy_in_runs(torch.zeros(4, 4), torch.zeros(4, 4).t(), RUN, pinned=False)
    with pytest.raises(ValueError, match="shape and dtype"):  # not converted on the way
        staging.copy_in_runs(torch.zeros(4, dtype=torch.float64), torch.zeros(4), RUN, False)
    with pytest.raises(ValueError, match="Runs writes into a contiguous tensor"):
        staging.Runs(torch.zeros(4, 4).t(), RUN, pinned=False)


def test_each_host_buffer_holds_one_run_at_most() -> None:
    """Two buffers of a run each, not of the whole value: pinned, a 512 MiB value's would
    have taken as much page-locked memory again, twice."""
    out = torch.empty(1000)
    runs = staging.Runs(out, RUN, pinned=False)
    runs.write(0, torch.arange(1000.0))
    assert [b.numel() for b in runs._buffers] == [RUN // 4] * 2
    assert torch.equal(out, torch.arange(1000.0))
    small = staging.Runs(torch.empty(5), RUN, pinned=False)
    small.write(0, torch.arange(5.0))
    assert [b.numel() for b in small._buffers] == [5, 5]  # no more than the value


def test_on_the_cpu_a_value_is_not_copied() -> None:
    # Writes of a whole parameter keep the memory they arrived in (Trainer.write): no copy.
    value = torch.zeros(1 << 20)
    assert staging.to_device(value, torch.device("cpu")) is value


def test_copy_into_writes_through_on_the_cpu() -> None:
    out = torch.zeros(3, 4)
    view = out[1]
    staging.copy_into(out, torch.ones(3, 4))
    assert torch.equal(out, torch.ones(3, 4))
    assert torch.equal(view, torch.ones(4))  # the same memory, written in place


# --- a streamed value assembled where the trainer keeps it (convert._OnDevice) -----------


def chunk_splits(value: torch.Tensor, chunk_bytes: int) -> list[wire.Split[pb.SetTensorChunk]]:
    """SetTensorChunk messages as a client sends them, received and split as the server
    splits them."""
    splits = []
    for dtype, flat, offset, shape in codec.chunks(value, chunk_bytes):
        chunk = pb.TensorChunk.FromString(wire.join(codec.chunk_pieces(flat, dtype, offset, shape)))
        data = pb.SetTensorChunk(name="x", chunk=chunk).SerializeToString()
        splits.append(wire.split(data, pb.SetTensorChunk))
    return splits


SET_CHUNK = ((pb.SetTensorChunk.DESCRIPTOR.fields_by_name["chunk"].number, 0),)


def _on_cpu(max_elements: int) -> convert._OnDevice:
    """The device assembly with the CPU standing in for the GPU, in runs of RUN bytes."""

    def allocate(shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    return convert._OnDevice("value", max_elements, torch.device("cpu"), allocate, run_bytes=RUN)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.int64, torch.bfloat16, torch.bool]
)
@pytest.mark.parametrize("chunk_bytes", [24, 64, 200])  # runs of 64 bytes: under, at, over
def test_chunks_cross_in_runs_as_they_come_and_arrive_bit_for_bit(
    dtype: torch.dtype, chunk_bytes: int
) -> None:
    gen = torch.Generator().manual_seed(1)
    drawn = torch.randn(17, 13, generator=gen) * 100
    value = drawn > 0 if dtype == torch.bool else drawn.to(dtype)
    assembly = _on_cpu(10_000)
    splits = chunk_splits(value, chunk_bytes)
    assert len(splits) > 1
    for split in splits:
        assembly.add(split, SET_CHUNK, split.message.chunk)
    out = assembly.torch()
    assert out.dtype == dtype and out.shape == value.shape
    assert torch.equal(out.view(-1).view(torch.uint8), value.view(-1).view(torch.uint8))


def test_an_assembly_on_the_device_refuses_what_the_host_s_refuses() -> None:
    value = torch.arange(40, dtype=torch.float32)
    splits = chunk_splits(value, 64)
    big = _on_cpu(39)
    with pytest.raises(codec.ChunkLimitError, match="40 elements is over the limit of 39"):
        big.add(splits[0], SET_CHUNK, splits[0].message.chunk)
    short = _on_cpu(100)
    short.add(splits[0], SET_CHUNK, splits[0].message.chunk)
    with pytest.raises(codec.CodecError, match="the stream ended after 16 of 40 values"):
        short.torch()
    skipped = _on_cpu(100)
    skipped.add(splits[0], SET_CHUNK, splits[0].message.chunk)
    with pytest.raises(codec.CodecError, match="chunk at offset 32, expected 16"):
        skipped.add(splits[2], SET_CHUNK, splits[2].message.chunk)


def test_an_assembly_on_the_device_refuses_what_the_host_s_refuses_before_allocating() -> None:
    value = torch.arange(40, dtype=torch.float32)
    splits = chunk_splits(value, 64)
    made: list[tuple[int, ...]] = []

    def allocate(shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
        made.append(shape)
        return torch.empty(shape, dtype=dtype)

    late = convert._OnDevice("value", 100, torch.device("cpu"), allocate, run_bytes=RUN)
    with pytest.raises(codec.CodecError, match="chunk at offset 16, expected 0"):
        late.add(splits[1], SET_CHUNK, splits[1].message.chunk)
    assert made == []  # a malformed first chunk takes no device memory
    with pytest.raises(codec.CodecError, match="torch\\(\\) only"):
        _on_cpu(100).numpy()


def test_running_out_of_pinned_memory_is_over_limit_not_internal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    splits = chunk_splits(torch.arange(40, dtype=torch.float32), 64)
    assembly = _on_cpu(100)
    real_empty = torch.empty

    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        if kwargs.get("pin_memory") is not None:  # the runs' buffers, made at the first run
            raise RuntimeError("CUDA error: out of memory")
        return real_empty(*args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(OverLimit, match="value: out of memory on cpu") as caught:
        assembly.add(splits[0], SET_CHUNK, splits[0].message.chunk)
    assert caught.value.reason == "OUT_OF_MEMORY"


def test_a_trainer_s_stream_buffer_that_does_not_fit_is_over_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer = Trainer(seed=0)
    with pytest.raises(OverLimit) as too_many:
        trainer.stream_buffer((trainer.max_elements + 1,), torch.float32, "value")
    assert too_many.value.reason == "TOO_MANY_ELEMENTS"

    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(OverLimit, match="value: out of memory on cpu") as caught:
        trainer.stream_buffer((4,), torch.float32, "value")
    assert caught.value.reason == "OUT_OF_MEMORY"
    monkeypatch.undo()
    trainer.close()


def test_only_a_gpu_trainer_s_chunks_are_assembled_on_the_device() -> None:
    trainer = Trainer(seed=0)
    cpu = convert.Chunks("value", 100, convert.SpareMemory(), trainer)
    assert type(cpu._assembler) is codec.Assembler
    cpu.release()
    trainer.close()
    spare = convert.SpareMemory()
    spare.give_back(torch.empty(64, device="meta"))  # a device's memory is not kept
    assert spare._block is None


def test_a_gpu_trainer_assembles_one_stream_on_the_device_at_a_time() -> None:
    # Each holds its whole size on the device while it arrives; a second at the same time
    # arrives on the host. Made without a GPU: no chunk is added.
    class OnCuda:
        device = torch.device("cuda")
        max_elements = 100
        device_assemblies = threading.BoundedSemaphore(1)

        def stream_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
            raise AssertionError("no chunk is added here")

    trainer = cast(Trainer, OnCuda())
    first = convert.Chunks("value", 100, None, trainer)
    second = convert.Chunks("value", 100, None, trainer)
    assert isinstance(first._assembler, convert._OnDevice)
    assert type(second._assembler) is codec.Assembler
    first.release()
    first.release()  # however the stream ended, and again: one slot given back
    second.release()
    third = convert.Chunks("value", 100, None, trainer)
    assert isinstance(third._assembler, convert._OnDevice)
    third.release()
    assert trainer.device_assemblies.acquire(blocking=False)
