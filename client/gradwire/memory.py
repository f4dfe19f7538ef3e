"""Memory for the arrays that reads make: the last large one is reused once you let it go.

A read that cannot hand out a view of the received bytes makes a new array: a streamed read
(over 64 MiB) assembles its chunks into one, and a bfloat16 read widens into a float32 one.
Fresh memory is paid for in page faults and the kernel zeroing each page on first touch,
which on the benchmark's machine cost more than the copy into it: about 2 ms for 32 MiB, and
50-100 ms (at times over a second) for 512 MiB (docs/PERFORMANCE.md, "Fresh memory is
expensive here"). A watcher that reads a large tensor again and again, dropping the last
array each time, would pay that every time.

So the client keeps the memory of the last large array it made. Once nothing refers to that
array any more (not your variable, not a view or slice of it, not a torch tensor sharing its
memory), the next read of the same size gets that memory back, already mapped. The client
never hands out memory you can still reach: the array's buffer is a memoryview that only it
and what is made from it refer to, and the memory is reused only once that memoryview is gone.

At most one block is kept, beyond the arrays you hold. `Client.keep_memory = False` turns this
off (and lets the block go); closing the client lets it go too. To reuse memory on purpose,
read into an array you keep: `client.get(name, out=array)`.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import numpy as np

#: Arrays smaller than this come from numpy as usual: malloc reuses small blocks by itself.
KEEP_MIN_BYTES = 1 << 20


class KeptMemory:
    """Makes arrays for reads, reusing the last large one's memory once it is unreachable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._block: np.ndarray[Any, Any] | None = None  # uint8, the memory kept
        self._handed: weakref.ref[memoryview] | None = None  # the block's one way out

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        """An uninitialised C-contiguous array, as np.empty(shape, dtype) makes."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < KEEP_MIN_BYTES:
            return np.empty(shape, dtype=dtype)
        with self._lock:
            block = self._block
            in_use = self._handed is not None and self._handed() is not None
            if block is None or block.nbytes != nbytes or in_use:
                # An array the caller still holds stays theirs, freed when they let it go.
                self._block = self._handed = None
                del block
                block = np.empty(nbytes, dtype=np.uint8)
            flat = np.frombuffer(block.data, dtype=dtype)
            handed = flat.base
            assert isinstance(handed, memoryview)
            self._block, self._handed = block, weakref.ref(handed)
        return flat.reshape(shape)

    @property
    def kept_bytes(self) -> int:
        """Bytes of the block kept, whether or not an array still uses it."""
        block = self._block
        return 0 if block is None else block.nbytes

    def release(self) -> None:
        """Lets the kept block go (an array still using it keeps it until it goes too)."""
        with self._lock:
            self._block = self._handed = None
