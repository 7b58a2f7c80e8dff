"""Triton's `perf_analyzer`, fetched from PyPI into benchmarks/.cache and run against a KServe v2 server (gRPC, HTTP).

How a working binary is obtained on glibc 2.36 (design.md section 8): the manylinux1 wheel of `tritonclient==2.50.0`
bundles `bin/perf_analyzer` (later wheels need a newer glibc; the `perf-analyzer` package has only manylinux_2_38
wheels); it needs `libb64.so.0d` (Debian's `libb64-0d`) and `libcudart.so.12` (linked, not used: taken from the
`nvidia-cuda-runtime-cu12` wheel) beside it. Nothing is committed: everything lands in the gitignored cache.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache" / "perf_analyzer"
TRITONCLIENT = "tritonclient==2.50.0"
CUDART = "nvidia-cuda-runtime-cu12"


def ensure() -> tuple[Path | None, str]:
    """(path to a runnable perf_analyzer, "") or (None, why not)."""
    binary = CACHE / "perf_analyzer"
    if binary.exists() and (CACHE / "libcudart.so.12").exists() and _has_libb64():
        return binary, ""
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        if not _has_libb64():
            if shutil.which("apt-get") is None:
                return None, "libb64-0d is missing and there is no apt-get to install it"
            subprocess.run(["apt-get", "install", "-y", "-q", "libb64-0d"], check=True, capture_output=True,
                           timeout=300)
        for requirement in (TRITONCLIENT, CUDART):
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "-d", str(CACHE), requirement], check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return None, f"could not fetch perf_analyzer's parts: {exc}"
    for wheel in CACHE.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.endswith("/bin/perf_analyzer"):
                    binary.write_bytes(archive.read(name))
                    binary.chmod(0o755)
                elif name.endswith("/libcudart.so.12"):
                    (CACHE / "libcudart.so.12").write_bytes(archive.read(name))
    if not binary.exists():
        return None, f"no bin/perf_analyzer in the {TRITONCLIENT} wheel"
    return binary, ""


def _has_libb64() -> bool:
    return any(Path(d, "libb64.so.0d").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib", "/lib"))


def command(
    binary: Path, model: str, target: str, concurrency: int, report: Path, *, batch: int = 1,
    interval_ms: int = 2000, stability_percentage: int = 100, max_trials: int = 5, protocol: str = "grpc",
) -> list[str]:
    """The command line of one concurrency level, its CSV report written to `report`.

    `protocol` is "grpc" or "http"; over HTTP perf_analyzer sends inputs and asks for outputs in Triton's binary
    tensor form (its defaults, `--input-tensor-format` / `--output-tensor-format binary`)."""
    return [
        str(binary), "-m", model, "-i", protocol, "-u", target, "-b", str(batch),
        "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(interval_ms),
        "--stability-percentage", str(stability_percentage), "--max-trials", str(max_trials), "--percentile", "50",
        "-f", str(report),
    ]


def environment() -> dict[str, str]:
    """The environment perf_analyzer runs in: its libraries beside it on LD_LIBRARY_PATH."""
    return {**os.environ, "LD_LIBRARY_PATH": f"{CACHE}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def read_report(report: Path, batch: int) -> dict[str, float]:
    """{"requests_per_s", "rows_per_s", "p50_ms", "p99_ms"} from the CSV report of one concurrency level."""
    with report.open() as handle:
        row = next(csv.DictReader(handle))
    inferences = float(row["Inferences/Second"])  # rows per second (inferences = batch rows)
    return {
        "requests_per_s": inferences / batch,
        "rows_per_s": inferences,
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


def run(
    binary: Path, model: str, target: str, concurrency: int, *, batch: int = 1, interval_ms: int = 2000,
    timeout_s: float = 300, stability_percentage: int = 100, max_trials: int = 5, protocol: str = "grpc",
) -> dict[str, float] | str:
    """One concurrency level; {"requests_per_s", "rows_per_s", "p50_ms", "p99_ms"} or the reason it failed.

    perf_analyzer measures windows until the last three agree within `stability_percentage` (of the smallest)
    in both rate and latency, at most `max_trials`; on a machine shared with other work a large percentage keeps
    it from giving up (the caller's rounds and medians deal with the noise instead)."""
    report = CACHE / f"report-{os.getpid()}.csv"
    arguments = command(binary, model, target, concurrency, report, batch=batch, interval_ms=interval_ms,
                        stability_percentage=stability_percentage, max_trials=max_trials, protocol=protocol)
    try:
        done = subprocess.run(arguments, capture_output=True, text=True, timeout=timeout_s, env=environment())
    except subprocess.TimeoutExpired:
        return f"perf_analyzer did not finish within {timeout_s:.0f} s"
    if done.returncode != 0 or not report.exists():
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return f"perf_analyzer exited {done.returncode}: {' | '.join(tail)}"
    result = read_report(report, batch)
    report.unlink()
    return result
