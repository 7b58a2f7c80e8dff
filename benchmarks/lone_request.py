"""Where a lone request's time goes, per server thread: CPU, run-queue wait and wake-ups per request at c=1.

    python benchmarks/lone_request.py                  # ~2 min: 3 rounds x 4 servers x 4 s, seed network
    python benchmarks/lone_request.py --model mlp --variant threads="--grpc-transport threads"

Wall-clock latency on two cores shared with other work swings by 2x between minutes; what a request costs each
thread does not. For each server the raw client (`loadgen.py --client raw`, c=1, one connection) runs for
`--duration` seconds while the server's threads are read from `/proc/<pid>/task/<tid>/schedstat` (time on a CPU,
time runnable but waiting for one, number of times it was scheduled in) and `status` (voluntary context switches):
per answered request, each thread's CPU time, its wait for a CPU, and how often it went to sleep and was woken.
Every wake-up on the request's path is a hand-off between threads (the completion-queue poller, the event loop, a
pool thread), and on a loaded machine each one also waits for a CPU: the number of hand-offs is the design's
part of the latency, the wait per hand-off the machine's.

Servers: `sync_reference_server.py` (grpc's synchronous thread-pool server, onnxruntime in the handler's thread),
nnserve (defaults), and the bare echo servers of `echo_server.py` on grpc.aio and on the thread pool (transport
only); `--variant NAME="FLAGS"` adds this checkout's nnserve with more flags. Rounds interleave the servers.
Thread roles are named from what the thread is: the process's main thread (nnserve's and grpc.aio's event loop; a
sync server's main thread only waits), threads whose kernel name grpc sets (`grpc_global_tim`, `default-executo`,
...), and the rest (Python threads keep the name `python`: grpc's sync poller and the handler pool; grpc.aio's
poller is a native thread too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from latency import (  # noqa: E402
    MLP,
    SEED,
    WIDTHS,
    WORK,
    Server,
    build_repository,
    nnserve_command,
    onnx_path,
    start,
    stop,
    wait_ready,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, dict[str, Any]]:
    """Every thread of `pid`: kernel name, CPU ns, run-queue wait ns, times scheduled, voluntary switches."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            run_ns, wait_ns, slices = map(int, (task / "schedstat").read_text().split())
            comm = (task / "comm").read_text().strip()
            voluntary = next(int(line.split()[1]) for line in (task / "status").read_text().splitlines()
                             if line.startswith("voluntary_ctxt_switches"))
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(task.name)] = {"comm": comm, "run_ns": run_ns, "wait_ns": wait_ns, "slices": slices,
                               "voluntary": voluntary}
    return out


def measure(server: Server, model: str, duration: float) -> dict[str, Any]:
    assert server.process is not None
    pid = server.process.pid
    command = [sys.executable, str(HERE / "loadgen.py"), "--target", f"127.0.0.1:{server.port}", "--model", model,
               "--width", str(WIDTHS[model]), "--concurrency", "1", "--channels", "1", "--client", "raw",
               "--warmup", "0", "--duration", str(duration)]
    before = threads(pid)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120, check=True)
    after = threads(pid)
    result = json.loads(done.stdout)
    requests = result["requests"]
    per_thread = []
    for tid, now in after.items():
        then = before.get(tid, {"run_ns": 0, "wait_ns": 0, "slices": 0, "voluntary": 0})
        row = {"tid": tid, "role": "main" if tid == pid else now["comm"],
               "cpu_us": (now["run_ns"] - then["run_ns"]) / requests / 1e3,
               "runqueue_us": (now["wait_ns"] - then["wait_ns"]) / requests / 1e3,
               "wakeups": (now["voluntary"] - then["voluntary"]) / requests}
        if row["cpu_us"] >= 0.5 or row["wakeups"] >= 0.05:
            per_thread.append(row)
    per_thread.sort(key=lambda r: -r["cpu_us"])
    return {"p50_ms": result["p50_ms"], "requests_per_s": result["requests_per_s"], "requests": requests,
            "threads": per_thread, "cpu_us": sum(r["cpu_us"] for r in per_thread),
            "runqueue_us": sum(r["runqueue_us"] for r in per_thread),
            "wakeups": sum(r["wakeups"] for r in per_thread), "load_average": os.getloadavg()[0]}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds; threads matched by role and rank (tids differ between servers, not rounds)."""
    out: dict[str, Any] = {key: statistics.median(r[key] for r in runs)
                           for key in ("p50_ms", "requests_per_s", "cpu_us", "runqueue_us", "wakeups")}
    out["threads"] = [{"role": rows[0]["role"], **{key: statistics.median(r[key] for r in rows)
                                                   for key in ("cpu_us", "runqueue_us", "wakeups")}}
                      for rows in zip(*(r["threads"] for r in runs), strict=False)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SEED, choices=(SEED, MLP))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"')
    parser.add_argument("--no-echo", action="store_true", help="leave the bare echo servers out")
    parser.add_argument("--json", type=Path, help="write the medians here")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    repo = build_repository()
    servers = [Server("sync-reference", [sys.executable, str(HERE / "sync_reference_server.py"), "--port", "0",
                                         f"--model={args.model}={onnx_path(repo, args.model)}", "--port-file",
                                         str(WORK / "ports-sync-reference.json")]),
               Server("nnserve", nnserve_command(repo, WORK / "ports-nnserve.json", None))]
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        servers.append(Server(name, nnserve_command(repo, WORK / f"ports-{name}.json", None, *flags.split())))
    if not args.no_echo:
        for name, flags in (("echo-aio", []), ("echo-threads", ["--threads", "16"])):
            servers.append(Server(name, [sys.executable, str(HERE / "echo_server.py"), "--port", "0", "--model",
                                         args.model, "--width", str(WIDTHS[args.model]), *flags, "--port-file",
                                         str(WORK / f"ports-{name}.json")]))
    for server in servers:
        (WORK / f"ports-{server.name}.json").unlink(missing_ok=True)
    samples: dict[str, list[dict[str, Any]]] = {}
    try:
        for server in servers:
            start(server)
        for server in servers:
            wait_ready(server, models=(args.model,))
        for round_index in range(args.rounds):
            order = servers[round_index % len(servers):] + servers[:round_index % len(servers)]
            for server in order:
                print(f"round {round_index + 1}: {server.name}", file=sys.stderr, flush=True)
                samples.setdefault(server.name, []).append(measure(server, args.model, args.duration))
    finally:
        for server in servers:
            stop(server)
    result = {name: summary(runs) for name, runs in samples.items()}
    loads = [r["load_average"] for runs in samples.values() for r in runs]
    print(f"model {args.model}, raw client c=1, {args.rounds} rounds x {args.duration} s, medians; load average "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print(f"{'server':16} {'p50 ms':>7} {'req/s':>7} {'cpu us':>7} {'wait us':>8} {'wakeups':>8}   per thread: "
          "role cpu/wait us, wakeups per request")
    for name, s in result.items():
        parts = "; ".join(f"{t['role']} {t['cpu_us']:.0f}/{t['runqueue_us']:.0f} {t['wakeups']:.2f}"
                          for t in s["threads"][:6])
        print(f"{name:16} {s['p50_ms']:>7.3f} {s['requests_per_s']:>7.0f} {s['cpu_us']:>7.0f} {s['runqueue_us']:>8.0f} "
              f"{s['wakeups']:>8.2f}   {parts}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "results": result, "samples": samples}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
