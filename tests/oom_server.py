"""A gradwire server whose address space can be capped on command, for test_oom.py.

Started as `python -m tests.oom_server`: serves a seeded CPU trainer on a free loopback port,
prints the port, then reads commands on stdin, one a line, answering each on stdout:

    limit BYTES   cap the address space (RLIMIT_AS) at the current VmSize + BYTES
    unlimit       lift the cap again (to the hard limit)
    vm            the current VmSize, in bytes

and stops at end of input. Under the cap, an allocation larger than what is left fails in
malloc/mmap, as it fails for real when memory runs out: torch's CPU allocator raises.
"""

from __future__ import annotations

import resource
import sys

from gradwire_server.app import start
from gradwire_server.trainer import Trainer


def vm_size() -> int:
    """This process's address space in bytes, as the kernel counts it against RLIMIT_AS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmSize")


def main() -> None:
    running = start(Trainer(device="cpu", seed=0), "127.0.0.1", 0)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    print(running.port, flush=True)
    try:
        for line in sys.stdin:
            command = line.split()
            if command[:1] == ["limit"]:
                cap = vm_size() + int(command[1])
                resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
                print(f"ok {cap}", flush=True)
            elif command == ["vm"]:
                print(f"ok {vm_size()}", flush=True)
            elif command == ["unlimit"]:
                resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
                print("ok", flush=True)
            else:
                print(f"unknown command {line.strip()!r}", flush=True)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        running.stop(grace=None)


if __name__ == "__main__":
    main()
