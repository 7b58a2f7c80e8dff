"""Which HTTP server and JSON codec for nnserve's REST frontend: measured side by side, on this machine, in one run.

    python benchmarks/http_stack.py --quick            # ~3 min: 4 servers, 2 rounds x 2 s per point
    python benchmarks/http_stack.py [--json FILE]      # ~9 min: + aiohttp with stdlib json, 3 rounds x 4 s

The REST frontend must share the asyncio loop of nnserve's grpc.aio server, so every candidate
(`http_candidates.py`) is a process of its own running an empty grpc.aio server and the HTTP server on one loop:
aiohttp (`AppRunner` + `TCPSite`, `handler_cancellation=True`), uvicorn + httptools with a Starlette app, the
same uvicorn with a bare ASGI callable, and that callable racing each infer against the client's disconnect (what
aiohttp's cancellation costs on uvicorn). They share one request path (the v2 JSON tensor straight to numpy and back,
orjson), so the differences are the HTTP layers'. The packages live in their own virtual environment,
`benchmarks/.cache/venvs/http-stack`, created on first use; nnserve's environment is never touched.

Load: `wrk` (Debian's package; `apt-get install -y wrk`) with keep-alive connections, a Lua script for the POST
body and one that prints its summary as JSON; `http_loadgen.py` (raw sockets, pre-serialized requests) when wrk is
not installed or `--client raw`. For each endpoint (`GET /v2/health/ready`, `POST /v2/models/echo/infer` with a 1x4
FP32 tensor) at concurrency 1, 8 and 64: requests/s, p50 and p99 latency, and the server's CPU per request
(user + system from /proc/<pid>/stat over the measured run), the figure that matters on 2 shared cores; the
client's CPU per request too. All servers stay up; each round measures every point on every server in turn (the
order rotated each round) and a point's value is the median over rounds.

Then the caveats, probed on each server: whether a handler is cancelled when its client disconnects, whether gzip
and deflate request bodies are decompressed before the handler sees them, whether the body-size limit holds after
decompression (64 MiB and 1 GiB gzip bombs against a 1 MiB limit: the server's peak RSS, its CPU time, and how long
its loop, the one gRPC shares, stops answering health checks meanwhile), and the JSON codecs in-process
(`http_codecs.py`: json, ujson, orjson at 4, 1024 and 65536 elements; NaN/Inf; the numpy dtypes orjson takes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
WORK = CACHE / "http-stack"
sys.path.insert(0, str(HERE))

import peers  # noqa: E402
from common import stop_process_group  # noqa: E402

PACKAGES = ("aiohttp==3.14.5", "uvicorn==0.54.0", "httptools==0.9.0", "starlette==1.10.0", "orjson==3.13.0",
            "ujson==6.1.0", "numpy==2.4.6", "grpcio==1.85.3")
"""The newest releases pip resolved for Python 3.11 when this was written; numpy and grpcio as in nnserve's venv."""
VERSIONS_OF = ("aiohttp", "uvicorn", "httptools", "starlette", "orjson", "ujson", "numpy", "grpcio", "multidict",
               "yarl", "anyio", "h11")

HEALTH_PATH = "/v2/health/ready"
INFER_PATH = "/v2/models/echo/infer"
INFER_BODY = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
EXPECTED_INFER = {"model_name": "echo", "outputs": [
    {"name": "output", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
ENDPOINTS = {"infer": ("POST", INFER_PATH, INFER_BODY), "health": ("GET", HEALTH_PATH, b"")}
LEVELS = (1, 8, 64)
MAX_BODY = 1 << 20
"""Every candidate's request body limit: aiohttp's default `client_max_size`, Starlette's `max_body_size`."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

WRK_SCRIPT = """\
wrk.method = "{method}"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d}}\\n', summary.requests,
    summary.duration, e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99)))
end
"""


@dataclass
class Candidate:
    """One server process: an HTTP candidate and an empty grpc.aio server on one asyncio loop."""

    name: str
    kind: str
    codec: str = "orjson"
    process: subprocess.Popen[bytes] | None = None
    http_port: int = 0
    grpc_port: int = 0
    log: Path | None = None
    facts: dict[str, Any] = field(default_factory=dict)


# -- the machine and the environment ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    quota = "none"
    with contextlib.suppress(OSError):
        quota = Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    return {"cpu": cpu, "cpus_online": os.cpu_count(), "cpus_available": len(os.sched_getaffinity(0)),
            "cgroup_cpu_max": quota, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "load_average_at_start": round(os.getloadavg()[0], 2),
            "wrk": wrk_version()}


def wrk_version() -> str | None:
    if shutil.which("wrk") is None:
        return None
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    return (done.stdout or done.stderr).splitlines()[0].strip()


def versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; "
            f"print(json.dumps({{n: m.version(n) for n in {list(VERSIONS_OF)!r}}})); ")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return {"python": platform.python_version(), **json.loads(done.stdout)}


# -- the servers --------------------------------------------------------------------------------------------------


def start(candidate: Candidate, python: Path) -> None:
    port_file = WORK / f"{candidate.name}.port"
    port_file.unlink(missing_ok=True)
    candidate.log = WORK / f"{candidate.name}.log"
    command = [str(python), str(HERE / "http_candidates.py"), candidate.kind, "--port-file", str(port_file),
               "--codec", candidate.codec, "--max-body", str(MAX_BODY)]
    with candidate.log.open("wb") as log:
        candidate.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=WORK,
                                             start_new_session=True)


def wait_ready(candidate: Candidate, timeout: float = 60.0) -> None:
    """Until the port file is there and the health route answers; at once if the process exits."""
    assert candidate.process is not None
    port_file = WORK / f"{candidate.name}.port"
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if candidate.process.poll() is not None:
            raise RuntimeError(f"{candidate.name} exited with {candidate.process.returncode}; see {candidate.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{candidate.name} wrote no port file in {timeout:.0f} s; see {candidate.log}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    candidate.http_port, candidate.grpc_port = ports["http"], ports["grpc"]
    status, _, error = http_call(candidate.http_port, "GET", HEALTH_PATH)
    if status != 200:
        raise RuntimeError(f"{candidate.name}: health answered {status} {error}")


def stop(candidate: Candidate) -> None:
    """SIGTERM the server's process group, SIGKILL what outlives 10 s."""
    stop_process_group(candidate.process, grace_s=10)


def http_call(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
              timeout: float = 10.0) -> tuple[int | None, bytes, str]:
    """One request on its own connection (`Connection: close`): (status, body, transport error if any).

    Raw sockets so that a server that answers 413 and closes while the body is still being sent is seen answering.
    """
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    errors = []
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except OSError as exc:
            errors.append(f"send: {type(exc).__name__}")
        try:
            while chunk := sock.recv(1 << 16):
                data += chunk
        except OSError as exc:
            errors.append(f"recv: {type(exc).__name__}")
    status = int(data[9:12]) if data.startswith(b"HTTP/1.") else None
    return status, data.partition(b"\r\n\r\n")[2], "; ".join(errors)


def check(candidate: Candidate) -> None:
    """The candidate answers both routes as specified, and its grpc port accepts connections."""
    status, body, _ = http_call(candidate.http_port, "GET", HEALTH_PATH)
    if status != 200 or json.loads(body) != {"ready": True}:
        raise RuntimeError(f"{candidate.name}: health answered {status} {body[:200]!r}")
    status, body, _ = http_call(candidate.http_port, "POST", INFER_PATH, INFER_BODY,
                                {"Content-Type": "application/json"})
    if status != 200 or json.loads(body) != EXPECTED_INFER:
        raise RuntimeError(f"{candidate.name}: infer answered {status} {body[:200]!r}")
    with socket.create_connection(("127.0.0.1", candidate.grpc_port), timeout=5):
        pass


# -- measuring ----------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of proc(5)


def client_command(client: str, endpoint: str, port: int, concurrency: int, seconds: float) -> list[str]:
    method, path, body = ENDPOINTS[endpoint]
    if client == "wrk":
        script = WORK / f"wrk-{endpoint}.lua"
        if not script.exists():
            script.write_text(WRK_SCRIPT.format(method=method, body=body.decode()))
        return ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{wrk_seconds(seconds)}s",
                "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}{path}"]
    request_file = WORK / f"request-{endpoint}.http"
    if not request_file.exists():
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        request_file.write_bytes(head.encode() + body)
    return [sys.executable, str(HERE / "http_loadgen.py"), "--port", str(port), "--request-file", str(request_file),
            "--connections", str(concurrency), "--duration", str(seconds)]


def wrk_seconds(seconds: float) -> int:
    """wrk takes whole seconds only."""
    return max(1, math.ceil(seconds))


def run_client(command: list[str], seconds: float) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return dict(json.loads(line[len("WRKJSON "):]))
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(f"client exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")


def measure(candidate: Candidate, endpoint: str, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    """A warm-up run, then the measured run with the server's and the client's CPU time around it."""
    assert candidate.process is not None
    pid = candidate.process.pid
    if args.warmup > 0:
        run_client(client_command(args.client, endpoint, candidate.http_port, concurrency, args.warmup), args.warmup)
    command = client_command(args.client, endpoint, candidate.http_port, concurrency, args.duration)
    server_before, client_before, started = cpu_seconds(pid), os.times(), time.monotonic()
    result = run_client(command, args.duration)
    server_after, client_after, ended = cpu_seconds(pid), os.times(), time.monotonic()
    requests = result["requests"]
    seconds = result["duration_us"] / 1e6
    client_cpu = (client_after.children_user - client_before.children_user
                  + client_after.children_system - client_before.children_system)
    errors = sum(int(result.get(key, 0)) for key in ("connect", "read", "write", "status", "timeout"))
    return {"requests_per_s": requests / seconds if seconds else 0.0, "p50_ms": result["p50_us"] / 1e3,
            "p99_ms": result["p99_us"] / 1e3, "server_cores": (server_after - server_before) / (ended - started),
            "server_us_per_request": (server_after - server_before) / requests * 1e6 if requests else None,
            "client_us_per_request": client_cpu / requests * 1e6 if requests else None, "errors": errors,
            "requests": requests}


def idle_cores(candidate: Candidate, seconds: float = 1.0) -> float:
    """The server's CPU use with no load (grpc.aio's and the HTTP server's own timers and pollers)."""
    assert candidate.process is not None
    before, started = cpu_seconds(candidate.process.pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(candidate.process.pid) - before) / (time.monotonic() - started)


def run_rounds(live: list[Candidate], args: argparse.Namespace) -> list[dict[str, Any]]:
    points = [(endpoint, c) for endpoint in ("infer", "health") for c in LEVELS]
    samples: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    total = args.rounds * len(points) * len(live)
    done = 0
    for round_index in range(args.rounds):
        for endpoint, concurrency in points:
            shift = round_index % len(live)
            for candidate in live[shift:] + live[:shift]:
                done += 1
                print(f"[{done}/{total}] round {round_index + 1}: {candidate.name} {endpoint} c={concurrency}",
                      file=sys.stderr, flush=True)
                try:
                    sample = measure(candidate, endpoint, concurrency, args)
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                    sample = {"error": str(exc)}
                samples.setdefault((candidate.name, endpoint, concurrency), []).append(sample)
    records = []
    for (name, endpoint, concurrency), runs in samples.items():
        good = [run for run in runs if "error" not in run and run["requests"]]
        record: dict[str, Any] = {"server": name, "endpoint": endpoint, "concurrency": concurrency,
                                  "rounds": len(runs), "samples": runs}
        if not good:
            record["error"] = next((run["error"] for run in runs if "error" in run), "no request answered")
        for key in ("requests_per_s", "p50_ms", "p99_ms", "server_cores", "server_us_per_request",
                    "client_us_per_request"):
            values = [run[key] for run in good if run.get(key) is not None]
            if values:
                record[key] = statistics.median(values)
        record["errors"] = sum(run.get("errors", 0) for run in good)
        records.append(record)
    return records


# -- the caveats --------------------------------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def gzip_zeros(size: int) -> bytes:
    """`size` zero bytes, gzip-compressed a MiB at a time (a 64 MiB bomb is ~64 KiB)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(bytes(min(1 << 20, size - offset))) for offset in range(0, size, 1 << 20)]
    parts.append(compressor.flush())
    return b"".join(parts)


def probe(candidate: Candidate) -> dict[str, Any]:
    """Disconnect, compressed request bodies and the body limit, as one client would meet them."""
    assert candidate.process is not None
    port, pid = candidate.http_port, candidate.process.pid
    out: dict[str, Any] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /probe/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        time.sleep(0.2)
    time.sleep(1.6)  # the handler's 1 s sleep, then (asgi) what receive() says afterwards
    _, state, _ = http_call(port, "GET", "/probe/state")
    out["disconnect during handler"] = json.loads(state)

    def call(path: str, body: bytes, encoding: str | None, watch_loop: bool = False) -> dict[str, Any]:
        """One POST; with `watch_loop`, health requests one after another meanwhile (the loop's worst stall)."""
        headers = {"Content-Type": "application/json"} | ({"Content-Encoding": encoding} if encoding else {})
        before, cpu_before = memory_kib(pid), cpu_seconds(pid)
        started = time.monotonic()
        answer: list[tuple[int | None, bytes, str]] = []
        sender = threading.Thread(target=lambda: answer.append(http_call(port, "POST", path, body, headers, 60.0)))
        sender.start()
        stalls = []
        while watch_loop and sender.is_alive():
            polled = time.monotonic()
            http_call(port, "GET", HEALTH_PATH)
            stalls.append(time.monotonic() - polled)
        sender.join()
        status, reply, error = answer[0]
        after = memory_kib(pid)
        record: dict[str, Any] = {"sent_bytes": len(body), "status": status, "ms": (time.monotonic() - started) * 1e3,
                                  "server_cpu_ms": (cpu_seconds(pid) - cpu_before) * 1e3,
                                  "peak_rss_growth_mib": (after["VmHWM"] - before["VmHWM"]) / 1024}
        if stalls:
            record["slowest_health_ms_meanwhile"] = max(stalls) * 1e3
        if error:
            record["transport"] = error
        with contextlib.suppress(ValueError):
            parsed = json.loads(reply)
            if isinstance(parsed, dict) and "received" in parsed:
                record["handler_got_bytes"] = parsed["received"]
            elif status == 200:
                record["reply_is_expected"] = parsed == EXPECTED_INFER
        if "handler_got_bytes" not in record and "reply_is_expected" not in record:
            record["reply"] = reply[:100].decode(errors="replace")
        return record

    out["gzip infer body"] = call(INFER_PATH, zlib.compress(INFER_BODY, 9, wbits=31), "gzip")
    out["deflate (zlib) infer body"] = call(INFER_PATH, zlib.compress(INFER_BODY), "deflate")
    out["gzip of 512 KiB zeros"] = call("/probe/body", gzip_zeros(512 << 10), "gzip")
    out["plain 2 MiB body"] = call("/probe/body", bytes(2 << 20), None)
    out["gzip bomb: 64 MiB of zeros"] = call("/probe/body", gzip_zeros(64 << 20), "gzip")
    out["gzip bomb: 1 GiB (1 MiB sent)"] = call("/probe/body", gzip_zeros(1 << 30), "gzip", watch_loop=True)
    out["server still answers"] = http_call(port, "GET", HEALTH_PATH)[0] == 200
    assert candidate.log is not None
    log = candidate.log.read_text(errors="replace").splitlines()
    out["log lines with errors"] = [line for line in log if "Error" in line or "Traceback" in line][:5]
    return out


def codecs(python: Path, quick: bool) -> dict[str, Any]:
    command = [str(python), str(HERE / "http_codecs.py"), *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    return dict(json.loads(done.stdout))


# -- the table ----------------------------------------------------------------------------------------------------


def _probe_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, list):
        return f"{len(value)} line(s)" if value else "none"
    if "slow" in value:
        after = value.get("slow_receive_after")
        return value["slow"] + (f", then receive(): {after}" if after else "")
    cell = str(value["status"])
    if "handler_got_bytes" in value:
        cell += f" handler got {value['handler_got_bytes']:,} B"
    elif "reply_is_expected" in value:
        cell += " echo ok" if value["reply_is_expected"] else " WRONG reply"
    elif value.get("reply") and value["status"] != 413:
        cell += f" {value['reply'][:18]!r}"
    if value["peak_rss_growth_mib"] >= 1:
        cell += f", RSS +{value['peak_rss_growth_mib']:.0f} MiB"
    if value.get("server_cpu_ms", 0) >= 50:
        cell += f", CPU {value['server_cpu_ms']:,.0f} ms"
    if "slowest_health_ms_meanwhile" in value:
        cell += f", loop stall {value['slowest_health_ms_meanwhile']:,.0f} ms"
    return cell


def table(result: dict[str, Any]) -> str:
    m, s, v = result["machine"], result["settings"], result["versions"]
    lines = [f"Machine: {m['cpu']}, {m['cpus_available']} CPUs available ({m['cpus_online']} online, cgroup cpu.max "
             f"{m['cgroup_cpu_max']}), {m['os']}, Python {m['python']}; load average {m['load_average_at_start']} at "
             f"start, {result['load_average_at_end']} at end; client {s['client']} ({m['wrk'] or 'no wrk'})",
             "Versions: " + ", ".join(f"{name} {version}" for name, version in v.items()),
             f"Run: {s['mode']}, {s['rounds']} round(s) x ({s['warmup_s']:g} s warm-up + {s['duration_s']:g} s) per "
             f"point, order rotated each round, medians; server and client share the CPUs", ""]
    records = list(result["results"])
    base = {(r["endpoint"], r["concurrency"]): r for r in records if r["server"] == "aiohttp" and "error" not in r}
    lines.append(f"{'endpoint':8} {'conc':>4} {'server':13} {'req/s':>8} {'x aio':>6} {'p50 ms':>7} {'p99 ms':>7} "
                 f"{'srv us/req':>10} {'x aio':>6} {'srv cores':>9} {'cli us/req':>10} {'err':>4}")
    order = {name: i for i, name in enumerate(result["settings"]["servers"])}
    for r in sorted(records, key=lambda r: (r["endpoint"] != "infer", r["concurrency"], order[r["server"]])):
        head = f"{r['endpoint']:8} {r['concurrency']:>4} {r['server']:13}"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:70]}")
            continue
        ref = base.get((r["endpoint"], r["concurrency"]))
        rate_x = f"{r['requests_per_s'] / ref['requests_per_s']:>6.2f}" if ref else f"{'-':>6}"
        cpu_x = (f"{r['server_us_per_request'] / ref['server_us_per_request']:>6.2f}"
                 if ref and ref.get("server_us_per_request") else f"{'-':>6}")
        lines.append(f"{head} {r['requests_per_s']:>8,.0f} {rate_x} {r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} "
                     f"{r['server_us_per_request']:>10.0f} {cpu_x} {r['server_cores']:>9.2f} "
                     f"{r['client_us_per_request']:>10.0f} {r['errors']:>4}")
    lines.append("  (x aio: ratio to aiohttp at the same point; srv us/req: server user+system CPU per request)")
    lines.append("Geometric mean over c=1, 8, 64 of the ratio to aiohttp (req/s, server CPU per request):")
    for endpoint in ("infer", "health"):
        cells = []
        for name in result["settings"]["servers"]:
            pairs = [(r, base[(endpoint, r["concurrency"])]) for r in records
                     if r["server"] == name and r["endpoint"] == endpoint and "error" not in r
                     and (endpoint, r["concurrency"]) in base and r.get("server_us_per_request")]
            if pairs and name != "aiohttp":
                rate = statistics.geometric_mean([r["requests_per_s"] / ref["requests_per_s"] for r, ref in pairs])
                cpu = statistics.geometric_mean(
                    [r["server_us_per_request"] / ref["server_us_per_request"] for r, ref in pairs])
                cells.append(f"{name} x{rate:.2f} / x{cpu:.2f}")
        lines.append(f"  {endpoint:6}  " + ", ".join(cells))
    lines.append("Idle server CPU (cores, no load): " + ", ".join(
        f"{name} {value:.3f}" for name, value in result["idle_cores"].items()))
    if result.get("probes"):
        names = list(result["probes"])
        lines += ["", f"Caveats, probed on each server (request body limit {MAX_BODY:,} B)"]
        lines.append(f"  {'probe':29} " + " | ".join(f"{name:38}" for name in names))
        for key in result["probes"][names[0]]:
            cells = [_probe_cell(result["probes"][name].get(key, {})) for name in names]
            lines.append(f"  {key:29} " + " | ".join(f"{cell:38}" for cell in cells))
    c = result.get("codecs") or {}
    if "timings" in c:
        lines += ["", f"JSON codecs, in-process, us per call (median of {c['repeats']} batches of >= "
                      f"{c['min_time_s']:g} s); request bodies as tritonclient sends float32 (widened to double)"]
        lines.append(f"  {'elements':>8} {'codec':7} {'parse':>9} {'asarray':>8} {'tolist':>8} {'enc list':>9} "
                     f"{'enc numpy':>9} {'round trip':>10} {'req B':>9} {'resp B list':>11} {'resp B numpy':>12}")
        for t in c["timings"]:
            numpy_us = f"{t['encode_numpy_us']:>9.1f}" if "encode_numpy_us" in t else f"{'-':>9}"
            numpy_b = f"{t['response_bytes_numpy']:>12,}" if "response_bytes_numpy" in t else f"{'-':>12}"
            lines.append(f"  {t['elements']:>8} {t['codec']:7} {t['parse_us']:>9.1f} {t['asarray_us']:>8.1f} "
                         f"{t['tolist_us']:>8.1f} {t['encode_tolist_us']:>9.1f} {numpy_us} {t['round_trip_us']:>10.1f} "
                         f"{t['request_bytes']:>9,} {t['response_bytes_tolist']:>11,} {numpy_b}")
        lines.append("  (round trip = parse + asarray + the cheaper encode; enc list includes .tolist(); every codec "
                     "parsed the same array: " + str(all(t["same_array_as_json"] for t in c["timings"])) + ")")
        lines += ["", "Non-finite values and null (v2 JSON has no NaN)"]
        for codec, cases in c["non_finite"].items():
            for case, outcome in cases.items():
                lines.append(f"  {codec:7} {case:40} {outcome[:90]}")
        lines += ["", "orjson OPT_SERIALIZE_NUMPY by array"]
        for case, outcome in c["orjson_numpy"].items():
            lines.append(f"  {case:42} {outcome[:90]}")
    elif c:
        lines.append(f"JSON codecs: {c.get('error')}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="HTTP server and JSON codec for the REST frontend (see the docstring)")
    parser.add_argument("--quick", action="store_true", help="4 servers, 2 rounds of 2 s points (~3 min)")
    parser.add_argument("--rounds", type=int, help="measurements per point, interleaved (default 3, quick 2)")
    parser.add_argument("--duration", type=float, help="measured seconds per point (default 4, quick 2)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    parser.add_argument("--client", choices=("auto", "wrk", "raw"), default="auto",
                        help="wrk when installed (auto), else http_loadgen.py's raw-socket client")
    parser.add_argument("--servers", help="comma-separated, of aiohttp,starlette,asgi,asgi-watch,aiohttp-json")
    parser.add_argument("--no-probes", action="store_true", help="skip the disconnect and compression probes")
    parser.add_argument("--no-codecs", action="store_true", help="skip the JSON codec micro-benchmark")
    parser.add_argument("--no-install", action="store_true", help="never create the benchmark's virtual environment")
    parser.add_argument("--json", type=Path, help="write the results (every sample too) here")
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 4.0)
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "raw"
    if args.client == "wrk":
        args.duration = float(wrk_seconds(args.duration))
        args.warmup = float(wrk_seconds(args.warmup)) if args.warmup > 0 else 0.0
    catalogue = {"aiohttp": Candidate("aiohttp", "aiohttp"), "starlette": Candidate("starlette", "starlette"),
                 "asgi": Candidate("asgi", "asgi"), "asgi-watch": Candidate("asgi-watch", "asgi-watch"),
                 "aiohttp-json": Candidate("aiohttp-json", "aiohttp", "json")}
    names = (args.servers.split(",") if args.servers
             else ["aiohttp", "starlette", "asgi", "asgi-watch"] + ([] if args.quick else ["aiohttp-json"]))
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        parser.error(f"unknown server(s) {unknown}; choose from {sorted(catalogue)}")
    WORK.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine(), "settings": {
        "mode": "quick" if args.quick else "full", "rounds": args.rounds, "duration_s": args.duration,
        "warmup_s": args.warmup, "client": args.client, "servers": names, "max_body": MAX_BODY}}
    print("virtual environment ...", file=sys.stderr, flush=True)
    python, why = peers._venv("http-stack", PACKAGES, install=not args.no_install)
    if python is None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 1
    result["versions"] = versions(python)
    live = [catalogue[name] for name in names]
    try:
        for candidate in live:
            start(candidate, python)
        for candidate in live:
            wait_ready(candidate)
            check(candidate)
        result["idle_cores"] = {candidate.name: idle_cores(candidate) for candidate in live}
        result["results"] = run_rounds(live, args)
        if not args.no_probes:
            print("probes ...", file=sys.stderr, flush=True)
            result["probes"] = {c.name: probe(c) for c in live if c.codec == "orjson"}
    finally:
        for candidate in live:
            stop(candidate)
    if not args.no_codecs:
        print("JSON codecs ...", file=sys.stderr, flush=True)
        result["codecs"] = codecs(python, args.quick)
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print(table(result))
    if args.json:
        print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
