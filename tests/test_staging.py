"""Host values onto the device in runs through two buffers (staging.py).

The runs' bookkeeping is the same on every device, so it is checked here on the CPU with
ordinary buffers; the pinned buffers and asynchronous copies of a GPU are checked in
tests/test_gpu.py, where there is one.
"""

from __future__ import annotations

import pytest
import torch

from gradwire_server import staging

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
