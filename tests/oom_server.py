"""A gradwire server whose address space can be capped on command, for test_oom.py.

Started as `python -m tests.oom_server [MODULE:ATTR]`: serves a seeded CPU trainer (the
tutorial's model, or the ModelSpec named, such as tests.oom_server:WIDE) on a free loopback port,
with the malloc settings `gradwire serve` uses (allocator.py) but for one, the top pad (below),
prints the port, then reads commands on stdin, one a line, answering each on stdout:

    limit BYTES   give back the free memory at the top of malloc's heaps, then cap the address
                  space (RLIMIT_AS) at the current VmSize + BYTES
    unlimit       lift the cap again (to the hard limit)
    vm            the current VmSize, in bytes
    stop PATH     stop the server, saving its state to PATH, under the cap set (if any);
                  answers "ok stopped" or "ok raised TYPE: MESSAGE", and reads no more

and stops at end of input. Under the cap, an allocation larger than what is left fails in
malloc/mmap, as it fails for real when memory runs out: torch's CPU allocator raises.

BYTES is then all the room there is. Two of the settings that keep freed memory would add
to it unseen, and where and how often depended on what ran before:
- memory free at the top of the main heap is inside VmSize, and a block of any size is
  carved from it before glibc thinks of mapping one. A heap grown by 64 MiB more than asked
  (`gradwire serve`'s top pad) left 64-67 MiB there in 3 of 40 servers, and a 64 MiB model
  was made under a cap of 32 MiB of headroom: `limit` trims that memory first (malloc_trim);
- with that pad, the main heap grows by 64 MiB more than a block needs or not at all, so
  under less headroom than that, a small block fails where it would fit: this server grows
  its heaps by what is asked.
"""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path

from torch import nn

from gradwire_server.allocator import M_TOP_PAD, _glibc, keep_freed_memory
from gradwire_server.app import start
from gradwire_server.models import SIMPLE, ModelSpec, load_spec
from gradwire_server.trainer import Trainer

#: A model whose parameters are large (64 MiB): an optimizer's temporaries as large as them
#: can be made not to fit.
WIDE = ModelSpec("Wide", lambda: nn.Linear(4096, 4096, bias=False), (4096,), 4096, loss="mse")
#: A model whose parameters grow in the order an optimizer updates them (4, 4 and 64 MiB): a
#: Step can update the first two and then run out at the third, half applied, unless the
#: memory it needs is taken before it begins.
GROWING = ModelSpec(
    "Growing",
    lambda: nn.Sequential(
        nn.Linear(4096, 256, bias=False),
        nn.Linear(256, 4096, bias=False),
        nn.Linear(4096, 4096, bias=False),
    ),
    (4096,),
    4096,
    loss="mse",
)


def vm_size(pid: int | str = "self") -> int:
    """A process's address space in bytes (this one's by default), as the kernel counts it
    against RLIMIT_AS."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmSize")


def trim() -> None:
    """Gives back the memory free at the top of malloc's heaps (glibc; elsewhere, nothing)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))


def main() -> None:
    keep_freed_memory()  # as `gradwire serve` does by default
    libc = _glibc()
    if libc is not None:  # but for the pad: heaps grow by what is asked
        libc.mallopt(M_TOP_PAD, 0)
    spec = load_spec(sys.argv[1]) if len(sys.argv) > 1 else SIMPLE
    running = start(Trainer(spec, device="cpu", seed=0), "127.0.0.1", 0)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    print(running.port, flush=True)
    stopped = False
    try:
        for line in sys.stdin:
            command = line.split()
            if command[:1] == ["limit"]:
                trim()
                cap = vm_size() + int(command[1])
                resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
                print(f"ok {cap}", flush=True)
            elif command == ["vm"]:
                print(f"ok {vm_size()}", flush=True)
            elif command[:1] == ["stop"]:
                stopped = True
                try:
                    running.stop(5.0, save_to=Path(command[1]))
                    answer = "ok stopped"
                except Exception as err:
                    answer = f"ok raised {type(err).__name__}: {err}"
                resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
                print(answer, flush=True)
                break
            elif command == ["unlimit"]:
                resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
                print("ok", flush=True)
            else:
                print(f"unknown command {line.strip()!r}", flush=True)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        if not stopped:
            running.stop(grace=None)


if __name__ == "__main__":
    main()
