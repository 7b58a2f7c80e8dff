"""CPU counts from cgroup quotas (v1 and v2) and the affinity mask, on fake cgroup trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnserve.server import cpu_quota


def v2_tree(tmp_path: Path, limits: dict[str, str], own: str = "/kubepods/pod1/c1") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for relative, value in limits.items():
        directory = root / relative.strip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(value + "\n")
    (root / own.strip("/")).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_cgroup_v2_quota_is_read_and_the_tightest_ancestor_wins(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, {"/kubepods/pod1/c1": "150000 100000", "/kubepods/pod1": "100000 100000"})
    assert cpu_quota.cgroup_cpu_limit(root, proc) == pytest.approx(1.0)
    root, proc = v2_tree(tmp_path / "b", {"/kubepods/pod1/c1": "250000 100000", "/kubepods": "max 100000"})
    assert cpu_quota.cgroup_cpu_limit(root, proc) == pytest.approx(2.5)


def test_cgroup_v2_without_a_limit_reports_none(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, {"/kubepods/pod1/c1": "max 100000"})
    assert cpu_quota.cgroup_cpu_limit(root, proc) is None


def test_namespaced_cgroup_v2_reads_the_root_cpu_max(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, {"/": "300000 100000"}, own="/")
    assert cpu_quota.cgroup_cpu_limit(root, proc) == pytest.approx(3.0)


def test_cgroup_v1_cfs_quota_is_read_and_minus_one_means_no_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    directory = root / "cpu,cpuacct" / "docker" / "abc"
    directory.mkdir(parents=True)
    (directory / "cpu.cfs_quota_us").write_text("50000\n")
    (directory / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert cpu_quota.cgroup_cpu_limit(root, proc) == pytest.approx(0.5)
    (directory / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota.cgroup_cpu_limit(root, proc) is None


def test_unreadable_cgroup_information_means_no_limit(tmp_path: Path) -> None:
    assert cpu_quota.cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None


def test_available_cpus_is_the_smaller_of_affinity_and_quota_rounded_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_quota.os, "sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setattr(cpu_quota, "cgroup_cpu_limit", lambda root=None: 1.5)
    assert cpu_quota.available_cpus() == 2
    assert cpu_quota.intra_op_threads() == 2
    assert cpu_quota.intra_op_threads(workers=2) == 1
    assert cpu_quota.intra_op_threads(workers=4) == 1
    monkeypatch.setattr(cpu_quota, "cgroup_cpu_limit", lambda root=None: None)
    assert cpu_quota.available_cpus() == 8
    assert cpu_quota.intra_op_threads(workers=2) == 4
