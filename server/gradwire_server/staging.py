"""Large tensors between the host and a GPU through pinned buffers, run by run.

A copy from ordinary (pageable) host memory to a GPU goes through the CUDA driver's own
staging, one synchronous piece at a time. From page-locked ("pinned") memory the GPU reads
the host's memory directly, at the link's full speed, and the copy can run while the host
fills the next piece. Pinning a 512 MiB value whole would take as much page-locked memory
again (slow to get, and scarce), so a large value goes through two pinned buffers of
RUN_BYTES in turn: while one run crosses to the device, the host copies the next into the
other buffer. Only a buffer about to be reused is waited for; the device is not synchronised.
A value streamed to a GPU trainer (SetTensorStream, ForwardStream) takes the same way chunk
by chunk as it arrives (Runs, from convert.Chunks), never whole on the host.
Streamed reads the other way go through one pinned buffer (live.StreamedRead): each run is
on the host, and encoded for the wire, before the next is copied.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: Values of at least this size go through pinned buffers; smaller ones are copied directly.
PINNED_MIN_BYTES = 1 << 20
#: One run through a pinned buffer.
RUN_BYTES = 4 << 20


def _in_runs(source: torch.Tensor, device: torch.device) -> bool:
    """Whether `source` goes to `device` in runs: a large host tensor bound for a GPU."""
    large = source.numel() * source.element_size() >= PINNED_MIN_BYTES
    return large and device.type == "cuda" and source.device.type == "cpu"


def to_device(source: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`source` on `device`: a large host tensor onto a GPU in runs through pinned buffers
    (contiguous there); anything else as `source.to(device)` does it."""
    if not _in_runs(source, device):
        return source.to(device)
    out = torch.empty(source.shape, dtype=source.dtype, device=device)
    copy_in_runs(source, out, RUN_BYTES, pinned=True)
    return out


def copy_into(out: torch.Tensor, source: torch.Tensor) -> None:
    """out[...] = source: a large host tensor into a GPU tensor of its shape and dtype through
    pinned buffers (as `to_device`), anything else as `out.copy_(source)` does it."""
    same = (out.shape, out.dtype) == (source.shape, source.dtype)
    if _in_runs(source, out.device) and out.is_contiguous() and same:
        copy_in_runs(source, out, RUN_BYTES, pinned=True)
    else:
        out.copy_(source)


def copy_in_runs(source: torch.Tensor, out: torch.Tensor, run_bytes: int, pinned: bool) -> None:
    """out[...] = source (same shape and dtype, `out` contiguous), through two host buffers of
    `run_bytes` used in turn (page-locked when `pinned`). With `out` on a GPU each run's copy
    to the device is asynchronous, and a buffer is refilled only once its last copy is done."""
    if source.shape != out.shape or source.dtype != out.dtype or not out.is_contiguous():
        raise ValueError("copy_in_runs needs a contiguous `out` of the source's shape and dtype")
    Runs(out, run_bytes, pinned).write(0, source.contiguous().view(-1))


class Runs:
    """Writes host values into a contiguous tensor piece by piece, each piece through one of
    two host buffers of at most `run_bytes` used in turn (page-locked when `pinned`): to a
    GPU, a piece's copy is asynchronous and overlaps the filling of the other buffer, and a
    buffer is refilled only once its last copy is done. For a value that arrives in pieces
    (SetTensorStream's chunks, as they come) as for one already whole (copy_in_runs)."""

    def __init__(self, out: torch.Tensor, run_bytes: int, pinned: bool) -> None:
        if not out.is_contiguous():
            raise ValueError("Runs writes into a contiguous tensor")
        self._dst = out.view(-1)
        self._step = max(1, run_bytes // out.element_size())  # elements in one run
        self._size = min(self._step, self._dst.numel())
        self._pinned = pinned
        self._buffers: list[torch.Tensor] = []  # made at the first write: none for no values
        self._on_gpu = out.device.type == "cuda"
        self._done: list[torch.cuda.Event | None] = [None, None]  # each buffer's last copy
        self._turn = 0

    def write(self, offset: int, values: torch.Tensor | np.ndarray[Any, Any]) -> None:
        """out.view(-1)[offset : offset + len(values)] = values (1-D, on the host, of out's
        dtype; a numpy array may be read-only, a view of received bytes), in runs."""
        for start in range(0, len(values), self._step):
            run = values[start : start + self._step]
            self._write_run(offset + start, run)

    def _write_run(self, offset: int, run: torch.Tensor | np.ndarray[Any, Any]) -> None:
        if not self._buffers:
            dtype = self._dst.dtype
            self._buffers = [
                torch.empty(self._size, dtype=dtype, pin_memory=self._pinned) for _ in range(2)
            ]
        turn, self._turn = self._turn, 1 - self._turn
        last = self._done[turn]
        if last is not None:
            last.synchronize()  # the GPU has read this buffer's previous run
        host = self._buffers[turn][: len(run)]
        if isinstance(run, np.ndarray):
            np.copyto(host.numpy(), run)
        else:
            host.copy_(run)
        self._dst[offset : offset + len(run)].copy_(
            host, non_blocking=self._on_gpu and self._pinned
        )
        if self._on_gpu:
            # On the stream the copy went to: the current one of `out`'s device, which need
            # not be the calling thread's current device (a server on cuda:1).
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(self._dst.device))
            self._done[turn] = event
