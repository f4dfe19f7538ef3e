"""Whose CPU time a benchmark run shared the machine with: its own processes', other
processes', and the hypervisor's (steal).

Every figure of the benchmark is a ratio of two timings taken in turn, so a load that comes
and goes during a run moves one and not the other: a virtualenv built and a type check run
in another checkout beside run 122 made a Step take 7.5 ms against an echo's 0.46 ms (16x;
1.4-1.5x in quiet runs), and nothing in the table said why. So a run reports, on Linux, the
CPU time the whole machine spent (/proc/stat) less what the benchmark's own processes spent
(its own, and that of the children it has waited for: the servers it starts, Node.js), and
the time the hypervisor took from this VM's CPUs for others (steal). Interrupt time is left
out on both sides: the kernel counts it apart from any process (loopback traffic's among
it).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

#: Other processes' CPU, or steal, above this many cores on average, and a run's figures
#: are said to be open to doubt: a quiet VM shows a few hundredths of a core of each.
NOISY_CORES = 0.1


@dataclass(frozen=True)
class Snapshot:
    """The machine's CPU seconds so far, by kind, and this process's with its children's."""

    wall: float  # time.monotonic()
    busy: float  # user, nice and system time of every CPU (/proc/stat)
    steal: float  # time the hypervisor ran something else on this VM's CPUs
    own: float  # user and system time of this process and the children it has waited for


def cpu_seconds(stat: str, ticks_per_second: int) -> tuple[float, float]:
    """(busy, steal) seconds from the text of /proc/stat: busy is the first line's user,
    nice and system columns (guest time is within user), steal its eighth column."""
    line = stat.splitlines()[0].split()
    if line[0] != "cpu":
        raise ValueError(f"not /proc/stat's first line: {line[0]!r}")
    values = [int(v) for v in line[1:]]
    values += [0] * (8 - len(values))  # kernels before 2.6.11 had no steal column
    user, nice, system, steal = values[0], values[1], values[2], values[7]
    return (user + nice + system) / ticks_per_second, steal / ticks_per_second


def snapshot() -> Snapshot | None:
    """Now's counts; None where the machine has no /proc/stat (not Linux)."""
    try:
        stat = Path("/proc/stat").read_text()
        busy, steal = cpu_seconds(stat, os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += usage.ru_utime + usage.ru_stime
    return Snapshot(time.monotonic(), busy, steal, own)


@dataclass(frozen=True)
class Shares:
    """The CPU spent between two snapshots, in cores on average over `wall` seconds."""

    wall: float
    own: float
    others: float
    steal: float

    @property
    def noisy(self) -> bool:
        """Whether others' share or steal passed NOISY_CORES."""
        return self.others > NOISY_CORES or self.steal > NOISY_CORES


def shares(before: Snapshot | None, after: Snapshot | None) -> Shares | None:
    """The CPU spent between the two snapshots; None without them."""
    if before is None or after is None or after.wall <= before.wall:
        return None
    wall = after.wall - before.wall
    own = (after.own - before.own) / wall
    # Ticks are counted per CPU at 100 Hz, and rusage finer: a quiet run's difference can
    # come out a little below zero.
    others = max(0.0, (after.busy - before.busy) / wall - own)
    return Shares(wall, own, others, (after.steal - before.steal) / wall)


def summary(before: Snapshot | None, after: Snapshot | None) -> str:
    """A line on the CPU time spent between the two snapshots, in cores on average, with a
    warning when others' share or steal passes NOISY_CORES; "" without snapshots."""
    spent = shares(before, after)
    if spent is None:
        return ""
    line = (
        f"CPU during the run ({spent.wall:.0f} s, in cores on average): this benchmark "
        f"{spent.own:.2f}, other processes {spent.others:.2f}, the hypervisor (steal) "
        f"{spent.steal:.2f}"
    )
    if spent.noisy:
        line += (
            " -- more than a quiet machine's: the ratios are open to doubt; run it again "
            "with nothing else running"
        )
    return line


def busy_before(seconds: float = 1.0) -> str:
    """A warning, "" for none, when other processes (or the hypervisor) took more than
    NOISY_CORES in the `seconds` before a run starts: a run takes minutes, and its table
    says so at the end; this says it while the run can still be stopped."""
    before = snapshot()
    time.sleep(seconds)
    spent = shares(before, snapshot())
    if spent is None or not spent.noisy:
        return ""
    return (
        f"note: other processes are using {spent.others:.2f} cores (the hypervisor "
        f"{spent.steal:.2f}) as the benchmark starts: its ratios will be open to doubt; stop "
        "it (Ctrl-C) and run it with nothing else running\n"
    )
