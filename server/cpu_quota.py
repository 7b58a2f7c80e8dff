"""How many CPUs this process may really use: the container's cgroup CPU quota and the CPU affinity mask.

`os.cpu_count()` reports the host's cores. In a container limited to 2 CPUs on a 64-core node, onnxruntime's
default (one intra-op thread per core) would start 64 threads that the kernel throttles to 2 CPUs' worth of time per
period: the threads stall at the quota and the event loop stalls with them. So thread counts derive from

* the cgroup v2 `cpu.max` (`"<quota> <period>"` or `"max <period>"`) of this process's cgroup and its ancestors,
* or, on cgroup v1, `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1: no limit),
* and `os.sched_getaffinity` (cpusets, `taskset`),

whichever is smallest, rounded up (a quota of 1.5 CPUs can keep two threads busy half the time each).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs allowed by the cgroup CPU quota (e.g. 1.5), or None when there is no quota or no cgroup to read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: one unified hierarchy
            limits += _v2_limits(root, path)
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own hierarchy
            limits += _v1_limits(root, controllers, path)
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Whole CPUs this process can keep busy: min(affinity mask, cgroup quota rounded up), at least 1."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    if quota is None:
        return max(1, affinity)
    return max(1, min(affinity, math.ceil(quota - 1e-9)))


def intra_op_threads(workers: int = 1, root: Path = CGROUP_ROOT) -> int:
    """Default onnxruntime intra-op threads per session: the available CPUs shared among `workers` processes.

    Every CPU, not one less for the event loop: measured on 2 CPUs with the 25M-parameter network, 2 threads ran a
    64-row batch in ~36 ms and 1 thread in ~78 ms, while the loop needs a CPU only between batches (the intra-op
    threads do not spin, see `runner.py`, so they leave the CPU to the loop when a batch is done).
    """
    return max(1, available_cpus(root) // max(1, workers))


def _v2_limits(root: Path, path: str) -> list[float]:
    """cpu.max of the cgroup and each ancestor below the root (a parent's limit binds its children)."""
    limits = []
    current = Path(path.lstrip("/"))
    while True:
        limit = _parse_cpu_max(root / current / "cpu.max")
        if limit is not None:
            limits.append(limit)
        if current == Path("."):  # the root of the hierarchy (or the container's namespace root)
            return limits
        current = current.parent


def _v1_limits(root: Path, controllers: str, path: str) -> list[float]:
    """cpu.cfs_quota_us / cpu.cfs_period_us, in the controller's mount (named cpu, cpu,cpuacct or cpuacct,cpu)."""
    limits = []
    for mount in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = root / mount
        if not base.is_dir():
            continue
        current = Path(path.lstrip("/"))
        while True:
            limit = _parse_cfs(base / current)
            if limit is not None:
                limits.append(limit)
            if current == Path("."):
                break
            current = current.parent
        return limits
    return limits


def _parse_cpu_max(path: Path) -> float | None:
    try:
        quota, _, period = path.read_text().strip().partition(" ")
    except OSError:
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period or "100000")
    except ValueError:
        log.debug("cannot parse %s", path)
        return None


def _parse_cfs(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text().strip())
        period = int((directory / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period
