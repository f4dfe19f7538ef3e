"""Streamed reads of one state version, sent from the model's own memory where that is safe.

Every chunk of a streamed read is from one state version (the contract says so). Copying the
selection before the first chunk keeps that promise, at the price of a copy as large as the
read: for 512 MiB, 45 ms on the benchmark's machine and 512 MiB more server memory. Yet most
reads run while nothing changes the state. So a contiguous selection of a CPU tensor is sent
straight from the tensor ("copy on write"):

- each run of values is encoded for the wire under the trainer's lock, so no mutation runs
  while it is copied out;
- every call on the torch thread other than a read (trainer._CHANGES_NO_TENSOR) first calls
  `LiveReads.detach_all()`, under the same lock, which copies what each read in flight has
  not sent yet. The rest of the read is sent from that copy.

So a read that nothing interrupts costs no copy at all. One that a step interrupts costs the
copy of what is left, into the spare block when there is one, paid by the step that needed
it: about what the up-front copy cost the torch thread before. A client that stops reading
mid-stream never holds up training: its read is detached like any other.

Anything else (a strided slice, a GPU tensor) is copied when the read opens, as before: a
strided slice cannot be sent in runs without a copy anyway, and on a GPU the copy stays on
the device, which is fast, while runs to the host go through one pinned buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch

from gradwire_server.errors import OverLimit


class Memory(Protocol):
    """Where copies come from, and go back to (convert.SpareMemory)."""

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor: ...

    def give_back(self, tensor: torch.Tensor) -> None: ...


class LiveReads:
    """The streamed reads of one trainer still sending from live memory.

    Every method is called under the trainer's lock.
    """

    def __init__(self) -> None:
        self._reads: set[StreamedRead] = set()

    def add(self, read: StreamedRead) -> None:
        self._reads.add(read)

    def discard(self, read: StreamedRead) -> None:
        self._reads.discard(read)

    def detach_all(self) -> None:
        """Copies what each read has not sent yet: the state is about to change."""
        while self._reads:
            self._reads.pop().detach()

    def __len__(self) -> int:
        return len(self._reads)


class StreamedRead:
    """The values of one selection at one version, handed out run by run (`run`).

    Made under the trainer's lock (Trainer.stream_read); `close` it when the stream ends,
    however it ends, to give back its copy.
    """

    def __init__(
        self,
        part: torch.Tensor,
        lock: AbstractContextManager[object],  # the trainer's
        memory: Memory,
        reads: LiveReads,
    ) -> None:
        self.shape = tuple(part.shape)
        self.numel = part.numel()
        self.element_size = part.element_size()
        self._lock = lock
        self._memory = memory
        self._reads = reads
        self._sent = 0  # values handed out from live memory, so far
        self._live: torch.Tensor | None = None  # 1-D view of the live tensor, until detached
        self._copy: torch.Tensor | None = None  # 1-D copy (from where the live read stopped)
        self._pinned: torch.Tensor | None = None  # a GPU copy's one host buffer
        self._failed: str | None = None  # why the rest could not be copied
        if part.device.type == "cpu" and part.is_contiguous():
            self._live = part.reshape(-1)
            reads.add(self)
        else:
            copy = self._memory.take(self.shape, part.dtype, part.device)
            copy.copy_(part)
            self._copy = copy.reshape(-1)

    @property
    def copied(self) -> bool:
        """Whether the values are (now) sent from a copy rather than the live tensor."""
        return self._copy is not None

    def detach(self) -> None:
        """Copies the values not sent yet, and sends the rest from that copy. Under the lock.

        Never raises: if the copy cannot be made (no memory), the mutation goes ahead and
        this read fails at its next run instead. It never sends values of two versions."""
        live = self._live
        if live is None:
            return
        if self._sent < self.numel:
            try:
                # A block of the whole selection's size, the size the spare keeps (a read's
                # or a write's), so that memory already mapped is reused; only the rest is
                # copied.
                copy = self._memory.take(self.shape, live.dtype, live.device).reshape(-1)
                copy[self._sent :].copy_(live[self._sent :])
                self._copy = copy
            except (RuntimeError, MemoryError) as err:
                self._failed = str(err).split("\n")[0]
        # Last: `run` looks at _live without the lock, and then goes to the copy (or the
        # failure), which must be in place by then.
        self._live = None

    @contextmanager
    def run(self, offset: int, count: int) -> Iterator[torch.Tensor]:
        """Values [offset, offset + count) on the host, valid inside the block only: copy
        them out (encode them) there. Runs are asked for in order."""
        last = offset + count >= self.numel
        if self._live is not None:
            with self._lock:
                live = self._live  # None if a mutation detached this read meanwhile
                if live is not None:
                    yield live[offset : offset + count]
                    self._sent = offset + count
                    if last:
                        self.close()
                    return
        yield self._host(offset, count)
        if last:  # done with the copy before the stream's last message is even sent
            self.close()

    def _host(self, offset: int, count: int) -> torch.Tensor:
        if self._failed is not None:
            raise OverLimit(
                "the tensor changed while it was being streamed, and the server could not "
                f"copy the rest to keep the read at one version ({self._failed}); read it "
                "again",
                reason="OUT_OF_MEMORY",
            )
        assert self._copy is not None
        run = self._copy[offset : offset + count]
        if run.device.type == "cpu":
            return run
        if self._pinned is None:
            size = min(count, self._copy.numel())
            with torch.cuda.device(run.device):  # a gRPC thread: its current device may be 0
                self._pinned = torch.empty(size, dtype=run.dtype, pin_memory=True)
        host = self._pinned[: run.numel()]
        host.copy_(run)  # synchronises: the run is on the host when this returns
        return host

    def close(self) -> None:
        """Ends the read: it no longer follows the live tensor, and its copy goes back. The
        last run closes it too; closing again does nothing."""
        if self._live is not None:
            with self._lock:
                self._reads.discard(self)
                self._live = None
        self._pinned = None  # page-locked memory is scarce: not kept past the read
        copy, self._copy = self._copy, None
        if copy is not None:
            self._memory.give_back(copy)
