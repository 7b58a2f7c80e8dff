"""nnserve's benchmark suite: one command, one machine, every comparison side by side in one run.

    python benchmarks/run.py            # the full suite (~10-15 min on 2 cores; peers installed on first use)
    python benchmarks/run.py --quick    # a few minutes: short points, nnserve and the echo server only

What it measures (design.md section 7, issue 4):

* ceilings: onnxruntime `InferenceSession.run` in-process at batch 1, 8 and 64 (`ceiling.py`), and a bare grpc
  echo server of the same payload (`echo_server.py`) in three flavours: grpc.aio on asyncio (nnserve's own stack),
  grpc.aio on uvloop, and grpc's synchronous thread-pool server; targets are given against the first and the best;
  and the floor under nnserve's own stack (`echo-typed`: its servicer registration and protobuf messages, no model);
* servers: nnserve (one process, defaults), nnserve with batching off, with the `fixed` delay mode, with
  `--workers 2`; MLServer 1.7.1 (with and without its adaptive batching) and Triton's core through PyTriton;
* for the seed network (`examples/000_layer_4x3.json`, 4 -> 3) and a ~25M-parameter random MLP
  (1024x4096x4096x1024): throughput and p50/p99 latency at concurrency 1, 8 and 64 with 1-row requests, plus
  8-row requests at concurrency 16 for the large network;
* clients, never in a server's process: `loadgen.py --client raw` (grpc.aio with pre-serialized requests, the same
  bytes for every server), nnserve's SDK (`AsyncInferenceClient`), and Triton's `perf_analyzer` (`perf_analyzer.py`).

All servers are started first and stay up; each round then measures every point on every server in turn, so a slow
minute of a shared machine hits all of them, and the reported value of a point is the median over the rounds. The
issue's targets are computed from those medians and printed with the verdict. Results: a table on stdout and
`benchmarks/results/<time>.json` (gitignored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
sys.path.insert(0, str(HERE))

import peers  # noqa: E402
import perf_analyzer  # noqa: E402
from common import free_port, save_results, stop_process_group  # noqa: E402

SEED = "layer_4x3"
BIG = "big"
WIDTHS = {SEED: 4, BIG: 1024}


@dataclass(frozen=True)
class Point:
    """One measurement: a model, rows per request and a concurrency, from one client."""

    model: str
    rows: int
    concurrency: int
    client: str = "raw"


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    models: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    skipped: str = ""
    perf_analyzer: bool = True
    """Whether the server implements what perf_analyzer needs (ModelConfig, ModelStatistics)."""


# -- the machine --------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from nnserve.server import cpu_quota

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    import grpc
    import onnxruntime

    return {
        "cpu": cpu,
        "cpus_online": os.cpu_count(),
        "cpus_available": cpu_quota.available_cpus(),
        "cgroup_cpu_limit": cpu_quota.cgroup_cpu_limit(),
        "memory_gib": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }


# -- models and servers -------------------------------------------------------------------------------------------


def build_repository() -> Path:
    repo = CACHE / "repository"
    nnserve = [sys.executable, "-m", "nnserve"]
    subprocess.run([*nnserve, "build", str(ROOT / "examples" / "000_layer_4x3.json"), "-r", str(repo),
                    "--skip-unchanged"], check=True, capture_output=True)
    subprocess.run([*nnserve, "build", "--random", "1024x4096x4096x1024", "--seed", "0", "--name", BIG, "-r",
                    str(repo), "--skip-unchanged"], check=True, capture_output=True)
    return repo


def onnx_path(repo: Path, model: str) -> Path:
    return max((repo / model).glob("*/model.onnx"), key=lambda p: int(p.parent.name))


def nnserve_server(name: str, repo: Path, *extra: str) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "nnserve", "--log-level", "WARNING", "serve", "--model-repository", str(repo),
               "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", "off", "--metrics-port", "off",
               "--device", "cpu", *extra]
    return Server(name, command, port, (SEED, BIG))


ECHO_FLAVOURS = ("echo", "echo-uvloop", "echo-sync")
"""The bare echo servers: grpc.aio on asyncio (nnserve's stack), grpc.aio on uvloop, grpc's thread-pool server."""


def echo_server(model: str, name: str = "echo", *flags: str, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    command = [sys.executable, str(HERE / "echo_server.py"), "--port", str(port), "--model", model, "--width",
               str(WIDTHS[model]), *flags]
    return Server(name, command, port, (model,), env=env or {})


def servers(repo: Path, args: argparse.Namespace, skipped: dict[str, str]) -> list[Server]:
    chosen = [
        nnserve_server("nnserve", repo),
        nnserve_server("nnserve-nobatch", repo, "--dynamic-batching", "false"),
        nnserve_server("nnserve-fixed", repo, "--batch-delay-mode", "fixed"),
        nnserve_server("nnserve-w2", repo, "--workers", "2"),
        echo_server(SEED),
        echo_server(BIG),
        echo_server(SEED, "echo-sync", "--threads", "16"),
        echo_server(SEED, "echo-typed", "--typed"),
    ]
    uvloop_path, why = peers.setup_uvloop(install=not args.no_install)
    if uvloop_path is None:
        skipped["echo-uvloop"] = why
    else:
        path = os.pathsep.join(p for p in (str(uvloop_path), os.environ.get("PYTHONPATH", "")) if p)
        chosen.append(echo_server(SEED, "echo-uvloop", "--uvloop", env={"PYTHONPATH": path}))
    if args.quick or args.no_peers:
        skipped["mlserver"] = skipped["pytriton"] = "not run (--quick or --no-peers)"
        return chosen
    python, why = peers.setup_mlserver(install=not args.no_install)
    if python is None:
        skipped["mlserver"] = why
    else:
        for name, adaptive in (("mlserver", False), ("mlserver-batch", True)):
            ports = (free_port(), free_port(), free_port())
            command = peers.mlserver_command(python, CACHE / name, SEED, onnx_path(repo, SEED), ports,
                                             adaptive_batching=adaptive)
            chosen.append(Server(name, command, ports[0], (SEED,), perf_analyzer=False))
    python, why = peers.setup_pytriton(install=not args.no_install)
    if python is None:
        skipped["pytriton"] = why
    else:
        ports = (free_port(), free_port(), free_port())
        chosen.append(Server("pytriton", peers.pytriton_command(python, SEED, onnx_path(repo, SEED), ports), ports[0],
                             (SEED,)))
    return chosen


def start(server: Server, logs: Path) -> None:
    server.log = logs / f"{server.name}-{server.models[0]}.log"
    with server.log.open("wb") as log:
        server.process = subprocess.Popen(server.command, stdout=log, stderr=subprocess.STDOUT, cwd=CACHE,
                                          env={**os.environ, **server.env}, start_new_session=True)


def wait_ready(server: Server, timeout: float = 180.0) -> None:
    """Until every model of the server answers ModelReady (the server's own readiness, over gRPC)."""
    import grpc

    from nnserve.protos import grpc_service_pb2 as pb
    from nnserve.protos import grpc_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model in server.models:
            while True:
                assert server.process is not None
                if server.process.poll() is not None:
                    raise RuntimeError(f"exited with {server.process.returncode}; see {server.log}")
                try:
                    if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=2, wait_for_ready=True).ready:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready after {timeout:.0f} s; see {server.log}")
                time.sleep(0.2)


def stop(server: Server) -> None:
    """SIGTERM the server's process group (it and the workers or peers it started), SIGKILL what outlives 30 s."""
    stop_process_group(server.process)


@contextlib.contextmanager
def running(all_servers: list[Server], logs: Path, skipped: dict[str, str]) -> Iterator[list[Server]]:
    try:
        for server in all_servers:
            start(server, logs)
        for server in all_servers:
            try:
                wait_ready(server)
            except RuntimeError as exc:
                server.skipped = f"did not start: {exc}"
                skipped[server.name] = server.skipped
                stop(server)
        yield [server for server in all_servers if not server.skipped]
    finally:
        for server in all_servers:
            stop(server)


# -- measuring ----------------------------------------------------------------------------------------------------


def measure(server: Server, point: Point, args: argparse.Namespace, pa_binary: Path | None) -> dict[str, Any]:
    """One point against one server, from a client process of its own."""
    target = f"127.0.0.1:{server.port}"
    if point.client == "perf_analyzer":
        assert pa_binary is not None
        result = perf_analyzer.run(pa_binary, point.model, target, point.concurrency, batch=point.rows,
                                   interval_ms=int(args.duration * 1000))
        return result if isinstance(result, dict) else {"error": result}
    command = [
        sys.executable, str(HERE / "loadgen.py"), "--target", target, "--model", point.model,
        "--width", str(WIDTHS[point.model]), "--rows", str(point.rows), "--concurrency", str(point.concurrency),
        "--channels", str(min(point.concurrency, 8)), "--client", point.client,
        "--warmup", str(args.warmup), "--duration", str(args.duration),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.duration * 4 + args.warmup + 120)
    if done.returncode != 0:
        return {"error": " | ".join(done.stderr.strip().splitlines()[-2:])}
    return json.loads(done.stdout)


def plan(server: Server, args: argparse.Namespace, have_pa: bool) -> list[Point]:
    """The points a server is measured at."""
    points: list[Point] = []
    levels = (1, 8, 64)
    if SEED in server.models:
        points += [Point(SEED, 1, c) for c in levels]
        if not args.quick and server.name in ("nnserve", "echo"):
            points += [Point(SEED, 1, c, "sdk") for c in levels]
        if have_pa and server.perf_analyzer and server.name in ("nnserve", "nnserve-w2", "pytriton", "echo-typed",
                                                                *ECHO_FLAVOURS):
            points += [Point(SEED, 1, c, "perf_analyzer") for c in levels]
    if BIG in server.models:
        points += [Point(BIG, 1, c) for c in levels] + [Point(BIG, 8, 16)]
        if have_pa and server.perf_analyzer and server.name in ("nnserve", "echo"):
            points += [Point(BIG, 8, 16, "perf_analyzer")]
    return points


def run_rounds(live: list[Server], args: argparse.Namespace, pa_binary: Path | None) -> list[dict[str, Any]]:
    """Every point on every server, `args.rounds` times interleaved; one record per (server, point) with medians."""
    samples: dict[tuple[str, Point], list[dict[str, Any]]] = {}
    order = [(server, point) for server in live for point in plan(server, args, pa_binary is not None)]
    order.sort(key=lambda item: (item[1].model, item[1].client, item[1].rows, item[1].concurrency))
    total = len(order) * args.rounds
    done = 0
    for round_index in range(args.rounds):
        for server, point in order:
            done += 1
            print(f"[{done}/{total}] round {round_index + 1}: {server.name} {point.model} rows={point.rows} "
                  f"c={point.concurrency} client={point.client}", file=sys.stderr, flush=True)
            samples.setdefault((server.name, point), []).append(measure(server, point, args, pa_binary))
    records = []
    for (name, point), runs in samples.items():
        good = [run for run in runs if "error" not in run and run.get("requests_per_s")]
        record: dict[str, Any] = {"server": name, "model": point.model, "rows": point.rows,
                                  "concurrency": point.concurrency, "client": point.client, "runs": len(runs)}
        if not good:
            record["error"] = next((run["error"] for run in runs if "error" in run), "no successful request")
        for key in ("requests_per_s", "rows_per_s", "p50_ms", "p99_ms"):
            values = [run[key] for run in good if run.get(key) is not None]
            if values:
                record[key] = statistics.median(values)
        record["errors"] = sum(int(run.get("errors", 0)) for run in good)
        records.append(record)
    return records


def ceilings(repo: Path, args: argparse.Namespace) -> dict[str, Any]:
    result = {}
    for model in (SEED, BIG):
        done = subprocess.run([sys.executable, str(HERE / "ceiling.py"), "--model", str(onnx_path(repo, model)),
                               "--seconds", str(max(1.0, args.duration))], capture_output=True, text=True, check=True)
        result[model] = json.loads(done.stdout)
    return result


# -- targets and the table ----------------------------------------------------------------------------------------


def find(records: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in records if all(r.get(k) == v for k, v in match.items()) and "error" not in r), None)


def best(records: list[dict[str, Any]], key: str, **match: Any) -> dict[str, Any] | None:
    candidates = [r for r in records if all(r.get(k) == v for k, v in match.items()) and r.get(key)]
    return max(candidates, key=lambda r: r[key], default=None)


def best_of(records: list[dict[str, Any]], key: str, servers: tuple[str, ...], **match: Any) -> dict[str, Any] | None:
    """The record with the highest `key` among those of any of `servers` (each at its best point)."""
    candidates = [r for r in (best(records, key, server=name, **match) for name in servers) if r]
    return max(candidates, key=lambda r: r[key], default=None)


def targets(records: list[dict[str, Any]], ceiling: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets as ratios of this run's medians."""
    out = []

    def add(name: str, value: float | None, goal: float, detail: str, lower_is_better: bool = False) -> None:
        met = None if value is None else (value <= goal if lower_is_better else value >= goal)
        out.append({"target": name, "value": value, "goal": goal, "met": met, "detail": detail})

    for client in ("raw", "perf_analyzer"):
        served = find(records, server="nnserve", model=BIG, rows=8, concurrency=16, client=client)
        top = ceiling[BIG]["64"]["rows_per_s"]
        add(f"25M net, 8-row requests at c=16 vs in-process ORT batch 64 (rows/s) [{client}]",
            served["rows_per_s"] / top if served else None, 0.85,
            f"{served['rows_per_s']:.0f} vs {top:.0f} rows/s" if served else "not measured")
    on = find(records, server="nnserve", model=BIG, rows=1, concurrency=64, client="raw")
    off = find(records, server="nnserve-nobatch", model=BIG, rows=1, concurrency=64, client="raw")
    add("25M net, 1-row requests at c=64: batching on vs off (rows/s) [raw]",
        on["rows_per_s"] / off["rows_per_s"] if on and off else None, 5.0,
        f"{on['rows_per_s']:.0f} vs {off['rows_per_s']:.0f} rows/s" if on and off else "not measured")
    for client in ("raw", "perf_analyzer"):
        ours = best_of(records, "requests_per_s", ("nnserve", "nnserve-w2"), model=SEED, rows=1, client=client)
        for label, flavours in (("bare grpc.aio echo (nnserve's stack)", ("echo",)),
                                ("fastest bare echo", ECHO_FLAVOURS)):
            echo = best_of(records, "requests_per_s", flavours, model=SEED, rows=1, client=client)
            add(f"seed net request rate, nnserve best vs {label} (best over c=1,8,64) [{client}]",
                ours["requests_per_s"] / echo["requests_per_s"] if ours and echo else None, 1.0,
                f"{ours['server']} {ours['requests_per_s']:.0f} (c={ours['concurrency']}) vs {echo['server']} "
                f"{echo['requests_per_s']:.0f} (c={echo['concurrency']}) req/s" if ours and echo else "not measured")
    ours = best_of(records, "requests_per_s", ("nnserve", "nnserve-w2"), model=SEED, rows=1, client="raw")
    mls = best_of(records, "requests_per_s", ("mlserver", "mlserver-batch"), model=SEED, rows=1, client="raw")
    add("seed net request rate, nnserve best vs MLServer best configuration [raw]",
        ours["requests_per_s"] / mls["requests_per_s"] if ours and mls else None, 2.0,
        f"{ours['server']} {ours['requests_per_s']:.0f} vs {mls['server']} {mls['requests_per_s']:.0f} req/s"
        if ours and mls else "MLServer not measured")
    for client in ("raw", "perf_analyzer"):
        ours1 = find(records, server="nnserve", model=SEED, rows=1, concurrency=1, client=client)
        for label, flavours in (("bare grpc.aio echo (nnserve's stack)", ("echo",)),
                                ("fastest bare echo", ECHO_FLAVOURS)):
            echoes = [r for r in (find(records, server=name, model=SEED, rows=1, concurrency=1, client=client)
                                  for name in flavours) if r and r.get("p50_ms")]
            echo1 = min(echoes, key=lambda r: r["p50_ms"], default=None)
            add(f"seed net p50 at c=1, nnserve vs {label} [{client}]",
                ours1["p50_ms"] / echo1["p50_ms"] if ours1 and echo1 else None, 1.2,
                f"{ours1['p50_ms']:.3f} vs {echo1['server']} {echo1['p50_ms']:.3f} ms" if ours1 and echo1
                else "not measured", lower_is_better=True)
    return out


def table(result: dict[str, Any]) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cpus_available']} CPUs available ({m['cpus_online']} online, cgroup "
                 f"limit {m['cgroup_cpu_limit'] or 'none'}), {m['memory_gib']} GiB, {m['os']}, Python {m['python']}, "
                 f"onnxruntime {m['onnxruntime']}, grpcio {m['grpcio']}; load average at start "
                 f"{m['load_average_at_start']:.1f}")
    s = result["settings"]
    lines.append(f"Run: {s['mode']}, {s['rounds']} round(s) x ({s['warmup_s']} s warm-up + {s['duration_s']} s) per "
                 f"point, medians over rounds; clients and servers share the CPUs")
    lines.append("")
    lines.append("In-process onnxruntime ceiling (InferenceSession.run, no server)")
    lines.append(f"{'model':10} {'batch':>5} {'rows/s':>12} {'ms/run':>9}  options")
    for model, by_batch in result["ceilings"].items():
        for batch, value in by_batch.items():
            lines.append(f"{model:10} {batch:>5} {value['rows_per_s']:>12,.0f} {value['median_ms']:>9.3f}  "
                         f"{value['options']}")
    lines.append("")
    lines.append(f"{'model':10} {'rows':>4} {'client':14} {'conc':>4} {'server':16} {'req/s':>9} {'rows/s':>10} "
                 f"{'p50 ms':>8} {'p99 ms':>8} {'err':>4}")
    for r in sorted(result["results"], key=lambda r: (r["model"] != SEED, r["rows"], r["client"], r["concurrency"],
                                                       r["server"])):
        if "error" in r:
            lines.append(f"{r['model']:10} {r['rows']:>4} {r['client']:14} {r['concurrency']:>4} {r['server']:16} "
                         f"error: {r['error'][:60]}")
            continue
        lines.append(f"{r['model']:10} {r['rows']:>4} {r['client']:14} {r['concurrency']:>4} {r['server']:16} "
                     f"{r['requests_per_s']:>9,.0f} {r['rows_per_s']:>10,.0f} {r.get('p50_ms', 0):>8.3f} "
                     f"{r.get('p99_ms', 0):>8.3f} {r['errors']:>4}")
    lines.append("")
    lines.append("Adaptive (default) vs fixed delay mode, nnserve one process, raw client: adaptive / fixed")
    for r in result["results"]:
        if r["server"] != "nnserve" or r["client"] != "raw" or "error" in r:
            continue
        fixed = find(result["results"], server="nnserve-fixed", model=r["model"], rows=r["rows"],
                     concurrency=r["concurrency"], client="raw")
        if fixed:
            lines.append(f"  {r['model']:10} rows={r['rows']} c={r['concurrency']:<3} throughput x"
                         f"{r['rows_per_s'] / fixed['rows_per_s']:.2f}, p50 x{r['p50_ms'] / fixed['p50_ms']:.2f}")
    lines.append("")
    lines.append("Targets (issue 4), from this run's medians")
    for t in result["targets"]:
        verdict = "n/a" if t["met"] is None else "MET" if t["met"] else "NOT MET"
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        sign = "<=" if "p50" in t["target"] else ">="
        lines.append(f"  {verdict:7} {value:>6} (goal {sign} {t['goal']}) {t['target']}: {t['detail']}")
    if result["skipped"]:
        lines.append("")
        lines.append("Skipped")
        for name, why in result["skipped"].items():
            lines.append(f"  {name}: {why}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="nnserve benchmark suite (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="short points, nnserve and echo only (a few minutes)")
    parser.add_argument("--rounds", type=int, help="measurements per point, interleaved (default 2, quick 1)")
    parser.add_argument("--duration", type=float, help="measured seconds per point (default 3, quick 1)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each point (default 1, quick 0.3)")
    parser.add_argument("--no-peers", action="store_true", help="skip MLServer and PyTriton")
    parser.add_argument("--no-perf-analyzer", action="store_true", help="skip Triton's perf_analyzer")
    parser.add_argument("--no-install", action="store_true", help="never install peers or perf_analyzer")
    parser.add_argument("--out", type=Path, help="JSON results file (default benchmarks/results/<time>.json)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0)
    CACHE.mkdir(parents=True, exist_ok=True)
    logs = CACHE / "logs"
    logs.mkdir(exist_ok=True)
    skipped: dict[str, str] = {}
    result: dict[str, Any] = {"machine": machine(), "settings": {
        "mode": "quick" if args.quick else "full", "rounds": args.rounds, "duration_s": args.duration,
        "warmup_s": args.warmup}}
    print("building the models ...", file=sys.stderr, flush=True)
    repo = build_repository()
    pa_binary = None
    if args.quick or args.no_perf_analyzer:
        skipped["perf_analyzer"] = "not run (--quick or --no-perf-analyzer)"
    else:
        pa_binary, why = perf_analyzer.ensure() if not args.no_install else (None, "--no-install")
        if pa_binary is None:
            skipped["perf_analyzer"] = why
    print("in-process onnxruntime ceilings ...", file=sys.stderr, flush=True)
    result["ceilings"] = ceilings(repo, args)
    chosen = servers(repo, args, skipped)
    print(f"starting {len(chosen)} servers ...", file=sys.stderr, flush=True)
    with running(chosen, logs, skipped) as live:
        result["results"] = run_rounds(live, args, pa_binary)
    result["targets"] = targets(result["results"], result["ceilings"])
    result["skipped"] = skipped
    out = save_results(result, args.out, HERE / "results" / time.strftime("%Y%m%d-%H%M%S.json"))
    print(table(result))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
