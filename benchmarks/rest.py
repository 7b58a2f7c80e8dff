"""The REST frontend's benchmark (issue 14): REST JSON and REST binary beside gRPC, Triton's core HTTP (PyTriton),
MLServer's REST and a bare HTTP echo on nnserve's own stack, side by side in one run.

    python benchmarks/rest.py --quick     # ~1 min: nnserve and the HTTP echo, seed network, 1 round of 1 s points
    python benchmarks/rest.py             # ~7 min: + the 25M network, MLServer, PyTriton, perf_analyzer; 3 rounds

Servers, each its own process (group), all started first and up for the whole run, pinned (sched_setaffinity) to the
first half of the CPUs; the load generators run on the other half (on 2 cores: one each):

* `nnserve`: `nnserve serve` with its defaults, gRPC and HTTP on, both models;
* `http-echo`: `http_echo_server.py`, nnserve's own HTTP layer (uvicorn + httptools, its socket and body reading,
  on a loop shared with an empty grpc.aio server) answering v2 JSON and binary requests with no model: the
  transport ceiling of the REST frontend;
* `mlserver`, `mlserver-batch`: MLServer 1.7.1 (`peers/`), its REST port, adaptive batching off and on;
* `pytriton`: Triton's core through PyTriton 0.7.0, its HTTP port (Triton's own HTTP server and dynamic batcher).

Models: the seed network (`examples/000_layer_4x3.json`, 4 -> 3; 1-row requests at c=1, 8, 64) and the ~25M-parameter
MLP (1024x4096x4096x1024; 8-row requests at c=16), built with `nnserve build` into `.cache/repository`.

Clients, never in a server's process, the same bytes for every server:

* `wrk` (Debian's package) for every REST point: one thread, keep-alive, a Lua script that reads the request body from
  a file; JSON (`data` flat, float32 values widened to double as tritonclient sends them) or Triton's binary tensor
  extension (`Inference-Header-Content-Length`, the input as raw bytes, `binary_data_output` asked for);
* `loadgen.py --client raw` for nnserve's gRPC (grpc.aio, pre-serialized requests: Python, so it costs its core
  several times what wrk does);
* Triton's `perf_analyzer` (C++, the same code for both protocols), `-i http` (binary tensors both ways, its default)
  and `-i grpc` against nnserve, `-i http` against PyTriton. It cannot drive MLServer (no model configuration or
  statistics over HTTP) or the echo (neither has them): those are measured with wrk only.

For every point the server's CPU time (user + system of its whole process tree, from /proc) is sampled while the
client runs; `us/req` is the CPU per answered request over the window under load, the figure that holds up on a
machine shared with other work. For nnserve the point's ModelStatistics deltas say where a request's time went
inside the data plane (queue, decoding, onnxruntime, encoding): the CPU breakdown of what nnserve adds to the echo.

Each round measures every point on every server in turn, the servers' order rotating from round to round; a
point's value is the median over the rounds. The issue's targets are ratios of those medians, printed MET / NOT MET.
The table goes to stdout, every sample with the machine, the versions and the load average per round to
`benchmarks/results/rest-<time>.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
WORK = CACHE / "rest"
sys.path.insert(0, str(HERE))

import peers  # noqa: E402
import perf_analyzer  # noqa: E402
import rest_profile  # noqa: E402
from common import CHECKOUT_BOOTSTRAP, free_port, save_results, stop_process_group  # noqa: E402
from http_stack import machine as machine_facts  # noqa: E402
from run import BIG, SEED, build_repository, onnx_path  # noqa: E402

WIDTH_IN = {SEED: 4, BIG: 1024}
WIDTH_OUT = {SEED: 3, BIG: 1024}
LEVELS = (1, 8, 64)
BIG_ROWS, BIG_CONCURRENCY = 8, 16
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.1
"""How often the servers' CPU time is read while a client runs."""
WINDOW = {"wrk": (0.3, 0.2), "raw": (1.2, 0.4), "perf_analyzer": (0.6, 0.3)}
"""Per client, seconds after its start and before its end that the CPU window leaves out: its start-up (the raw
client's interpreter and imports, before its warm-up) and its wind-down. `raw` adds its warm-up to the first."""
FORM_LABEL = {"json": "REST JSON", "binary": "REST binary", "grpc": "gRPC"}

WRK_SCRIPT = """\
local file = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {{"requests": %d, "duration_us": %d, "errors": %d, "status": %d, ' ..
    '"p50_us": %d, "p99_us": %d}}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout, e.status, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Point:
    """One measurement: a model, rows per request, a concurrency, the wire form and the client."""

    model: str
    rows: int
    concurrency: int
    form: str
    """"json" or "binary" (REST), or "grpc"."""
    client: str
    """"wrk", "raw" (loadgen.py) or "perf_analyzer"."""

    @property
    def label(self) -> str:
        return f"{FORM_LABEL[self.form]} ({self.client})"


@dataclass
class Server:
    name: str
    command: list[str]
    forms: tuple[str, ...]
    """REST forms measured with wrk."""
    grpc: bool = False
    """Whether the raw gRPC client measures it (nnserve)."""
    pa: tuple[str, ...] = ()
    """perf_analyzer protocols it is measured with ("http", "grpc")."""
    models: tuple[str, ...] = (SEED, BIG)
    port_file: Path | None = None
    http_port: int = 0
    grpc_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    error: str = ""


# -- the servers --------------------------------------------------------------------------------------------------


def split_cpus(pin: bool) -> tuple[set[int], set[int]]:
    """(server CPUs, client CPUs): the first and the second half of the CPUs this process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    if not pin or not half:
        return set(cpus), set(cpus)
    return set(cpus[:half]), set(cpus[half:])


def choose_servers(repo: Path, args: argparse.Namespace, skipped: dict[str, str]) -> list[Server]:
    models = (SEED,) if args.quick else (SEED, BIG)
    nnserve_ports = WORK / "nnserve.ports.json"
    echo_ports = WORK / "http-echo.ports.json"
    nnserve = [sys.executable, "-c", CHECKOUT_BOOTSTRAP, str(args.checkout)] if args.checkout else [
        sys.executable, "-m", "nnserve"]
    chosen = [
        Server("nnserve", [*nnserve, "--log-level", "WARNING", "serve", "--model-repository", str(repo), "--host",
                           "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "off", "--device",
                           "cpu", "--port-file", str(nnserve_ports)],
               ("json", "binary"), grpc=True, pa=("http", "grpc"), models=models, port_file=nnserve_ports),
        Server("http-echo", [sys.executable, str(HERE / "http_echo_server.py"), "--port-file", str(echo_ports)],
               ("json", "binary"), models=models, port_file=echo_ports),
    ]
    if args.quick or args.no_peers:
        skipped["mlserver"] = skipped["pytriton"] = "not run (--quick or --no-peers)"
        return chosen
    more = {BIG: onnx_path(repo, BIG)}
    python, why = peers.setup_mlserver(install=not args.no_install)
    if python is None:
        skipped["mlserver"] = why
    else:
        for name, adaptive in (("mlserver", False), ("mlserver-batch", True)):
            ports = (free_port(), free_port(), free_port())
            command = peers.mlserver_command(python, WORK / name, SEED, onnx_path(repo, SEED), ports,
                                             adaptive_batching=adaptive, more_models=more)
            chosen.append(Server(name, command, ("json",), models=models, http_port=ports[1]))
    python, why = peers.setup_pytriton(install=not args.no_install)
    if python is None:
        skipped["pytriton"] = why
    else:
        ports = (free_port(), free_port(), free_port())
        command = peers.pytriton_command(python, SEED, onnx_path(repo, SEED), ports, more_models=more)
        chosen.append(Server("pytriton", command, ("json", "binary"), pa=("http",), models=models,
                             http_port=ports[1], grpc_port=ports[0]))
    return chosen


def start(server: Server, cpus: set[int]) -> None:
    server.log = WORK / f"{server.name}.log"
    if server.port_file is not None:
        server.port_file.unlink(missing_ok=True)
    with server.log.open("wb") as log:
        server.process = subprocess.Popen(server.command, stdout=log, stderr=subprocess.STDOUT, cwd=WORK,
                                          env={**os.environ, **server.env}, start_new_session=True,
                                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_ready(server: Server, deadline: float) -> None:
    """Until its ports are known and every model answers `GET /v2/models/{m}/ready` with 200; `error` if not."""
    assert server.process is not None
    assert server.log is not None
    while True:
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace").strip().splitlines()[-3:]
            server.error = f"exited with status {server.process.returncode}: {' | '.join(tail)}"
            return
        if time.monotonic() > deadline:
            server.error = f"not ready in time; see {server.log}"
            return
        if server.port_file is not None and not server.http_port and server.port_file.exists():
            ports = json.loads(server.port_file.read_text())
            server.http_port, server.grpc_port = int(ports["http"]), int(ports["grpc"])
        if server.http_port:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if all(http_get(server.http_port, f"/v2/models/{m}/ready")[0] == 200 for m in server.models):
                    return
        time.sleep(0.2)


def stop(server: Server) -> None:
    """SIGTERM the server's process group, SIGKILL what outlives 30 s."""
    stop_process_group(server.process)


# -- requests -----------------------------------------------------------------------------------------------------


def request_array(model: str, rows: int) -> np.ndarray:
    return np.random.default_rng(rows).standard_normal((rows, WIDTH_IN[model])).astype(np.float32)


def rest_body(model: str, rows: int, form: str) -> tuple[bytes, dict[str, str]]:
    """The request body and headers of one REST form, the same bytes for every server."""
    x = request_array(model, rows)
    tensor: dict[str, Any] = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    if form == "json":
        tensor["data"] = x.ravel().tolist()
        body = json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()
        return body, {"Content-Type": "application/json"}
    tensor["parameters"] = {"binary_data_size": x.nbytes}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}},
                        separators=(",", ":")).encode()
    return header + x.tobytes(), {"Content-Type": "application/octet-stream",
                                  "Inference-Header-Content-Length": str(len(header))}


def wrk_script(model: str, rows: int, form: str) -> Path:
    body, headers = rest_body(model, rows, form)
    stem = WORK / f"wrk-{model}-{rows}-{form}"
    body_file = stem.with_suffix(".body")
    body_file.write_bytes(body)
    lines = "\n".join(f'wrk.headers["{key}"] = "{value}"' for key, value in headers.items())
    script = stem.with_suffix(".lua")
    script.write_text(WRK_SCRIPT.format(body=body_file, headers=lines))
    return script


def check_rest(server: Server, model: str, rows: int, form: str) -> str:
    """One request of the form the server is measured with; "" when the answer is a v2 response of the right
    shape (binary: with its raw output after the header), else what is wrong."""
    body, headers = rest_body(model, rows, form)
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        connection.request("POST", f"/v2/models/{model}/infer", body, headers)
        response = connection.getresponse()
        reply = response.read()
        header_length = response.getheader("Inference-Header-Content-Length")
    except (OSError, http.client.HTTPException) as exc:
        return f"{form} request failed: {exc}"
    finally:
        connection.close()
    if response.status != 200:
        return f"{form} request answered {response.status}: {reply[:200]!r}"
    head = reply[:int(header_length)] if header_length else reply
    try:
        output = json.loads(head)["outputs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        return f"{form} answer is not a v2 response ({exc}): {reply[:200]!r}"
    width = WIDTH_IN[model] if server.name == "http-echo" else WIDTH_OUT[model]
    if list(output["shape"]) != [rows, width]:
        return f"{form} answer has shape {output['shape']}, not {[rows, width]}"
    if form == "binary" and (not header_length or len(reply) - int(header_length) != rows * width * 4):
        return f"binary answer carries {len(reply) - int(header_length or 0)} raw bytes, not {rows * width * 4}"
    return ""


def first_failed_check(server: Server) -> str:
    """What is wrong with the first form and model the server answers wrongly; "" when all are right."""
    shapes = [(SEED, 1)] + ([(BIG, BIG_ROWS)] if BIG in server.models else [])
    for model, rows in shapes:
        for form in server.forms:
            why = check_rest(server, model, rows, form)
            if why:
                return f"{model}: {why}"
    return ""


# -- measuring ----------------------------------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and every descendant (PyTriton's tritonserver and its Python backend stubs, MLServer's workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += parents.get(pid, [])
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLOCK_TICKS


def run_sampled(command: list[str], pids: list[int], window: tuple[float, float], timeout_s: float,
                env: dict[str, str] | None = None) -> tuple[int, str, str, float | None]:
    """Run a client to its end, reading the servers' CPU time meanwhile: (status, stdout, stderr, server cores over
    the window under load, None when the run was too short to have one)."""
    skip, tail = window
    samples: list[tuple[float, float]] = []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        while process.poll() is None:
            now = time.monotonic()
            if now - started > timeout_s:
                process.kill()
                process.wait()
                break
            samples.append((now, cpu_seconds(pids)))
            time.sleep(SAMPLE_S)
        ended = time.monotonic()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    inside = [s for s in samples if started + skip <= s[0] <= ended - tail]
    cores = None
    if len(inside) >= 2 and inside[-1][0] - inside[0][0] > 0.2:
        cores = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
    return process.returncode, stdout, stderr, cores


def nnserve_stats(server: Server, model: str) -> dict[str, float] | None:
    with contextlib.suppress(OSError, http.client.HTTPException, ValueError, KeyError, IndexError):
        status, body = http_get(server.http_port, f"/v2/models/{model}/stats")
        if status == 200:
            entry = json.loads(body)["model_stats"][0]
            stats = entry["inference_stats"]
            out = {"requests": stats["success"]["count"], "executions": entry["execution_count"],
                   "rows": entry["inference_count"], "total_ns": stats["success"]["ns"]}
            for key in ("queue", "compute_input", "compute_infer", "compute_output"):
                out[f"{key}_ns"] = stats[key]["ns"]
            return out
    return None


def stats_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """Per request over the point (warm-up included): microseconds in each stage, rows per execution."""
    if not before or not after or after["requests"] <= before["requests"]:
        return None
    requests = after["requests"] - before["requests"]
    out = {f"{key[:-3]}_us": (after[key] - before[key]) / requests / 1e3
           for key in ("total_ns", "queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns")}
    executions = after["executions"] - before["executions"]
    out["rows_per_execution"] = (after["rows"] - before["rows"]) / executions if executions else 0.0
    return out


def client_command(server: Server, point: Point, args: argparse.Namespace, report: Path,
                   duration: float | None = None) -> list[str]:
    """The client's command line for one point, measuring `duration` seconds (default `--duration`)."""
    duration = duration or args.duration
    if point.client == "wrk":
        return ["wrk", "-t", "1", "-c", str(point.concurrency), "-d", f"{round(duration)}s", "--timeout", "10s",
                "-s", str(wrk_script(point.model, point.rows, point.form)),
                f"http://127.0.0.1:{server.http_port}/v2/models/{point.model}/infer"]
    if point.client == "raw":
        return [sys.executable, str(HERE / "loadgen.py"), "--target", f"127.0.0.1:{server.grpc_port}", "--model",
                point.model, "--width", str(WIDTH_IN[point.model]), "--rows", str(point.rows), "--concurrency",
                str(point.concurrency), "--channels", str(min(point.concurrency, 8)), "--warmup", str(args.warmup),
                "--duration", str(duration)]
    protocol = "grpc" if point.form == "grpc" else "http"
    port = server.grpc_port if protocol == "grpc" else server.http_port
    assert args.pa_binary is not None
    return perf_analyzer.command(args.pa_binary, point.model, f"127.0.0.1:{port}", point.concurrency, report,
                                 batch=point.rows, interval_ms=args.pa_interval_ms, stability_percentage=1000,
                                 max_trials=3, protocol=protocol)


def parse_client(point: Point, code: int, stdout: str, stderr: str, report: Path) -> dict[str, Any]:
    if point.client == "perf_analyzer":
        if code != 0 or not report.exists():
            tail = (stdout + stderr).strip().splitlines()[-3:]
            return {"error": f"perf_analyzer exited {code}: {' | '.join(tail)}"}
        result: dict[str, Any] = dict(perf_analyzer.read_report(report, point.rows))
        report.unlink()
        return result
    if point.client == "raw":
        if code != 0:
            return {"error": " | ".join(stderr.strip().splitlines()[-2:]) or f"loadgen exited {code}"}
        raw = json.loads(stdout)
        return {key: raw[key] for key in ("requests", "errors", "requests_per_s", "rows_per_s", "p50_ms", "p99_ms")}
    for line in stdout.splitlines():
        if line.startswith("WRKJSON "):
            wrk = json.loads(line[len("WRKJSON "):])
            seconds = wrk["duration_us"] / 1e6
            if wrk["requests"] == 0 or wrk["errors"] * 2 > wrk["requests"]:
                return {"error": f"wrk: {wrk['requests']} requests, {wrk['errors']} errors ({wrk['status']} status)"}
            return {"requests": wrk["requests"], "errors": wrk["errors"],
                    "requests_per_s": wrk["requests"] / seconds, "rows_per_s": wrk["requests"] * point.rows / seconds,
                    "p50_ms": wrk["p50_us"] / 1e3, "p99_ms": wrk["p99_us"] / 1e3}
    return {"error": f"wrk exited {code}: {(stderr or stdout).strip()[-200:]}"}


def measure(server: Server, point: Point, args: argparse.Namespace) -> dict[str, Any]:
    """One point against one server, from a client process of its own, with the server's CPU meanwhile."""
    assert server.process is not None
    pids = process_tree(server.process.pid)
    report = WORK / f"pa-{os.getpid()}.csv"
    report.unlink(missing_ok=True)
    skip, tail = WINDOW[point.client]
    if point.client == "raw":
        skip += args.warmup
    env = perf_analyzer.environment() if point.client == "perf_analyzer" else None
    before = nnserve_stats(server, point.model) if server.name == "nnserve" else None
    code, stdout, stderr, cores = run_sampled(client_command(server, point, args, report), pids, (skip, tail),
                                              timeout_s=args.duration * 6 + 60, env=env)
    result = parse_client(point, code, stdout, stderr, report)
    result["load_average"] = os.getloadavg()[0]
    if "error" in result:
        return result
    if cores is not None:
        result["server_cores"] = cores
        result["server_us_per_request"] = cores / result["requests_per_s"] * 1e6
    if before is not None:
        result["stats"] = stats_delta(before, nnserve_stats(server, point.model))
    return result


def plan(server: Server, args: argparse.Namespace) -> list[Point]:
    shapes = [(SEED, 1, c) for c in args.levels]
    if BIG in server.models:
        shapes.append((BIG, BIG_ROWS, BIG_CONCURRENCY))
    points = []
    for model, rows, concurrency in shapes:
        points += [Point(model, rows, concurrency, form, "wrk") for form in server.forms if args.have_wrk]
        if server.grpc:
            points.append(Point(model, rows, concurrency, "grpc", "raw"))
        if args.pa_binary is not None:
            points += [Point(model, rows, concurrency, "grpc" if protocol == "grpc" else "binary", "perf_analyzer")
                       for protocol in server.pa]
    return points


def idle_cores(live: list[Server], seconds: float = 2.0) -> dict[str, float]:
    """Each server's CPU use with no load (timers, pollers: it shares the server CPUs with the one measured)."""
    trees = {s.name: process_tree(s.process.pid) for s in live if s.process is not None}
    before = {name: cpu_seconds(pids) for name, pids in trees.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {name: (cpu_seconds(pids) - before[name]) / elapsed for name, pids in trees.items()}


def run_rounds(live: list[Server], args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    plans = {server.name: plan(server, args) for server in live}
    order = sorted({p for points in plans.values() for p in points},
                   key=lambda p: (p.model != SEED, p.concurrency, p.client, p.form))
    samples: dict[tuple[str, Point], list[dict[str, Any]]] = {}
    loads = []
    total = sum(len(points) for points in plans.values()) * args.rounds
    done = 0
    for round_index in range(args.rounds):
        load_start, round_started = os.getloadavg()[0], time.monotonic()
        shift = round_index % len(live)
        servers = live[shift:] + live[:shift]
        for point in order:
            for server in servers:
                if point not in plans[server.name]:
                    continue
                done += 1
                print(f"[{done}/{total}] round {round_index + 1}: {server.name} {point.model} rows={point.rows} "
                      f"c={point.concurrency} {point.label}", file=sys.stderr, flush=True)
                samples.setdefault((server.name, point), []).append(measure(server, point, args))
        loads.append({"round": round_index + 1, "load_average_at_start": load_start,
                      "load_average_at_end": os.getloadavg()[0], "seconds": time.monotonic() - round_started})
    records = []
    for (name, point), runs in samples.items():
        good = [run for run in runs if "error" not in run and run.get("requests_per_s")]
        record: dict[str, Any] = {"server": name, **asdict(point), "rounds": len(runs), "samples": runs}
        if not good:
            record["error"] = next((run["error"] for run in runs if "error" in run), "no successful request")
        for key in ("requests_per_s", "rows_per_s", "p50_ms", "p99_ms", "server_us_per_request", "server_cores"):
            values = [run[key] for run in good if run.get(key) is not None]
            if values:
                record[key] = statistics.median(values)
        stats = [run["stats"] for run in good if run.get("stats")]
        if stats:
            record["stats"] = {key: statistics.median(s[key] for s in stats) for key in stats[0]}
        record["errors"] = sum(int(run.get("errors", 0)) for run in good)
        records.append(record)
    return records, loads


PROFILED = (("nnserve", "binary", "wrk"), ("nnserve", "json", "wrk"), ("nnserve", "grpc", "raw"),
            ("http-echo", "binary", "wrk"), ("http-echo", "json", "wrk"))
"""(server, form, client) profiled with py-spy after the rounds, on the seed network at c=8."""
PROFILE_CONCURRENCY = 8


def profile_phase(live: list[Server], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The CPU breakdown: each of PROFILED under load while py-spy samples it (`rest_profile.py`)."""
    by_name = {server.name: server for server in live}
    out = []
    for name, form, client in PROFILED:
        server = by_name.get(name)
        if server is None or server.process is None or (client == "wrk" and not args.have_wrk):
            continue
        point = Point(SEED, 1, PROFILE_CONCURRENCY, form, client)
        print(f"profile: {name} {point.label} c={point.concurrency}", file=sys.stderr, flush=True)
        skip = WINDOW[client][0] + (args.warmup if client == "raw" else 0.0)
        seconds = math.ceil(skip + args.profile_s + 2)
        command = client_command(server, point, args, WORK / "unused.csv", duration=seconds)
        found = rest_profile.profile(args.py_spy, server.process.pid, process_tree(server.process.pid), command, None,
                                     skip, args.profile_s, cpu_seconds)
        record: dict[str, Any] = {"server": name, **asdict(point)}
        if "error" in found:
            out.append(record | {"error": found["error"]})
            continue
        result = parse_client(point, found["client_status"], found["client_stdout"], found["client_stderr"],
                              WORK / "unused.csv")
        if "error" in result:
            out.append(record | {"error": result["error"]})
            continue
        rate = result["requests_per_s"]
        loop_us = found["loop_cores"] / rate * 1e6
        active = found["loop_active_samples"] or 1
        record |= {"requests_per_s": rate, "window_s": found["window_s"],
                   "us_per_request": found["tree_cores"] / rate * 1e6, "loop_thread_us": loop_us,
                   "other_threads_us": (found["tree_cores"] - found["loop_cores"]) / rate * 1e6,
                   "loop_groups_us": {group: loop_us * count / active
                                      for group, count in found["loop_samples_by_group"].items()},
                   "loop_active_samples": found["loop_active_samples"], "loop_idle_samples": found["loop_idle_samples"]}
        out.append(record)
    return out


def profile_table(profiles: list[dict[str, Any]]) -> list[str]:
    good = [p for p in profiles if "error" not in p]
    lines = [f"  {p['server']} {FORM_LABEL[p['form']]}: error: {p['error'][:100]}" for p in profiles if "error" in p]
    if not good:
        return lines
    names = [f"{p['server']} {FORM_LABEL[p['form']]}" for p in good]
    width = max(12, *(len(n) for n in names))
    groups = sorted({g for p in good for g in p["loop_groups_us"]},
                    key=lambda g: -max(p["loop_groups_us"].get(g, 0.0) for p in good))
    lines.append(f"  {'us per request':58} " + " ".join(f"{n:>{width}}" for n in names))

    def row(label: str, values: list[float | None]) -> str:
        cells = " ".join(f"{v:>{width},.0f}" if v is not None else f"{'-':>{width}}" for v in values)
        return f"  {label:58} {cells}"

    lines.append(row("server total (process tree, /proc)", [p["us_per_request"] for p in good]))
    lines.append(row("  other threads (executor: onnxruntime; grpc's)", [p["other_threads_us"] for p in good]))
    lines.append(row("  event loop thread, of which (py-spy):", [p["loop_thread_us"] for p in good]))
    for group in groups:
        lines.append(row(f"    {group}", [p["loop_groups_us"].get(group) for p in good]))
    lines.append(row("  (req/s while profiled)", [p["requests_per_s"] for p in good]))
    lines.append(row("  (loop thread samples, active)", [p["loop_active_samples"] for p in good]))
    return lines


# -- targets and the table ----------------------------------------------------------------------------------------


def find(records: list[dict[str, Any]], server: str, model: str, concurrency: int, form: str,
         client: str) -> dict[str, Any] | None:
    return next((r for r in records if r["server"] == server and r["model"] == model
                 and r["concurrency"] == concurrency and r["form"] == form and r["client"] == client
                 and "error" not in r), None)


def _us(record: dict[str, Any]) -> str:
    value = record.get("server_us_per_request")
    return f"{value:,.0f} us" if value is not None else "- us"


def targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets as ratios of this run's medians, each for every client pairing that measures it."""
    out: list[dict[str, Any]] = []

    def add(name: str, ours: dict[str, Any] | None, theirs: dict[str, Any] | None, goal: float,
            key: str = "requests_per_s", lower_is_better: bool = False) -> None:
        if not ours or not theirs or not theirs.get(key):
            out.append({"target": name, "value": None, "goal": goal, "met": None, "lower_is_better": lower_is_better,
                        "detail": "not measured"})
            return
        value = ours[key] / theirs[key]
        unit = {"requests_per_s": "req/s", "rows_per_s": "rows/s", "p50_ms": "ms p50"}[key]
        digits = ",.3f" if key == "p50_ms" else ",.0f"
        detail = (f"{ours[key]:{digits}} vs {theirs[key]:{digits}} {unit}; server CPU/request {_us(ours)} vs "
                  f"{_us(theirs)}")
        out.append({"target": name, "value": value, "goal": goal, "lower_is_better": lower_is_better,
                    "met": value <= goal if lower_is_better else value >= goal, "detail": detail})

    def nn(concurrency: int, form: str, client: str, model: str = SEED) -> dict[str, Any] | None:
        return find(records, "nnserve", model, concurrency, form, client)

    for concurrency in (8, 64):
        add(f"seed c={concurrency}: REST binary vs nnserve gRPC, req/s [perf_analyzer http vs grpc]",
            nn(concurrency, "binary", "perf_analyzer"), nn(concurrency, "grpc", "perf_analyzer"), 0.9)
        add(f"seed c={concurrency}: REST binary vs nnserve gRPC, req/s [wrk vs raw Python gRPC client]",
            nn(concurrency, "binary", "wrk"), nn(concurrency, "grpc", "raw"), 0.9)
    add("seed c=1: REST binary p50 vs nnserve gRPC p50 [perf_analyzer http vs grpc]",
        nn(1, "binary", "perf_analyzer"), nn(1, "grpc", "perf_analyzer"), 1.05, "p50_ms", lower_is_better=True)
    add("seed c=1: REST binary p50 vs nnserve gRPC p50 [wrk vs raw Python gRPC client]",
        nn(1, "binary", "wrk"), nn(1, "grpc", "raw"), 1.05, "p50_ms", lower_is_better=True)
    add("seed c=8: REST binary vs Triton core's HTTP (PyTriton) binary, req/s [wrk]",
        nn(8, "binary", "wrk"), find(records, "pytriton", SEED, 8, "binary", "wrk"), 3.0)
    add("seed c=8: REST binary vs Triton core's HTTP (PyTriton) binary, req/s [perf_analyzer http]",
        nn(8, "binary", "perf_analyzer"), find(records, "pytriton", SEED, 8, "binary", "perf_analyzer"), 3.0)
    add("seed c=8: REST JSON vs Triton core's HTTP (PyTriton) JSON, req/s [wrk]",
        nn(8, "json", "wrk"), find(records, "pytriton", SEED, 8, "json", "wrk"), 3.0)
    mlservers = [r for r in (find(records, name, SEED, 8, "json", "wrk") for name in ("mlserver", "mlserver-batch"))
                 if r]
    mls = max(mlservers, key=lambda r: r["requests_per_s"], default=None)
    best = f" ({mls['server']}, the better of batching off/on)" if mls else ""
    add(f"seed c=8: REST JSON vs MLServer REST JSON{best}, req/s [wrk]", nn(8, "json", "wrk"), mls, 2.0)
    add(f"seed c=8: REST binary vs MLServer REST JSON{best} (it has no binary form), req/s [wrk]",
        nn(8, "binary", "wrk"), mls, 2.0)
    for form in ("binary", "json"):
        for concurrency in LEVELS:
            add(f"seed c={concurrency}: {FORM_LABEL[form]} vs the bare HTTP echo, req/s [wrk]",
                nn(concurrency, form, "wrk"), find(records, "http-echo", SEED, concurrency, form, "wrk"), 0.6)
    add(f"25M net, {BIG_ROWS}-row requests at c={BIG_CONCURRENCY}: REST JSON vs REST binary, rows/s [wrk]",
        nn(BIG_CONCURRENCY, "json", "wrk", BIG), nn(BIG_CONCURRENCY, "binary", "wrk", BIG), 0.5, "rows_per_s")
    return out


def breakdown(records: list[dict[str, Any]]) -> list[str]:
    """Per form and concurrency: the echo's and nnserve's server CPU per request, and where nnserve's requests spent
    their time inside the data plane (ModelStatistics, wall clock)."""
    lines = [f"{'model':9} {'c':>3} {'form':22} {'echo us':>8} {'nnserve us':>10} {'extra us':>9} | "
             f"{'dataplane':>9} {'queue':>6} {'decode':>6} {'ORT':>6} {'encode':>6} {'rows/batch':>10}"]
    shapes = [(SEED, c) for c in LEVELS] + [(BIG, BIG_CONCURRENCY)]
    for model, concurrency in shapes:
        for form, client in (("json", "wrk"), ("binary", "wrk"), ("binary", "perf_analyzer"), ("grpc", "raw"),
                             ("grpc", "perf_analyzer")):
            ours = find(records, "nnserve", model, concurrency, form, client)
            if not ours or ours.get("server_us_per_request") is None:
                continue
            echo = find(records, "http-echo", model, concurrency, form, "wrk") if form != "grpc" else None
            echo_us = echo.get("server_us_per_request") if echo else None
            us = ours["server_us_per_request"]
            cells = (f"{echo_us:>8,.0f} {us:>10,.0f} {us - echo_us:>9,.0f}" if echo_us is not None
                     else f"{'-':>8} {us:>10,.0f} {'-':>9}")
            s = ours.get("stats")
            stats = (f"{s['total_us']:>9,.0f} {s['queue_us']:>6,.0f} {s['compute_input_us']:>6,.0f} "
                     f"{s['compute_infer_us']:>6,.0f} {s['compute_output_us']:>6,.0f} {s['rows_per_execution']:>10.1f}"
                     if s else "")
            lines.append(f"{model:9} {concurrency:>3} {FORM_LABEL[form] + ' (' + client + ')':22} {cells} | {stats}")
    lines.append("  (us: server user+system CPU per answered request; extra: nnserve minus the echo of the same form "
                 "and client; right of |: per request inside nnserve's data plane, wall clock, from ModelStatistics: "
                 "its total, the queue, decoding into arrays, the batch's onnxruntime run, encoding; the JSON body's "
                 "parse and the HTTP layer are outside the data plane)")
    return lines


def table(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"Machine: {m['cpu']}, {m['cpus_available']} CPUs available ({m['cpus_online']} online, cgroup cpu.max "
             f"{m['cgroup_cpu_max']}), {m['os']}, Python {m['python']}; {m['wrk'] or 'no wrk'}",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"CPUs: servers on {s['server_cpus']}, clients on {s['client_cpus']}; nnserve from {s['nnserve_from']}",
             "Load average (1 min) per round: " + ", ".join(
                 f"{r['load_average_at_start']:.1f}-{r['load_average_at_end']:.1f} ({r['seconds']:.0f} s)"
                 for r in result["loads"]),
             f"Run: {s['mode']}, {s['rounds']} round(s) x {s['duration_s']:g} s per point (raw client: + "
             f"{s['warmup_s']:g} s warm-up; perf_analyzer: 3 windows of {s['pa_interval_ms']} ms), server order "
             "rotated each round, medians over rounds",
             "Idle server CPU (cores): " + ", ".join(f"{k} {v:.3f}" for k, v in result["idle_cores"].items()), ""]
    lines.append(f"{'model':9} {'rows':>4} {'c':>3} {'form (client)':28} {'server':15} {'req/s':>8} {'rows/s':>9} "
                 f"{'p50 ms':>8} {'p99 ms':>8} {'us/req':>7} {'cores':>5} {'err':>4}")
    order = {name: i for i, name in enumerate(s["servers"])}
    for r in sorted(result["results"], key=lambda r: (r["model"] != SEED, r["concurrency"], r["client"] != "wrk",
                                                       r["client"], r["form"], order[r["server"]])):
        head = (f"{r['model']:9} {r['rows']:>4} {r['concurrency']:>3} "
                f"{FORM_LABEL[r['form']] + ' (' + r['client'] + ')':28} {r['server']:15}")
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:80]}")
            continue
        us = f"{r['server_us_per_request']:>7,.0f}" if r.get("server_us_per_request") is not None else f"{'-':>7}"
        cores = f"{r['server_cores']:>5.2f}" if r.get("server_cores") is not None else f"{'-':>5}"
        lines.append(f"{head} {r['requests_per_s']:>8,.0f} {r['rows_per_s']:>9,.0f} {r['p50_ms']:>8.3f} "
                     f"{r['p99_ms']:>8.3f} {us} {cores} {r['errors']:>4}")
    lines.append("  (us/req: the server's user+system CPU per answered request, its whole process tree; cores: its "
                 "CPU use under the load)")
    lines += ["", "Server CPU per request: what nnserve adds to the bare HTTP echo", *breakdown(result["results"])]
    if result.get("profiles"):
        lines += ["", f"Server CPU per request by where it goes (py-spy on the loop thread, seed network, "
                      f"c={PROFILE_CONCURRENCY}, {result['settings']['profile_s']:g} s each, after the rounds)",
                  *profile_table(result["profiles"])]
    lines += ["", "Targets (issue 14), ratios of this run's medians"]
    for t in result["targets"]:
        verdict = "n/a" if t["met"] is None else "MET" if t["met"] else "NOT MET"
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        sign = "<=" if t["lower_is_better"] else ">="
        lines.append(f"  {verdict:7} {value:>5} (goal {sign} {t['goal']}) {t['target']}: {t['detail']}")
    if result["skipped"]:
        lines += ["", "Not measured"] + [f"  {name}: {why}" for name, why in result["skipped"].items()]
    return "\n".join(lines)


def versions(live: list[Server]) -> dict[str, str]:
    import importlib.metadata as metadata

    import grpc
    import onnxruntime

    out = {name: metadata.version(name) for name in ("uvicorn", "httptools", "orjson", "numpy")}
    out |= {"grpcio": grpc.__version__, "onnxruntime": onnxruntime.__version__,
            "perf_analyzer": perf_analyzer.TRITONCLIENT}
    packages = {"mlserver": "mlserver", "pytriton": "nvidia-pytriton"}
    for server in live:
        package = packages.get(server.name)
        python = Path(server.command[0]).parent / "python"
        if package and python.exists():
            done = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                                  capture_output=True, text=True, timeout=60)
            out[package] = done.stdout.strip() or "unknown"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="nnserve's REST benchmark (issue 14; see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="nnserve and the echo, seed network, c=1 and 8, 1 round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--duration", type=int, help="measured seconds per point, whole (wrk) (default 2, quick 1)")
    parser.add_argument("--warmup", type=float, help="the raw gRPC client's warm-up seconds (default 0.5)")
    parser.add_argument("--pa-interval-ms", type=int, help="perf_analyzer's window (default 1000, quick 500)")
    parser.add_argument("--no-peers", action="store_true", help="leave out MLServer and PyTriton")
    parser.add_argument("--no-perf-analyzer", action="store_true", help="leave out perf_analyzer")
    parser.add_argument("--no-install", action="store_true", help="never install peers or perf_analyzer")
    parser.add_argument("--profile-s", type=float, help="seconds of py-spy sampling per profiled point after the "
                        "rounds (default 4, quick 0: none)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and clients to separate CPUs")
    parser.add_argument("--checkout", type=Path, help="run nnserve from this checkout's source folders (e.g. "
                        "`git archive HEAD | tar -x -C DIR`: the committed code, not a working tree's edits)")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/rest-<time>.json)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (1 if args.quick else 2)
    args.warmup = args.warmup if args.warmup is not None else 0.5
    args.pa_interval_ms = args.pa_interval_ms or (500 if args.quick else 1000)
    args.levels = (1, 8) if args.quick else LEVELS
    args.profile_s = args.profile_s if args.profile_s is not None else (0.0 if args.quick else 4.0)
    WORK.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    args.have_wrk = shutil.which("wrk") is not None
    if not args.have_wrk:
        skipped["wrk"] = "not installed (apt-get install -y wrk): no REST point is measured with it"
    args.pa_binary = None
    if args.quick or args.no_perf_analyzer:
        skipped["perf_analyzer"] = "not run (--quick or --no-perf-analyzer)"
    else:
        args.pa_binary, why = perf_analyzer.ensure() if not args.no_install else (None, "--no-install")
        if args.pa_binary is None:
            skipped["perf_analyzer"] = why
    args.py_spy = None
    if args.profile_s > 0:
        args.py_spy, why = peers.setup_py_spy(install=not args.no_install)
        if args.py_spy is None:
            skipped["py-spy"] = f"no CPU breakdown by module: {why}"
    print("building the models ...", file=sys.stderr, flush=True)
    repo = build_repository()
    server_cpus, client_cpus = split_cpus(not args.no_pin)
    os.sched_setaffinity(0, client_cpus)  # this process and every client it starts
    chosen = choose_servers(repo, args, skipped)
    result: dict[str, Any] = {"machine": machine_facts(), "settings": {
        "mode": "quick" if args.quick else "full", "rounds": args.rounds, "duration_s": args.duration,
        "warmup_s": args.warmup, "pa_interval_ms": args.pa_interval_ms, "levels": list(args.levels),
        "profile_s": args.profile_s,
        "server_cpus": sorted(server_cpus), "client_cpus": sorted(client_cpus),
        "nnserve_from": str(args.checkout) if args.checkout else "this checkout (installed)",
        "servers": [server.name for server in chosen]}}
    print(f"starting {len(chosen)} servers ...", file=sys.stderr, flush=True)
    try:
        for server in chosen:
            start(server, server_cpus)
        deadline = time.monotonic() + 300
        for server in chosen:
            wait_ready(server, deadline)
        live = []
        for server in chosen:
            why = server.error or first_failed_check(server)
            if why:
                skipped[server.name] = why
                stop(server)
            else:
                live.append(server)
        result["versions"] = versions(live)
        result["idle_cores"] = idle_cores(live)
        result["results"], result["loads"] = run_rounds(live, args)
        if args.py_spy is not None:
            result["profiles"] = profile_phase(live, args)
    finally:
        for server in chosen:
            stop(server)
    result["machine"]["load_average_at_end"] = os.getloadavg()[0]
    result["targets"] = targets(result["results"])
    result["skipped"] = skipped
    out = save_results(result, args.out, HERE / "results" / time.strftime("rest-%Y%m%d-%H%M%S.json"))
    print(table(result))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
