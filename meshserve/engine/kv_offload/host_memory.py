"""How much host memory the CPU tier may take. Checked before the tier is allocated: a size the host cannot
hold is one error line naming the flag, not the allocator's message at start or the OOM killer later (the
tier is not zeroed, so an over-committed one fails only as it fills, losing the requests in flight).

No torch here: config validation imports it before anything loads."""

from __future__ import annotations

import os

GiB = 1 << 30


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2's "max": no limit


def _cgroup_limit_and_usage() -> tuple[int | None, int | None]:
    """A container's memory limit and what it uses now (cgroup v2, else v1); (None, None) outside one."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_path)
        if limit is not None and limit < 1 << 60:  # (v1 writes "no limit" as a huge number)
            return limit, _read_int(usage_path)
    return None, None


def host_memory_bytes() -> int | None:
    """This host's physical memory, or its container's limit when lower; None when unknown."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = None
    limit, _ = _cgroup_limit_and_usage()
    known = [m for m in (physical, limit) if m]
    return min(known) if known else None


def available_memory_bytes() -> int | None:
    """Memory this process can still take now: MemAvailable, or the container's room left when lower."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    limit, usage = _cgroup_limit_and_usage()
    room = limit - usage if limit is not None and usage is not None else None
    known = [m for m in (available, room) if m is not None]
    return min(known) if known else None
