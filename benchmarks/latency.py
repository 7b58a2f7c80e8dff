"""Low-concurrency latency (issue 18): nnserve beside a plain synchronous gRPC server, in one run.

    python benchmarks/latency.py --quick                      # ~4 min: 1 round, short points
    python benchmarks/latency.py --baseline /tmp/main          # ~20 min: + main's nnserve from a worktree, 3 rounds
    python benchmarks/latency.py --variant threads="--grpc-transport threads"

Servers, each its own process, all started first and up for the whole run:

* `sync-reference`: `sync_reference_server.py`, a plain KServe v2 server on grpc's synchronous thread-pool server,
  no batching, onnxruntime run in the handler's thread: what a lone client is measured against;
* `nnserve`: this checkout's `nnserve serve`, defaults (HTTP/REST on too, measured with wrk);
* `nnserve-threads`: the same with `--grpc-transport threads` (grpc's thread-pool server in front of the same
  request path; `--no-threads` leaves it out);
* `nnserve-main` (with `--baseline DIR`): the same command from another checkout's source, e.g. a `git worktree` of
  main, run with this interpreter's packages: the request rates at c=8 and c=64 that a change must keep;
* `--variant NAME="FLAGS"`: this checkout's server with extra flags (repeatable), e.g. another gRPC transport.

Models: the seed network `layer_4x3` (4 -> 3) and a 64-256-256-10 MLP (`mlp`, random weights), 1-row requests.
Clients, never in a server's process: `loadgen.py --client raw` (grpc.aio, pre-serialized requests), Triton's
`perf_analyzer` (C++, sync gRPC; `perf_analyzer.py` fetches it into `.cache`), and for the REST frontend `wrk`
(keep-alive, a JSON infer body; skipped without wrk). Levels c=1, 8, 64.

Each round measures every point on every server in turn, the servers' order rotating from round to round, so a
busy minute of the shared machine hits them all; a point's value is the median over the rounds (perf_analyzer:
three windows of `--duration` per point). The table gives p50 and requests/s, the targets (p50 at c=1 within 1.2x
of the reference; requests/s at c=8 and c=64 at least 0.95x of main's) and the load average during each round.
JSON goes to `benchmarks/results/latency-<time>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
WORK = CACHE / "latency"
sys.path.insert(0, str(HERE))

import perf_analyzer  # noqa: E402
from common import CHECKOUT_BOOTSTRAP as _BOOTSTRAP  # noqa: E402
from common import stop_process_group  # noqa: E402

SEED = "layer_4x3"
MLP = "mlp"
WIDTHS = {SEED: 4, MLP: 64}
LEVELS = (1, 8, 64)
REFERENCE = "sync-reference"
MAIN = "nnserve-main"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {{"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, ' ..
    '"p99_us": %d}}\\n', summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Server:
    name: str
    command: list[str]
    http: bool = False
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    http_port: int | None = None
    log: Path | None = None


@dataclass(frozen=True)
class Point:
    model: str
    client: str
    concurrency: int


@dataclass
class Plan:
    servers: list[Server] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)


# -- models and servers -------------------------------------------------------------------------------------------


def build_repository() -> Path:
    repo = CACHE / "latency-repo"
    nnserve = [sys.executable, "-m", "nnserve", "build"]
    subprocess.run([*nnserve, str(ROOT / "examples" / "000_layer_4x3.json"), "-r", str(repo), "--skip-unchanged"],
                   check=True, capture_output=True)
    subprocess.run([*nnserve, "--random", "64x256x256x10", "--seed", "0", "--name", MLP, "-r", str(repo),
                    "--skip-unchanged"], check=True, capture_output=True)
    return repo


def onnx_path(repo: Path, model: str) -> Path:
    return max((repo / model).glob("*/model.onnx"), key=lambda p: int(p.parent.name))


def nnserve_command(repo: Path, port_file: Path, checkout: Path | None, *extra: str) -> list[str]:
    head = [sys.executable, "-c", _BOOTSTRAP, str(checkout)] if checkout else [sys.executable, "-m", "nnserve"]
    return [*head, "--log-level", "WARNING", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
            "--grpc-port", "0", "--http-port", "0", "--metrics-port", "off", "--device", "cpu", "--port-file",
            str(port_file), *extra]


def has_threads_transport() -> bool:
    """Whether this checkout's `nnserve serve` has `--grpc-transport` (issue 18)."""
    done = subprocess.run([sys.executable, "-m", "nnserve", "serve", "--help"], capture_output=True, text=True)
    return "--grpc-transport" in done.stdout


def choose_servers(repo: Path, args: argparse.Namespace) -> list[Server]:
    models = [f"--model={m}={onnx_path(repo, m)}" for m in (SEED, MLP)]
    chosen = [Server(REFERENCE, [sys.executable, str(HERE / "sync_reference_server.py"), "--port", "0",
                                 "--threads", str(args.reference_threads), *models])]
    chosen.append(Server("nnserve", [], http=True))
    if not args.no_threads and has_threads_transport():
        chosen.append(Server("nnserve-threads", ["--grpc-transport", "threads"]))
    if args.baseline is not None:
        chosen.append(Server(MAIN, [], http=args.rest_main))
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        chosen.append(Server(name, shlex.split(flags)))
    for server in chosen:
        port_file = WORK / f"ports-{server.name}.json"
        port_file.unlink(missing_ok=True)
        if server.name == REFERENCE:
            server.command += ["--port-file", str(port_file)]
        elif server.name == MAIN:
            server.command = nnserve_command(repo, port_file, args.baseline)
        else:
            server.command = nnserve_command(repo, port_file, None, *server.command)
    return chosen


def start(server: Server) -> None:
    server.log = WORK / f"{server.name}.log"
    with server.log.open("wb") as log:
        server.process = subprocess.Popen(server.command, stdout=log, stderr=subprocess.STDOUT, cwd=WORK,
                                          start_new_session=True)


def wait_ready(server: Server, timeout: float = 120.0, models: tuple[str, ...] = (SEED, MLP)) -> None:
    """Until the port file exists and every model answers ModelReady, each call with a deadline."""
    import grpc

    from nnserve.protos import grpc_service_pb2 as pb
    from nnserve.protos import grpc_service_pb2_grpc as pb_grpc

    assert server.process is not None
    port_file = WORK / f"ports-{server.name}.json"
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} did not start; see {server.log}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    server.port = ports["grpc"]
    server.http_port = ports.get("http") if server.http else None
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model in models:
            while True:
                left = deadline - time.monotonic()
                if server.process.poll() is not None or left <= 0:
                    raise RuntimeError(f"{server.name}: {model} not ready; see {server.log}")
                with contextlib.suppress(grpc.RpcError):
                    if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=min(left, 5.0),
                                       wait_for_ready=True).ready:
                        break
                time.sleep(0.1)


def stop(server: Server) -> None:
    stop_process_group(server.process)


# -- measuring ----------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wrk_body(model: str) -> str:
    values = ",".join(f"{(i % 7) * 0.25 - 0.5:g}" for i in range(WIDTHS[model]))
    return json.dumps({"inputs": [{"name": "input", "shape": [1, WIDTHS[model]], "datatype": "FP32",
                                   "data": json.loads(f"[{values}]")}]}, separators=(",", ":"))


def run_wrk(port: int, model: str, concurrency: int, seconds: float) -> dict[str, Any]:
    script = WORK / f"wrk-{model}.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT.format(body=wrk_body(model)))
    command = ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s",
               "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}/v2/models/{model}/infer"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("WRKJSON "):
            result = json.loads(line[len("WRKJSON "):])
            elapsed = result["duration_us"] / 1e6
            return {"requests_per_s": result["requests"] / elapsed, "p50_ms": result["p50_us"] / 1e3,
                    "p99_ms": result["p99_us"] / 1e3, "errors": result["errors"], "requests": result["requests"]}
    return {"error": f"wrk exited {done.returncode}: {(done.stderr or done.stdout).strip()[-200:]}"}


def measure(server: Server, point: Point, args: argparse.Namespace, pa_binary: Path | None) -> dict[str, Any]:
    """One point against one server from a client process of its own; server CPU per request where countable."""
    target = f"127.0.0.1:{server.port}"
    assert server.process is not None
    if point.client == "perf_analyzer":
        assert pa_binary is not None
        # Three windows of --duration, accepted whatever their spread: the rounds' median handles the noise of a
        # shared machine, where perf_analyzer's own stability rule (100 %) keeps failing.
        result = perf_analyzer.run(pa_binary, point.model, target, point.concurrency,
                                   interval_ms=int(args.duration * 1000), stability_percentage=1000, max_trials=3)
        return result if isinstance(result, dict) else {"error": result}
    if point.client == "wrk":
        assert server.http_port is not None
        if args.warmup > 0:
            run_wrk(server.http_port, point.model, point.concurrency, args.warmup)
        before = cpu_seconds(server.process.pid)
        result = run_wrk(server.http_port, point.model, point.concurrency, args.duration)
        if result.get("requests"):
            result["server_us_per_request"] = (cpu_seconds(server.process.pid) - before) / result["requests"] * 1e6
        return result
    command = [sys.executable, str(HERE / "loadgen.py"), "--target", target, "--model", point.model, "--width",
               str(WIDTHS[point.model]), "--concurrency", str(point.concurrency), "--channels",
               str(min(point.concurrency, 8)), "--client", "raw", "--warmup", str(args.warmup), "--duration",
               str(args.duration)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.duration * 4 + args.warmup + 120)
    if done.returncode != 0:
        return {"error": " | ".join(done.stderr.strip().splitlines()[-2:])}
    return dict(json.loads(done.stdout))


def plan(servers: list[Server], args: argparse.Namespace, have_pa: bool, have_wrk: bool) -> list[Point]:
    clients = ["raw"] + (["perf_analyzer"] if have_pa else [])
    points = [Point(model, client, c) for model in (SEED, MLP) for client in clients for c in LEVELS]
    if have_wrk and any(s.http for s in servers):  # REST: this checkout's server (and main's with --rest-main)
        points += [Point(model, "wrk", c) for model in (SEED, MLP) for c in LEVELS]
    return points


def run_rounds(live: list[Server], points: list[Point], args: argparse.Namespace,
               pa_binary: Path | None) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    samples: dict[tuple[str, Point], list[dict[str, Any]]] = {}
    loads = []
    total = sum(len([s for s in live if point.client != "wrk" or s.http]) for point in points) * args.rounds
    done = 0
    for round_index in range(args.rounds):
        load_before = os.getloadavg()[0]
        order = live[round_index % len(live):] + live[:round_index % len(live)]
        for point in points:
            for server in order:
                if point.client == "wrk" and not server.http:
                    continue
                done += 1
                print(f"[{done}/{total}] round {round_index + 1}: {server.name} {point.model} {point.client} "
                      f"c={point.concurrency}", file=sys.stderr, flush=True)
                samples.setdefault((server.name, point), []).append(measure(server, point, args, pa_binary))
        loads.append({"round": round_index + 1, "load_average_at_start": load_before,
                      "load_average_at_end": os.getloadavg()[0]})
    records = []
    for (name, point), runs in samples.items():
        good = [run for run in runs if "error" not in run and run.get("requests_per_s")]
        record: dict[str, Any] = {"server": name, "model": point.model, "client": point.client,
                                  "concurrency": point.concurrency, "runs": len(runs),
                                  "p50_ms_each": [run.get("p50_ms") if run in good else None for run in runs],
                                  "requests_per_s_each": [run.get("requests_per_s") if run in good else None
                                                          for run in runs]}
        if not good:
            record["error"] = next((run["error"] for run in runs if "error" in run), "no successful request")
        for key in ("requests_per_s", "p50_ms", "p99_ms", "server_us_per_request"):
            values = [run[key] for run in good if run.get(key) is not None]
            if values:
                record[key] = statistics.median(values)
        records.append(record)
    return records, loads


# -- targets and the table ----------------------------------------------------------------------------------------


def find(records: list[dict[str, Any]], server: str, point: Point) -> dict[str, Any] | None:
    return next((r for r in records if r["server"] == server and r["model"] == point.model
                 and r["client"] == point.client and r["concurrency"] == point.concurrency and "error" not in r),
                None)


def paired_ratio(ours: dict[str, Any], theirs: dict[str, Any], key: str) -> float | None:
    """The median over the rounds of ours / theirs measured in the same round (seconds apart): on a shared machine
    the load drifts between rounds far more than between two servers of one round."""
    ratios = [a / b for a, b in zip(ours[f"{key}_each"], theirs[f"{key}_each"], strict=False) if a and b]
    return statistics.median(ratios) if ratios else None


def targets(records: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """p50 at c=1 against the reference (<= 1.2x) and requests/s at c=8 and c=64 against main's (>= 0.95x), each
    the median of the rounds' paired ratios."""
    out = []
    candidates = [n for n in names if n not in (REFERENCE, MAIN)]
    for name in candidates:
        for model in (SEED, MLP):
            for client in ("raw", "perf_analyzer"):
                ours = find(records, name, Point(model, client, 1))
                ref = find(records, REFERENCE, Point(model, client, 1))
                ratio = paired_ratio(ours, ref, "p50_ms") if ours and ref else None
                if ours and ref and ratio is not None:
                    out.append({"server": name, "target": f"p50 c=1 vs {REFERENCE}", "model": model,
                                "client": client, "value": ratio, "goal": 1.2, "met": ratio <= 1.2,
                                "detail": f"{ours['p50_ms']:.3f} vs {ref['p50_ms']:.3f} ms"})
                for level in (8, 64):
                    ours = find(records, name, Point(model, client, level))
                    main = find(records, MAIN, Point(model, client, level))
                    ratio = paired_ratio(ours, main, "requests_per_s") if ours and main else None
                    if ours and main and ratio is not None:
                        out.append({"server": name, "target": f"req/s c={level} vs {MAIN}", "model": model,
                                    "client": client, "value": ratio, "goal": 0.95, "met": ratio >= 0.95,
                                    "detail": f"{ours['requests_per_s']:,.0f} vs {main['requests_per_s']:,.0f}"})
    return out


def table(result: dict[str, Any]) -> str:
    names = result["servers"]
    lines = [f"Machine: {result['machine']}", "Load average per round: " + ", ".join(
        f"{r['load_average_at_start']:.1f}-{r['load_average_at_end']:.1f}" for r in result["loads"]),
        f"Run: {result['settings']}", ""]
    width = max(14, *(len(n) for n in names))
    lines.append(f"{'model':10} {'client':14} {'c':>3}  " + "  ".join(f"{n:>{width}}" for n in names))
    for point in (Point(**p) for p in result["points"]):
        cells = []
        for name in names:
            r = find(result["results"], name, point)
            cells.append(f"{r['p50_ms']:.3f} {r['requests_per_s']:>6,.0f}".rjust(width) if r else "-".rjust(width))
        lines.append(f"{point.model:10} {point.client:14} {point.concurrency:>3}  " + "  ".join(cells))
    lines.append("(each cell: p50 ms, requests/s, medians over the rounds; targets: medians of paired ratios)")
    cpu = [r for r in result["results"] if r.get("server_us_per_request") is not None]
    if cpu:
        lines.append("")
        lines.append("REST (wrk), server CPU per request, us: " + "; ".join(
            f"{r['server']} {r['model']} c={r['concurrency']}: {r['server_us_per_request']:.0f}" for r in cpu))
    if result["targets"]:
        lines.append("")
        lines.append("Targets (issue 18), from this run's medians")
        for t in result["targets"]:
            sign = "<=" if "p50" in t["target"] else ">="
            lines.append(f"  {'MET' if t['met'] else 'NOT MET':7} {t['value']:.2f} (goal {sign} {t['goal']}) "
                         f"{t['server']}: {t['target']}, {t['model']} [{t['client']}]: {t['detail']}")
    return "\n".join(lines)


def machine() -> str:
    import platform

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import grpc
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, grpcio {grpc.__version__}, onnxruntime {onnxruntime.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 1 s points")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--duration", type=float, help="measured seconds per point (default 3, quick 1)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each point (default 1, quick 0.5)")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. a worktree of main) to run as "
                                                      f"'{MAIN}'")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="this checkout's server with extra `nnserve serve` flags (repeatable)")
    parser.add_argument("--no-threads", action="store_true", help="leave out nnserve-threads")
    parser.add_argument("--rest-main", action="store_true", help=f"measure {MAIN}'s REST frontend too")
    parser.add_argument("--reference-threads", type=int, default=16, help="the reference's thread pool size")
    parser.add_argument("--clients", default="raw,perf_analyzer,wrk", help="comma-separated subset")
    parser.add_argument("--models", default=f"{SEED},{MLP}", help="comma-separated subset")
    parser.add_argument("--levels", default="1,8,64", help="comma-separated concurrencies")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/latency-<time>.json)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    WORK.mkdir(parents=True, exist_ok=True)
    clients = set(args.clients.split(","))
    pa_binary = None
    if "perf_analyzer" in clients:
        pa_binary, why = perf_analyzer.ensure()
        if pa_binary is None:
            print(f"perf_analyzer skipped: {why}", file=sys.stderr)
    have_wrk = "wrk" in clients and shutil.which("wrk") is not None
    repo = build_repository()
    servers = choose_servers(repo, args)
    points = [p for p in plan(servers, args, pa_binary is not None, have_wrk)
              if p.client in clients and p.model in args.models.split(",")
              and str(p.concurrency) in args.levels.split(",")]
    result: dict[str, Any] = {"machine": machine(), "servers": [s.name for s in servers],
                              "settings": {"rounds": args.rounds, "duration_s": args.duration,
                                           "warmup_s": args.warmup, "reference_threads": args.reference_threads,
                                           "variants": args.variant,
                                           "baseline": str(args.baseline) if args.baseline else None},
                              "points": [p.__dict__ for p in points]}
    try:
        for server in servers:
            start(server)
        for server in servers:
            wait_ready(server)
        result["results"], result["loads"] = run_rounds(servers, points, args, pa_binary)
    finally:
        for server in servers:
            stop(server)
    result["targets"] = targets(result["results"], result["servers"])
    out = args.out or HERE / "results" / time.strftime("latency-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
