"""Host values onto the device in runs through two buffers (staging.py).

The runs' bookkeeping is the same on every device, so it is checked here on the CPU with
ordinary buffers; the pinned buffers and asynchronous copies of a GPU are checked in
tests/test_gpu.py, where there is one.
"""

from __future__ import annotations

import pytest
import torch

from gradwire import codec, wire
from gradwire._pb import trainer_pb2 as pb
from gradwire_server import convert, staging

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
    assembly = convert._OnDevice("value", 10_000, torch.device("cpu"), run_bytes=RUN)
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
    big = convert._OnDevice("value", 39, torch.device("cpu"), run_bytes=RUN)
    with pytest.raises(codec.ChunkLimitError, match="40 elements is over the limit of 39"):
        big.add(splits[0], SET_CHUNK, splits[0].message.chunk)
    short = convert._OnDevice("value", 100, torch.device("cpu"), run_bytes=RUN)
    short.add(splits[0], SET_CHUNK, splits[0].message.chunk)
    with pytest.raises(codec.CodecError, match="the stream ended after 16 of 40 values"):
        short.torch()
    skipped = convert._OnDevice("value", 100, torch.device("cpu"), run_bytes=RUN)
    skipped.add(splits[0], SET_CHUNK, splits[0].message.chunk)
    with pytest.raises(codec.CodecError, match="chunk at offset 32, expected 16"):
        skipped.add(splits[2], SET_CHUNK, splits[2].message.chunk)


def test_only_a_gpu_trainer_s_chunks_are_assembled_on_the_device() -> None:
    cpu = convert.Chunks("value", 100, convert.SpareMemory(), torch.device("cpu"))
    assert type(cpu._assembler) is codec.Assembler
    spare = convert.SpareMemory()
    spare.give_back(torch.empty(64, device="meta"))  # a device's memory is not kept
    assert spare._block is None
