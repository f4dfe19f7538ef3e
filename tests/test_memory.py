"""The client's kept memory (memory.py): the last large array's memory comes back for the next
read of its size only once nothing can reach that array any more."""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import pytest
import torch

import gradwire
from gradwire import memory
from gradwire.memory import KeptMemory
from gradwire_server import servicer
from gradwire_server.trainer import Trainer
from tests.test_streaming import BFLOAT16_WEIGHT, serving

SHAPE = (512, 1024)  # 2 MiB of float32: over KEEP_MIN_BYTES


def address(array: np.ndarray[Any, Any]) -> int:
    return int(array.ctypes.data)


def test_a_dropped_array_s_memory_comes_back_for_the_same_size() -> None:
    kept = KeptMemory()
    first = kept.empty(SHAPE, np.dtype(np.float32))
    where = address(first)
    del first
    again = kept.empty(SHAPE, np.dtype(np.float32))
    assert address(again) == where
    assert again.shape == SHAPE and again.dtype == np.float32
    assert again.flags.writeable and again.flags.c_contiguous
    assert kept.kept_bytes == again.nbytes


@pytest.mark.parametrize(
    "keep",
    [
        lambda a: a,
        lambda a: a[3:],
        lambda a: a.reshape(-1)[::2],
        lambda a: a.view(np.int32),
        lambda a: torch.from_numpy(a),
        lambda a: memoryview(a),
        lambda a: np.asarray(torch.from_numpy(a[1])),
    ],
    ids=["array", "slice", "strided view", "dtype view", "torch tensor", "memoryview", "chain"],
)
def test_memory_still_reachable_is_never_handed_out_again(keep: Any) -> None:
    kept = KeptMemory()
    first = kept.empty(SHAPE, np.dtype(np.float32))
    first[...] = 1.0
    holder = keep(first)
    seen = np.array(np.asarray(holder), copy=True)
    del first
    gc.collect()
    second = kept.empty(SHAPE, np.dtype(np.float32))
    second[...] = 2.0  # must not show through `holder`
    assert np.array_equal(np.asarray(holder), seen)
    del holder
    # Now the second array's memory is the one kept; the first's went with its holder.
    where = address(second)
    del second
    assert address(kept.empty(SHAPE, np.dtype(np.float32))) == where


def test_another_size_takes_fresh_memory_and_keeps_that() -> None:
    kept = KeptMemory()
    dropped = kept.empty(SHAPE, np.dtype(np.float32))
    del dropped
    other = kept.empty((SHAPE[0] * 2, SHAPE[1]), np.dtype(np.float32))
    assert kept.kept_bytes == other.nbytes
    del other
    # A smaller size after a larger one: fresh memory of its own size, not the larger block.
    smaller = kept.empty(SHAPE, np.dtype(np.float32))
    assert smaller.shape == SHAPE and kept.kept_bytes == smaller.nbytes


def test_small_arrays_are_numpy_s_own() -> None:
    kept = KeptMemory()
    small = kept.empty((10,), np.dtype(np.float32))
    assert small.flags.owndata and kept.kept_bytes == 0


def test_an_array_of_exactly_keep_min_bytes_is_kept_and_one_byte_less_is_not() -> None:
    kept = KeptMemory()
    under = kept.empty((memory.KEEP_MIN_BYTES - 1,), np.dtype(np.uint8))
    assert under.flags.owndata and kept.kept_bytes == 0
    at = kept.empty((memory.KEEP_MIN_BYTES,), np.dtype(np.uint8))
    assert not at.flags.owndata and kept.kept_bytes == 1 << 20


def test_release_lets_the_block_go_and_spares_an_array_in_use() -> None:
    kept = KeptMemory()
    array = kept.empty(SHAPE, np.dtype(np.float64))
    array[...] = 3.0
    kept.release()
    assert kept.kept_bytes == 0
    assert np.all(array == 3.0)  # still the caller's
    assert address(kept.empty(SHAPE, np.dtype(np.float64))) != address(array)


# --- through a server ---------------------------------------------------------------------


def test_streamed_reads_reuse_a_dropped_array_and_never_a_held_one(
    client: gradwire.Client, trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer.limits, "MAX_VALUE_BYTES", 100_000)  # linear.weight: 256,000
    monkeypatch.setattr(memory, "KEEP_MIN_BYTES", 1000)
    client.chunk_bytes = 10_000
    client.fill_parameters(1.0)
    held = client.get("linear.weight")
    client.fill_parameters(2.0)
    fresh = client.get("linear.weight")
    assert address(fresh) != address(held)
    assert np.all(held == 1.0) and np.all(fresh == 2.0)
    where = address(fresh)
    del fresh
    client.fill_parameters(3.0)
    again = client.get("linear.weight")
    assert address(again) == where and np.all(again == 3.0)


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "streamed"])
def test_bfloat16_widened_reads_reuse_a_dropped_array(
    streamed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "KEEP_MIN_BYTES", 1000)  # w: 20,000 values, 80,000 as float32
    with serving(BFLOAT16_WEIGHT, seed=0) as (trainer, client):
        if streamed:
            monkeypatch.setattr(servicer.limits, "MAX_VALUE_BYTES", 10_000)
            client.chunk_bytes = 4_000
        expected = trainer.read("w").value.float().numpy()
        first = client.get("w")
        where = address(first)
        np.testing.assert_array_equal(first, expected)
        # The kept memory's, not an address malloc happens to hand out again.
        assert client._memory.kept_bytes == first.nbytes and not first.flags.owndata
        del first
        again = client.get("w")
        assert address(again) == where
        np.testing.assert_array_equal(again, expected)


def test_with_keep_memory_off_reads_make_new_arrays(
    client: gradwire.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer.limits, "MAX_VALUE_BYTES", 100_000)
    monkeypatch.setattr(memory, "KEEP_MIN_BYTES", 1000)
    client.chunk_bytes = 10_000
    client.get("linear.weight")
    assert client._memory.kept_bytes == 256_000
    client.keep_memory = False
    assert client._memory.kept_bytes == 0
    value = client.get("linear.weight")
    assert value.flags.owndata and client._memory.kept_bytes == 0


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "streamed"])
def test_torch_reads_reuse_a_dropped_tensor_s_memory_and_never_a_held_one(
    client: gradwire.Client, streamed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if streamed:
        monkeypatch.setattr(servicer.limits, "MAX_VALUE_BYTES", 100_000)
        client.chunk_bytes = 10_000
    monkeypatch.setattr(memory, "KEEP_MIN_BYTES", 1000)
    client.fill_parameters(1.0)
    held = client.get("linear.weight", as_torch=True)
    client.fill_parameters(2.0)
    fresh = client.get("linear.weight", as_torch=True)
    assert fresh.data_ptr() != held.data_ptr()
    assert client._memory.kept_bytes == 256_000  # the kept memory's, not malloc's by chance
    assert torch.all(held == 1.0) and torch.all(fresh == 2.0)
    where = fresh.data_ptr()
    del fresh
    again = client.get("linear.weight", as_torch=True)
    assert again.data_ptr() == where and torch.all(again == 2.0)


def test_watched_bfloat16_values_reuse_a_dropped_array_and_never_a_held_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "KEEP_MIN_BYTES", 1000)  # w as float32: 80,000 bytes
    with serving(BFLOAT16_WEIGHT, seed=0) as (trainer, client):
        updates = client.watch(["w"], values=True, stats=False)
        first = next(updates).tensors[0].value
        where = address(first)
        np.testing.assert_array_equal(first, trainer.read("w").value.float().numpy())
        del first
        client.fill_parameters(1.0)
        held = next(updates).tensors[0].value
        assert address(held) == where and np.all(held == 1.0)
        client.fill_parameters(2.0)
        fresh = next(updates).tensors[0].value
        assert address(fresh) != where
        assert np.all(held == 1.0) and np.all(fresh == 2.0)
        updates.close()


def test_a_closed_client_lets_go_of_the_memory_it_kept(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() lets go of the block reads keep for reuse, as keep_memory = False does: a
    closed client still in a variable (a notebook's) would hold its last large read's
    memory for as long as it lived."""
    monkeypatch.setattr(servicer.limits, "MAX_VALUE_BYTES", 100_000)  # linear.weight: 256,000
    monkeypatch.setattr(memory, "KEEP_MIN_BYTES", 1000)
    client = gradwire.connect(address, timeout=30)
    client.chunk_bytes = 10_000
    read = client.get("linear.weight")
    del read
    assert client._memory.kept_bytes == 256_000
    client.close()
    assert client._memory.kept_bytes == 0
