"""Where a request's CPU goes: server CPU time per request, read from /proc, for the seed network at c=1, 8 and 64.

    python benchmarks/server_cpu.py            # ~3 minutes; Linux only (reads /proc/<pid>/stat)

Throughput on a machine whose cores the clients share says little about cost; CPU time per request does. For each
server (the bare echo flavours, `echo-typed`, nnserve with defaults and with `--workers 2`) and concurrency, the raw
load generator runs for `--duration` seconds and the server's user + system time (its process and children) is read
over a window in the middle of the load: `cores` is that time per second, `us/req` that time per answered request.
The same client drives every server, so the differences are the servers'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402
from run import SEED, WIDTHS, Server, build_repository, echo_server, nnserve_server, start, stop, wait_ready  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system time of `pid` and its direct children (the workers of `--workers N`)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for process in (pid, *map(int, children)):
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLOCK_TICKS


def measure(server: Server, concurrency: int, duration: float) -> dict[str, float]:
    assert server.process is not None
    command = [sys.executable, str(HERE / "loadgen.py"), "--target", f"127.0.0.1:{server.port}", "--model", SEED,
               "--width", str(WIDTHS[SEED]), "--concurrency", str(concurrency), "--channels",
               str(min(concurrency, 8)), "--warmup", "1", "--duration", str(duration)]
    load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the load generator's start and warm-up
    window = duration - 1.0
    before, started = cpu_seconds(server.process.pid), time.monotonic()
    time.sleep(window)
    after, ended = cpu_seconds(server.process.pid), time.monotonic()
    result = json.loads(load.communicate(timeout=duration + 120)[0])
    cores = (after - before) / (ended - started)
    rate = result["requests_per_s"]
    return {"requests_per_s": rate, "p50_ms": result["p50_ms"], "cores": cores, "us_per_request": cores / rate * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of load per point (>= 2)")
    args = parser.parse_args()
    repo = build_repository()
    servers = [echo_server(SEED), echo_server(SEED, "echo-sync", "--threads", "16"),
               echo_server(SEED, "echo-typed", "--typed"), nnserve_server("nnserve", repo),
               nnserve_server("nnserve-w2", repo, "--workers", "2")]
    uvloop_path, why = peers.setup_uvloop(install=True)
    if uvloop_path is not None:
        servers.insert(1, echo_server(SEED, "echo-uvloop", "--uvloop", env={"PYTHONPATH": str(uvloop_path)}))
    else:
        print(f"echo-uvloop skipped: {why}", file=sys.stderr)
    logs = HERE / ".cache" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{'server':12} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'cores':>6} {'us/req':>7}")
    for server in servers:
        start(server, logs)
        try:
            wait_ready(server)
            for concurrency in (1, 8, 64):
                r = measure(server, concurrency, max(args.duration, 2.0))
                print(f"{server.name:12} {concurrency:>4} {r['requests_per_s']:>8,.0f} {r['p50_ms']:>7.3f} "
                      f"{r['cores']:>6.2f} {r['us_per_request']:>7.0f}", flush=True)
        finally:
            stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
