"""How much memory this process may use: the container's cgroup memory limit, else the host's memory; and how much
it uses now.

A container's memory limit is what the OOM killer enforces, not the host's RAM: a server that sizes its buffers from
`/proc/meminfo` inside a 2 GiB pod on a 256 GiB node is killed long before it thinks it is full. So the limit is

* the cgroup v2 `memory.max` of this process's cgroup and every ancestor below the root (a parent's limit binds its
  children; `max` is no limit),
* or, on cgroup v1, `memory.limit_in_bytes` of the memory controller's hierarchy, the same way (v1 writes "no
  limit" as a huge number, 2**63 rounded down to a page),

whichever is smallest, and the host's `MemTotal` where there is none (or it is above the host's memory). The
cgroup files are read under `root` (`--cgroup-root`, `/sys/fs/cgroup` by default), so a test can point the server at
prepared files. The same layout rules as `cpu_quota`, which reads the CPU limits beside these.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
_V1_UNLIMITED = 1 << 60
"""cgroup v1 reports "no limit" as 9223372036854771712 (2**63 rounded down to a page); anything this large is none."""


@dataclass(frozen=True, slots=True)
class MemoryLimit:
    """The memory this process may use, and where that figure came from (for the start-up log)."""

    bytes: int
    source: str
    """e.g. "cgroup memory.max", "cgroup v1 memory.limit_in_bytes", "host MemTotal"."""


def container_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP, meminfo: Path = MEMINFO) -> MemoryLimit:
    """The cgroup memory limit of this process (v2 or v1, the smallest along its path), else the host's memory."""
    host = host_memory(meminfo)
    limit = cgroup_memory_limit(root, proc_cgroup)
    if limit is not None and (host is None or limit[0] < host):
        return MemoryLimit(limit[0], limit[1])
    if host is not None:
        return MemoryLimit(host, "host MemTotal")
    return MemoryLimit(_sysconf_memory(), "host physical pages")


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[int, str] | None:
    """(bytes, which file) of the tightest cgroup memory limit on this process's path, or None when unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[tuple[int, str]] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: one unified hierarchy
            found += [(value, "cgroup memory.max") for value in _along(root, path, "memory.max")]
        elif "memory" in controllers.split(","):  # cgroup v1: the memory controller's own hierarchy
            for mount in (controllers, "memory"):
                if (root / mount).is_dir():
                    found += [(value, "cgroup v1 memory.limit_in_bytes")
                              for value in _along(root / mount, path, "memory.limit_in_bytes")]
                    break
    return min(found) if found else None


def host_memory(meminfo: Path = MEMINFO) -> int | None:
    """The host's MemTotal in bytes (None when /proc/meminfo cannot be read)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes(pid: int | str = "self") -> int:
    """Resident set size (VmRSS) of a process, 0 where /proc cannot tell."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_resident_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a process, 0 where /proc cannot tell."""
    return _status_kib(pid, "VmHWM") * 1024


def _status_kib(pid: int | str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def _along(root: Path, path: str, name: str) -> list[int]:
    """The limit in `name` of the cgroup at `path` and of each ancestor (the file at the root included)."""
    limits = []
    current = Path(path.lstrip("/"))
    while True:
        value = _read_limit(root / current / name)
        if value is not None:
            limits.append(value)
        if current == Path("."):
            return limits
        current = current.parent


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        log.debug("cannot parse %s: %r", path, text[:64])
        return None
    return value if 0 < value < _V1_UNLIMITED else None


def _sysconf_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30
