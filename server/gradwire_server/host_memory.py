"""How much more of the host's memory the server may take: the kernel's estimate of the
memory available without swapping (`MemAvailable` in /proc/meminfo), capped by the limits
of the control groups the process runs in (a container's `--memory`, a systemd unit's
`MemoryMax`), each less what its group uses.

Why the server asks: on Linux a CPU tensor's allocation does not fail when memory is short.
The kernel overcommits, the pages are supplied as the pass writes them, and when they run
out its out-of-memory killer ends the process: the server, every session with it, and the
caller gets UNAVAILABLE. A forward pass whose estimated size does not fit in what this
module reports is refused before it starts (trainer.py, `Trainer._check_pass_memory`).

A group's usage counts the page cache it has filled (checkpoints written, files read),
which the kernel gives back before it kills anything: the inactive part of it is counted as
available, as `docker stats` counts it. Off Linux, or where nothing can be read, the answer
is None: nothing is known, and nothing is refused.
"""

from __future__ import annotations

from pathlib import Path

#: A group's limit at or over this is no limit (cgroup v1 writes "no limit" as 2**63 less a
#: page; v2 writes "max").
_UNLIMITED = 1 << 60


def available_bytes(root: Path = Path("/")) -> int | None:
    """Bytes the process may still take before the kernel must reclaim what it cannot, or
    kill: the least of MemAvailable and each limiting group's room. `root`: where /proc and
    /sys are (tests point it at files of their own)."""
    found = [room for room in (_mem_available(root), *_group_rooms(root)) if room is not None]
    return max(0, min(found)) if found else None


def _mem_available(root: Path) -> int | None:
    try:
        text = (root / "proc/meminfo").read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            fields = rest.split()
            if fields and fields[0].isdigit():
                return int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return None


def _group_rooms(root: Path) -> list[int | None]:
    """The room left under each memory limit of the process's groups: its own group's and
    every ancestor's, for cgroup v2 and v1 alike."""
    try:
        lines = (root / "proc/self/cgroup").read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    rooms: list[int | None] = []
    for line in lines:
        if line.count(":") < 2:  # not "id:controllers:path": nothing it could name
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy, every controller
            mount = root / "sys/fs/cgroup"
            limit, usage = "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            mount = root / "sys/fs/cgroup/memory"
            limit, usage = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for group in _groups(mount, path):
            rooms.append(_room(group, limit, usage))
    return rooms


def _groups(mount: Path, path: str) -> list[Path]:
    """The group at `path` under `mount` and its ancestors up to the mount. Inside a
    container without its own cgroup namespace, /proc/self/cgroup names the group as the
    host sees it (/docker/<id>), while the container's /sys/fs/cgroup is that group: where
    the path is not there, the mount is the group."""
    group = mount / path.strip("/")
    try:  # is_dir raises where it may not look (EACCES) or the name is too long
        if not group.is_dir():
            return [mount] if mount.is_dir() else []
    except OSError:
        return []
    groups = [group]
    while group != mount:
        group = group.parent
        groups.append(group)
    return groups


def _room(group: Path, limit_file: str, usage_file: str) -> int | None:
    limit = _number(group / limit_file)
    if limit is None or limit >= _UNLIMITED:
        return None
    usage = _number(group / usage_file)
    if usage is None:
        return None
    return limit - max(0, usage - _inactive_file(group))


def _number(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # v2's "max": no limit


def _inactive_file(group: Path) -> int:
    """The page cache the group holds that the kernel reclaims first (v2 `inactive_file`,
    v1 `total_inactive_file`): 0 where it cannot be read."""
    try:
        text = (group / "memory.stat").read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return 0
    # partition, not split: a line "name " split into one field, and dict() raised.
    stat = dict(line.partition(" ")[::2] for line in text.splitlines())
    value = stat.get("total_inactive_file", stat.get("inactive_file", "0")).strip()
    return int(value) if value.isdigit() else 0
