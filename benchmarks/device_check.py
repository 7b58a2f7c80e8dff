"""The device check (issue 20): the GPU test subset and the GPU and CPU-scaling measurements, in one command.

    python3 benchmarks/device_check.py                                # the GPU machine: --device cuda, ~2.5 min
    .venv/bin/python benchmarks/device_check.py --device cpu --quick  # anywhere: the same steps on the CPU provider

One run, figures as ratios within it (benchmarks/README.md, "Device check", has the steps on a GPU machine):

1. `pytest -m gpu tests/test_gpu.py` (with `--device cpu` it only shows each test skipped with its reason), while
   `nnserve build` makes the models: the seed network `examples/000_layer_4x3.json`, the 25M random MLP
   (`--random 1024x4096x4096x1024 --seed 0`, served as `big`) and its `--fp16` build (`big_fp16`), both with
   max_batch_size 256.
2. The compute ceiling in one process, pinned to the server CPUs: onnxruntime's `session.run` (numpy in and out)
   with nnserve's own session and provider options (TF32 off on CUDA) at batch 1/8/64/256, and nnserve's runner
   (I/O binding on CUDA) beside it.
3. Servers, all started at once and pinned (sched_setaffinity) to the first half of the CPUs; the load generator is
   a pool of processes of this script pinned to the other half, each with its own connections (one per caller),
   started together on a shared clock, their latencies merged (`loadgen.py`'s closed loop, raw pre-serialized
   requests):
   * `nnserve serve --device DEVICE`, batching on and off (`--dynamic-batching false`), and the bare echo
     (`echo_server.py`, the transport ceiling of the same payload): the 25M models with 1-row requests at
     c=1/8/64 and 8- and 64-row requests at c=16; the seed network at c=1 (against the CPU server below);
   * `nnserve serve --device cpu --workers 1/2/4/8` on the seed network, and the bare echo as that many processes
     sharing one port, at c=64. Only worker counts that fit the server CPUs run (on 2 cores: 1 worker, 1 echo).
4. Server compute per batch from ModelStatistics (batch_stats, compute_infer) against the in-process run time at
   the same batch size.
5. The targets, each met or not; one table on stdout; `device_check.json`, the table, the test output and the
   servers' logs under --out ($OUT on the GPU machine, else bench-results/).

Points planned past --budget-s are skipped and listed. With --device cuda the run stops early (exit status 2) when
CUDA cannot be used, before spending the machine's time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SEED, BIG, BIG16 = "layer_4x3", "big", "big_fp16"
WIDTH = {SEED: 4, BIG: 1024, BIG16: 1024}
DATATYPE = {SEED: "FP32", BIG: "FP32", BIG16: "FP16"}
BIG_WIDTHS = "1024x4096x4096x1024"
BIG_MAX_BATCH = 256
CEILING_BATCHES = (1, 8, 64, 256)
BIG_POINTS = ((1, 1), (1, 8), (1, 64), (8, 16), (64, 16))
"""(rows per request, concurrency) for the 25M models."""
WORKERS = (1, 2, 4, 8)
SCALING_CONCURRENCY = 64
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
READY_LINE = "ready: serving on"
"""What each nnserve server process (each worker of --workers N) logs once every model is loaded and warm."""


# -- the machine --------------------------------------------------------------------------------------------------


def split_cpus() -> tuple[list[int], list[int]]:
    """(server CPUs, client CPUs): the first and second half of the CPUs this process may use (both all of one)."""
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    return (cpus[:half], cpus[half:]) if half else (cpus, cpus)


def nvidia_library_dirs() -> list[str]:
    """The nvidia-* pip packages' library folders on this interpreter's path (CUDA 13's `nvidia/cu13/lib`,
    `nvidia/cudnn/lib`, ...): onnxruntime-gpu installed elsewhere (`--target /tmp/site`) has no RPATH to them."""
    found: list[str] = []
    for entry in sys.path:
        base = Path(entry or ".") / "nvidia"
        if base.is_dir():
            for lib in sorted(base.glob("*/lib")):
                if any(lib.glob("*.so*")) and str(lib) not in found:
                    found.append(str(lib))
    return found


def child_env(device: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cuda":
        dirs = nvidia_library_dirs()
        if dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*dirs, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
    return env


def machine(server_cpus: list[int], client_cpus: list[int]) -> dict[str, Any]:
    import grpc
    import numpy
    import onnxruntime

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_gib = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    gpu = ""
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            gpu = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    return {
        "cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "server_cpus": server_cpus, "client_cpus": client_cpus,
        "memory_gib": memory_gib, "gpu": gpu or "none seen by nvidia-smi", "os": f"{platform.system()} "
        f"{platform.release()}", "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(), "grpcio": grpc.__version__,
        "numpy": numpy.__version__, "load_average_at_start": os.getloadavg()[0],
    }


def cuda_probe(env: dict[str, str]) -> str | None:
    """None when a CUDA session really runs (as the server and the tests will see it, in a child), else why not."""
    code = ("from nnserve.server.providers import cuda_unavailable_reason as r; import sys; "
            "sys.stdout.write('USABLE' if r(0) is None else 'REASON ' + r(0))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    out = done.stdout.strip().splitlines()
    last = out[-1] if out else ""
    if last == "USABLE":
        return None
    if last.startswith("REASON "):
        return last[len("REASON "):]
    return f"the probe failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"


# -- models -------------------------------------------------------------------------------------------------------


def build_commands(repo: Path, seed_repo: Path) -> list[list[str]]:
    nnserve = [sys.executable, "-m", "nnserve", "build"]
    seed = str(ROOT / "examples" / "000_layer_4x3.json")
    random = ["--random", BIG_WIDTHS, "--seed", "0"]
    return [
        [*nnserve, seed, "-r", str(repo), "--skip-unchanged"],
        [*nnserve, seed, "-r", str(seed_repo), "--skip-unchanged"],
        [*nnserve, *random, "--name", BIG, "-r", str(repo), "--skip-unchanged"],
        [*nnserve, *random, "--name", BIG16, "--fp16", "-r", str(repo), "--skip-unchanged"],
    ]


def finish_repository(repo: Path) -> None:
    """The 25M models take batches of up to BIG_MAX_BATCH rows (the builder's config.json says 64)."""
    for model in (BIG, BIG16):
        (repo / model / "config.json").write_text(json.dumps({"max_batch_size": BIG_MAX_BATCH}) + "\n")


def onnx_path(repo: Path, model: str) -> Path:
    return max((repo / model).glob("*/model.onnx"), key=lambda p: int(p.parent.name))


# -- the in-process ceiling (`--ceiling-of MODEL`, run in a child pinned to the server CPUs) ------------------------


def ceiling(path: Path, device: str, seconds: float) -> dict[str, dict[str, float]]:
    """Median ms per run of `session.run` and of nnserve's runner at each batch size, with the server's options."""
    import numpy as np

    from nnserve.server import cpu_quota
    from nnserve.server.providers import create_session, session_options
    from nnserve.server.runner import ModelRunner, RunnerOptions

    options = session_options(intra_op_threads=cpu_quota.intra_op_threads())
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session, provider = create_session(path, device=device, device_id=0, options=options)
    runner = ModelRunner.load("ceiling", 1, path, RunnerOptions(device=device))
    spec = session.get_inputs()[0]
    dtype = np.float16 if "float16" in spec.type else np.float32
    result: dict[str, dict[str, float]] = {}
    for batch in CEILING_BATCHES:
        feed = {spec.name: np.random.default_rng(batch).standard_normal((batch, int(spec.shape[1]))).astype(dtype)}
        row: dict[str, float] = {}
        calls = (("run_ms", lambda f=feed: session.run(None, f)), ("runner_ms", lambda f=feed: runner.run(f)))
        for name, call in calls:
            for _ in range(3):
                call()
            times: list[float] = []
            started = time.perf_counter()
            while time.perf_counter() - started < seconds / 2 or len(times) < 5:
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
            row[name] = statistics.median(times) * 1000
        row["rows_per_s"] = batch / row["run_ms"] * 1000
        result[str(batch)] = row
    return {"provider": provider, "runner_provider": runner.provider, "batches": result}  # type: ignore[dict-item]


def ceilings(repo: Path, device: str, seconds: float, env: dict[str, str], cpus: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in (BIG, BIG16):
        command = [sys.executable, str(Path(__file__).resolve()), "--device", device, "--ceiling-of",
                   str(onnx_path(repo, model)), "--ceiling-seconds", str(seconds)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                              preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        if done.returncode != 0:
            out[model] = {"error": " | ".join(done.stderr.strip().splitlines()[-3:])}
        else:
            out[model] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# -- servers ------------------------------------------------------------------------------------------------------


@dataclass
class Proc:
    """A server process (nnserve, its workers, or an echo) pinned to the server CPUs; its port from its port file."""

    name: str
    command: list[str]
    log: Path
    port_file: Path
    ready_lines: int
    """How many READY_LINE lines its log must show (one per nnserve process; 0 for an echo)."""
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    error: str = ""


def nnserve_proc(name: str, repo: Path, logs: Path, device: str, *extra: str, workers: int = 1) -> Proc:
    port_file = logs / f"{name}.port.json"
    command = [sys.executable, "-m", "nnserve", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
               "--grpc-port", "0", "--http-port", "off", "--metrics-port", "off", "--port-file", str(port_file),
               "--device", device, *extra]
    if workers > 1:
        command += ["--workers", str(workers)]
    return Proc(name, command, logs / f"{name}.log", port_file, workers)


def echo_proc(name: str, logs: Path, model: str, port: int = 0) -> Proc:
    port_file = logs / f"{name}.port.json"
    command = [sys.executable, str(HERE / "echo_server.py"), "--port", str(port), "--port-file", str(port_file),
               "--model", model, "--width", str(WIDTH[model])]
    return Proc(name, command, logs / f"{name}.log", port_file, 0)


def launch(proc: Proc, env: dict[str, str], cpus: list[int]) -> None:
    proc.port_file.unlink(missing_ok=True)
    with proc.log.open("wb") as log:
        proc.process = subprocess.Popen(proc.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                        start_new_session=True, preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def wait_ready(proc: Proc, deadline: float) -> None:
    """Until its port file exists and its log shows every process ready; `proc.error` says why not."""
    assert proc.process is not None
    while True:
        if proc.process.poll() is not None:
            tail = proc.log.read_text(errors="replace").strip().splitlines()[-3:]
            proc.error = f"exited with status {proc.process.returncode}: {' | '.join(tail)}"
            return
        if proc.port_file.exists() and (proc.ready_lines == 0 or proc.log.read_text(errors="replace").count(
                READY_LINE) >= proc.ready_lines):
            proc.port = int(json.loads(proc.port_file.read_text())["grpc"])
            return
        if time.monotonic() > deadline:
            proc.error = "not ready in time"
            return
        time.sleep(0.1)


def stop_all(procs: list[Proc]) -> None:
    """SIGTERM every process group (workers included), then SIGKILL what outlives 30 s."""
    running = [p.process for p in procs if p.process is not None and p.process.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# -- the load generator: a pool of processes on the client CPUs ---------------------------------------------------


def request_bytes(model: str, rows: int) -> bytes:
    """A serialized ModelInferRequest of `rows` random rows in the model's datatype (raw contents), built once."""
    import numpy as np

    from nnserve.protos import grpc_service_pb2 as pb

    dtype = np.float16 if DATATYPE[model] == "FP16" else np.float32
    x = np.random.default_rng(rows).standard_normal((rows, WIDTH[model])).astype(dtype)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype=DATATYPE[model], shape=list(x.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()]).SerializeToString()


def _client_main(conn: Connection, cpus: list[int]) -> None:
    """One load-generating process: runs each job it is sent and answers with its raw latencies."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, cpus)
    loop = asyncio.new_event_loop()  # one loop for every job: grpc.aio's poller outlives a closed loop noisily
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(loop.run_until_complete(_client_job(conn, job)))
        except Exception as exc:  # reported to the parent, which records the point as failed
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


async def _client_job(conn: Connection, job: dict[str, Any]) -> dict[str, Any]:
    """Connect one channel per caller, say so, wait for the shared start time, then run the closed loop."""
    import grpc
    import numpy as np
    from loadgen import _drive

    options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(job["target"], options=options) for _ in range(job["callers"])]
    first_error: list[str] = []
    try:
        try:
            await asyncio.wait_for(asyncio.gather(*(channel.channel_ready() for channel in channels)), 20)
        except TimeoutError:
            raise ConnectionError(f"no connection to {job['target']} within 20 s") from None
        methods = [channel.unary_unary(INFER_METHOD) for channel in channels]
        payload, timeout = job["payload"], job["timeout"]

        async def call(index: int) -> None:
            try:
                await methods[index](payload, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if not first_error:
                    first_error.append(f"{exc.code().name}: {exc.details()}")
                raise

        conn.send("connected")
        start_at = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        latencies, errors, elapsed = await _drive(call, job["callers"], job["warmup"], job["duration"])
    finally:
        for channel in channels:
            await channel.close()
    return {"latencies": np.asarray(latencies, dtype=np.float64), "errors": errors, "elapsed": elapsed,
            "first_error": first_error[0] if first_error else ""}


class ClientPool:
    """Load-generating processes pinned to the client CPUs; a point uses min(processes, concurrency) of them."""

    def __init__(self, processes: int, cpus: list[int]) -> None:
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[BaseProcess] = []
        for index in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=_client_main, args=(child, cpus), name=f"loadgen-{index}", daemon=True)
            process.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(process)

    @property
    def size(self) -> int:
        return len(self._conns)

    def _recv(self, conn: Connection, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise TimeoutError(f"a load generator did not answer within {timeout:.0f} s")
        return conn.recv()

    def measure(self, target: str, payload: bytes, rows: int, concurrency: int, warmup: float,
                duration: float) -> dict[str, Any]:
        used = self._conns[: min(self.size, concurrency)]
        callers = [concurrency // len(used) + (1 if i < concurrency % len(used) else 0) for i in range(len(used))]
        job = {"target": target, "payload": payload, "warmup": warmup, "duration": duration, "timeout": 60.0}
        for conn, count in zip(used, callers, strict=True):
            conn.send({**job, "callers": count})
        # Two phases, so that every process has connected before any starts: each answers "connected" (or an
        # error), then all get one start time on the shared clock and answer with their latencies.
        ready = [self._recv(conn, 90) for conn in used]
        connected = [conn for conn, answer in zip(used, ready, strict=True) if answer == "connected"]
        start_at = time.time() + 0.05
        for conn in connected:
            conn.send(start_at)
        answers = [self._recv(conn, warmup + duration + 120) for conn in connected]
        errors = [a["error"] for a in [*ready, *answers] if isinstance(a, dict) and "error" in a]
        if errors:
            return {"error": errors[0]}
        import numpy as np

        latencies = np.concatenate([a["latencies"] for a in answers]) * 1000.0
        count = len(latencies)
        rate = sum(len(a["latencies"]) / a["elapsed"] for a in answers)
        return {
            "processes": len(used), "connections": concurrency, "requests": count,
            "errors": sum(a["errors"] for a in answers), "first_error": next(
                (a["first_error"] for a in answers if a["first_error"]), ""),
            "requests_per_s": rate, "rows_per_s": rate * rows,
            "p50_ms": float(np.percentile(latencies, 50)) if count else None,
            "p99_ms": float(np.percentile(latencies, 99)) if count else None,
        }

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for process in self._procs:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


# -- the run ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    group: str
    server: str
    model: str
    rows: int
    concurrency: int


def plan(workers: list[int]) -> list[Point]:
    points: list[Point] = []
    for model in (BIG, BIG16):
        for rows, concurrency in BIG_POINTS:
            points += [Point("big", server, model, rows, concurrency) for server in ("nnserve", "nnserve-nobatch")]
    points += [Point("big", "echo-big", BIG, rows, concurrency) for rows, concurrency in BIG_POINTS]
    points += [Point("big", "echo-big", BIG16, rows, 16) for rows in (8, 64)]
    points += [Point("seed", "nnserve", SEED, 1, 1), Point("seed", "cpu-w1", SEED, 1, 1)]
    for count in workers:
        points.append(Point("scaling", f"cpu-w{count}", SEED, 1, SCALING_CONCURRENCY))
    points.append(Point("scaling", f"echo-x{max(workers)}", SEED, 1, SCALING_CONCURRENCY))
    return points


PYTEST = ["-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider"]


def start_pytest(env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    """`pytest -m gpu` on the GPU test module, in the background, its output to out/pytest_gpu.txt."""
    with (out / "pytest_gpu.txt").open("wb") as log:
        return subprocess.Popen([sys.executable, *PYTEST], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish_pytest(process: subprocess.Popen[bytes], device: str, out: Path, timeout: float,
                  started: float) -> dict[str, Any]:
    """Wait for the tests (killed past `timeout` seconds from the start of the run) and keep their summary line."""
    try:
        status: int | None = process.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        status = None
    output = (out / "pytest_gpu.txt").read_text(errors="replace")
    if status is None:
        output += f"\n(killed: still running {timeout:.0f} s into the run)\n"
        (out / "pytest_gpu.txt").write_text(output)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    summary = next((line.strip("= ") for line in reversed(lines) if " in " in line and (
        "passed" in line or "skipped" in line or "failed" in line or "error" in line)), lines[-1] if lines else "")
    skip_reasons = sorted({line.split(": ", 1)[1] for line in lines if line.startswith("SKIPPED") and ": " in line})
    # Every test passing (or, without a GPU, skipped with its reason) is what the device check expects.
    ok = status == 0 if device == "cuda" else status in (0, 5) and "failed" not in summary
    return {"command": "python3 " + " ".join(PYTEST), "status": status, "summary": summary, "ok": ok,
            "skip_reasons": skip_reasons[:5], "done_at_s": round(time.monotonic() - started, 1)}


def model_statistics(port: int, model: str) -> dict[int, tuple[int, int]]:
    """{batch size: (executions, compute_infer ns)} of a model's served versions, from ModelStatistics."""
    import grpc

    from nnserve.protos import grpc_service_pb2 as pb
    from nnserve.protos import grpc_service_pb2_grpc as pb_grpc

    out: dict[int, tuple[int, int]] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model),
                                                                         timeout=10)
    for stats in reply.model_stats:
        for batch in stats.batch_stats:
            count, ns = out.get(batch.batch_size, (0, 0))
            out[batch.batch_size] = (count + batch.compute_infer.count, ns + batch.compute_infer.ns)
    return out


def server_compute(procs: dict[str, Proc], ceiling: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean server compute per batch (both device servers) against in-process `session.run` at the same size."""
    rows = []
    for model in (BIG, BIG16):
        merged: dict[int, tuple[int, int]] = {}
        for name in ("nnserve", "nnserve-nobatch"):
            proc = procs.get(name)
            if proc is None or proc.error or not proc.port:
                continue
            with contextlib.suppress(Exception):
                for size, (count, ns) in model_statistics(proc.port, model).items():
                    old = merged.get(size, (0, 0))
                    merged[size] = (old[0] + count, old[1] + ns)
        inproc = ceiling.get(model, {}).get("batches", {})
        for size in CEILING_BATCHES:
            count, ns = merged.get(size, (0, 0))
            row: dict[str, Any] = {"model": model, "batch": size, "batches": count}
            if count:
                row["server_ms"] = ns / count / 1e6
            if str(size) in inproc:
                row["inprocess_run_ms"] = inproc[str(size)]["run_ms"]
                row["inprocess_runner_ms"] = inproc[str(size)]["runner_ms"]
            if "server_ms" in row and "inprocess_run_ms" in row:
                row["ratio"] = row["server_ms"] / row["inprocess_run_ms"]
            rows.append(row)
    return rows


def find(points: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((p for p in points if all(p.get(k) == v for k, v in match.items()) and "error" not in p
                 and p.get("requests_per_s")), None)


def targets(result: dict[str, Any], workers: list[int], device: str) -> list[dict[str, Any]]:
    points, out = result["points"], []

    def add(name: str, value: float | None, goal: float | None, detail: str, lower_is_better: bool = False) -> None:
        met = None if value is None or goal is None else (value <= goal if lower_is_better else value >= goal)
        out.append({"target": name, "value": value, "goal": goal, "met": met, "lower_is_better": lower_is_better,
                    "detail": detail})

    compute = [r for r in result["server_compute"] if "ratio" in r]
    worst = max(compute, key=lambda r: r["ratio"], default=None)
    add(f"{device}: server compute per batch vs in-process session.run at the same batch size (worst of "
        f"{len(compute)})", worst["ratio"] if worst else None, 1.2,
        f"{worst['model']} batch {worst['batch']}: {worst['server_ms']:.3f} vs {worst['inprocess_run_ms']:.3f} ms"
        if worst else "no batch size seen both in the server and in-process", lower_is_better=True)
    for model in (BIG, BIG16):
        served = find(points, server="nnserve", model=model, rows=64, concurrency=16)
        echo = find(points, server="echo-big", model=model, rows=64, concurrency=16)
        add(f"{device}: {model}, 64-row requests at c=16, nnserve vs the bare echo of that payload (rows/s)",
            served["rows_per_s"] / echo["rows_per_s"] if served and echo else None, 0.8,
            f"{served['rows_per_s']:,.0f} vs {echo['rows_per_s']:,.0f} rows/s" if served and echo else "not measured")
    ratios = []
    for model in (BIG, BIG16):
        for rows, concurrency in BIG_POINTS:
            on = find(points, server="nnserve", model=model, rows=rows, concurrency=concurrency)
            off = find(points, server="nnserve-nobatch", model=model, rows=rows, concurrency=concurrency)
            if on and off:
                ratios.append((on["rows_per_s"] / off["rows_per_s"], f"{model} rows={rows} c={concurrency}"))
    low = min(ratios, default=None)
    add(f"{device}: batching on vs off, every 25M point (rows/s; the lowest of {len(ratios)})",
        low[0] if low else None, 0.95, f"at {low[1]}" if low else "not measured")
    gpu = find(points, server="nnserve", model=SEED, rows=1, concurrency=1)
    cpu = find(points, server="cpu-w1", model=SEED, rows=1, concurrency=1)
    add(f"seed network p50 at c=1, nnserve --device {device} vs the same server on CPU (no goal)",
        gpu["p50_ms"] / cpu["p50_ms"] if gpu and cpu else None, None,
        f"{gpu['p50_ms']:.3f} vs {cpu['p50_ms']:.3f} ms" if gpu and cpu else "not measured", lower_is_better=True)
    one = find(points, server="cpu-w1", model=SEED, concurrency=SCALING_CONCURRENCY)
    top = max(workers)
    most = find(points, server=f"cpu-w{top}", model=SEED, concurrency=SCALING_CONCURRENCY)
    if 8 in workers:
        add("CPU scaling: --workers 8 vs --workers 1 at c=64 (req/s)",
            most["requests_per_s"] / one["requests_per_s"] if most and one else None, 6.0,
            f"{most['requests_per_s']:,.0f} vs {one['requests_per_s']:,.0f} req/s" if most and one else "not measured")
    else:
        add("CPU scaling: --workers 8 vs --workers 1 at c=64 (req/s)", None, 6.0,
            f"not run: {len(result['machine']['server_cpus'])} server CPUs fit --workers {top} at most")
    echo = find(points, server=f"echo-x{top}", model=SEED, concurrency=SCALING_CONCURRENCY)
    add(f"CPU scaling: --workers {top} vs {top} bare echo processes on one port at c=64 (req/s)",
        most["requests_per_s"] / echo["requests_per_s"] if most and echo else None, 0.9,
        f"{most['requests_per_s']:,.0f} vs {echo['requests_per_s']:,.0f} req/s" if most and echo else "not measured")
    return out


def table(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        f"nnserve device check, --device {s['device']}{' --quick' if s['quick'] else ''}: {m['cpu']}, {m['cpus']} "
        f"CPUs (servers on {len(m['server_cpus'])}, clients on {len(m['client_cpus'])}), {m['memory_gib']} GiB, "
        f"GPU: {m['gpu']}; {m['os']}, Python {m['python']}, onnxruntime {m['onnxruntime']}, grpcio {m['grpcio']}; "
        f"load average at start {m['load_average_at_start']:.1f}",
        f"Points: {s['warmup_s']} s warm-up + {s['duration_s']} s each, one round; clients: {s['client_processes']} "
        f"processes, one connection per caller",
    ]
    if result.get("cuda_unusable"):
        lines.append(f"CUDA NOT USABLE: {result['cuda_unusable']}")
    tests = result.get("tests")
    if tests:
        lines.append(f"Tests: {tests['command']}: {tests['summary']} (done {tests['done_at_s']} s into the run): "
                     f"{'OK' if tests['ok'] else 'NOT OK'}")
        lines += [f"  skipped: {reason}" for reason in tests["skip_reasons"][:2]]
    if result.get("ceilings"):
        lines += ["", "In-process ceiling, one process on the server CPUs: session.run (numpy in/out) and nnserve's "
                  "runner, median ms per batch", f"{'model':9} {'batch':>5} {'run ms':>9} {'rows/s':>11} "
                  f"{'runner ms':>10}  provider"]
        for model, value in result["ceilings"].items():
            if "error" in value:
                lines.append(f"{model:9} error: {value['error'][:100]}")
                continue
            for batch, row in value["batches"].items():
                lines.append(f"{model:9} {batch:>5} {row['run_ms']:>9.3f} {row['rows_per_s']:>11,.0f} "
                             f"{row['runner_ms']:>10.3f}  {value['provider']}")
    if result.get("points"):
        lines += ["", f"{'group':8} {'server':16} {'model':9} {'rows':>4} {'conc':>4} {'req/s':>9} {'rows/s':>10} "
                  f"{'p50 ms':>8} {'p99 ms':>8} {'err':>4}"]
        for p in result["points"]:
            head = f"{p['group']:8} {p['server']:16} {p['model']:9} {p['rows']:>4} {p['concurrency']:>4}"
            if "error" in p:
                lines.append(f"{head} {p['error'][:70]}")
            else:
                lines.append(f"{head} {p['requests_per_s']:>9,.0f} {p['rows_per_s']:>10,.0f} {p['p50_ms']:>8.3f} "
                             f"{p['p99_ms']:>8.3f} {p['errors']:>4}")
    if result.get("server_compute"):
        lines += ["", "Server compute per batch (ModelStatistics compute_infer, both servers) vs in-process, ms",
                  f"{'model':9} {'batch':>5} {'batches':>8} {'server':>9} {'run':>9} {'runner':>9} {'ratio':>6}"]
        for r in result["server_compute"]:
            def ms(key: str, row: dict[str, Any] = r) -> str:
                return f"{row[key]:>9.3f}" if key in row else f"{'-':>9}"
            ratio = f"{r['ratio']:>6.2f}" if "ratio" in r else f"{'-':>6}"
            lines.append(f"{r['model']:9} {r['batch']:>5} {r['batches']:>8} {ms('server_ms')} "
                         f"{ms('inprocess_run_ms')} {ms('inprocess_runner_ms')} {ratio}")
    if result.get("targets"):
        lines += ["", "Targets (issue 20), from this run"]
        for t in result["targets"]:
            verdict = "info" if t["goal"] is None else "n/a" if t["met"] is None else "MET" if t["met"] else "NOT MET"
            value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
            goal = "" if t["goal"] is None else f" (goal {'<=' if t['lower_is_better'] else '>='} {t['goal']})"
            lines.append(f"  {verdict:7} {value:>6}{goal} {t['target']}: {t['detail']}")
    if result.get("error"):
        lines += ["", f"RUN STOPPED: {result['error']}"]
    if result.get("skipped"):
        lines += ["", "Skipped"] + [f"  {name}: {why}" for name, why in result["skipped"].items()]
    phases = ", ".join(f"{name} at {at:.0f} s" for name, at in result.get("phases_s", {}).items())
    lines += ["", f"Wall time: {result.get('wall_s', 0):.0f} s" + (f" ({phases})" if phases else "")]
    return "\n".join(lines)


def save(result: dict[str, Any], out: Path, started: float) -> None:
    result["wall_s"] = round(time.monotonic() - started, 1)
    (out / "device_check.json").write_text(json.dumps(result, indent=2))


def collect_logs(procs: list[Proc], out: Path) -> None:
    """The servers' logs, the last 60 lines of each, in one file (what comes back from the GPU machine is few files)."""
    parts = []
    for proc in procs:
        text = proc.log.read_text(errors="replace").splitlines()[-60:] if proc.log.exists() else []
        parts.append(f"===== {proc.name}: {' '.join(proc.command[1:])}\n" + "\n".join(text))
    (out / "server_logs.txt").write_text("\n\n".join(parts) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description="nnserve's device check (see the module docstring)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="shorter points (0.3 s warm-up + 1 s)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the results (default: $OUT, else "
                        "bench-results/ in the checkout)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds per point (default 0.4, quick 0.3)")
    parser.add_argument("--duration", type=float, help="measured seconds per point (default 1.2, quick 1)")
    parser.add_argument("--budget-s", type=float, help="skip points that would start after this many seconds "
                        "(default 170 with --device cuda, else 900)")
    parser.add_argument("--no-tests", action="store_true", help="skip `pytest -m gpu`")
    parser.add_argument("--ceiling-of", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_of is not None:  # the child that measures the in-process ceiling
        print(json.dumps(ceiling(args.ceiling_of, args.device, args.ceiling_seconds)))
        return 0
    started = time.monotonic()
    warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 0.4)
    duration = args.duration or (1.0 if args.quick else 1.2)
    budget = args.budget_s or (170.0 if args.device == "cuda" else 900.0)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench-results")
    out.mkdir(parents=True, exist_ok=True)
    work = HERE / ".cache" / "device-check"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    repo, seed_repo = work / "repository", work / "seed-repository"
    server_cpus, client_cpus = split_cpus()
    workers = [count for count in WORKERS if count <= len(server_cpus)]
    env = child_env(args.device)
    result: dict[str, Any] = {"machine": machine(server_cpus, client_cpus), "settings": {
        "device": args.device, "quick": args.quick, "warmup_s": warmup, "duration_s": duration, "budget_s": budget,
        "workers": workers, "client_processes": len(client_cpus),
        "ld_library_path_added": nvidia_library_dirs() if args.device == "cuda" else []}, "skipped": {}}

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    if args.device == "cuda":
        reason = cuda_probe(env)
        if reason is not None:
            result["cuda_unusable"] = reason
            save(result, out, started)
            (out / "device_check.txt").write_text(table(result) + "\n")
            print(table(result))
            return 2
    # The GPU is the tests' alone while they run, then the ceiling's; the CPU servers start meanwhile (pinned to
    # the server CPUs, idle once ready), the device servers after the ceiling.
    log("building the models, starting the load generators" + ("" if args.no_tests else ", pytest -m gpu"))
    builds = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
              for command in build_commands(repo, seed_repo)]
    tests = None if args.no_tests else start_pytest(env, out)
    pool = ClientPool(len(client_cpus), client_cpus)
    procs: dict[str, Proc] = {}
    extra_echoes: list[Proc] = []
    phases: dict[str, float] = {}
    result["phases_s"] = phases
    status = 0
    try:
        for build in builds:
            _, err = build.communicate(timeout=300)
            if build.returncode != 0:
                raise RuntimeError(f"nnserve build failed: {err.decode(errors='replace').strip()[-500:]}")
        finish_repository(repo)
        phases["models built"] = round(time.monotonic() - started, 1)
        log("models built; starting the CPU servers")
        for count in workers:
            procs[f"cpu-w{count}"] = nnserve_proc(f"cpu-w{count}", seed_repo, logs, "cpu", workers=count)
        first_echo = echo_proc(f"echo-x{max(workers)}", logs, SEED)
        procs[first_echo.name] = first_echo
        for proc in procs.values():
            launch(proc, env, server_cpus)
        wait_ready(first_echo, time.monotonic() + 120)
        extra_echoes = [echo_proc(f"echo-x{max(workers)}-{i}", logs, SEED, first_echo.port)
                        for i in range(1, max(workers))] if first_echo.port else []
        for proc in extra_echoes:
            launch(proc, env, server_cpus)
        if tests is None:
            result["skipped"]["tests"] = "--no-tests"
        else:
            result["tests"] = finish_pytest(tests, args.device, out, 150 if args.device == "cuda" else 900, started)
            phases["tests done"] = result["tests"]["done_at_s"]
            log(f"tests: {result['tests']['summary']}")
        save(result, out, started)
        log("in-process ceilings")
        result["ceilings"] = ceilings(repo, args.device, 0.6 if args.quick else 1.0, env, server_cpus)
        phases["ceilings done"] = round(time.monotonic() - started, 1)
        save(result, out, started)
        log("starting the device servers")
        device_procs = [nnserve_proc("nnserve", repo, logs, args.device),
                        nnserve_proc("nnserve-nobatch", repo, logs, args.device, "--dynamic-batching", "false"),
                        echo_proc("echo-big", logs, BIG)]
        for proc in device_procs:
            launch(proc, env, server_cpus)
            procs[proc.name] = proc
        deadline = time.monotonic() + 180
        for proc in [*procs.values(), *extra_echoes]:
            wait_ready(proc, deadline)
        for proc in extra_echoes:
            if proc.error:
                first_echo.error = f"{proc.name} {proc.error}"
        phases["servers ready"] = round(time.monotonic() - started, 1)
        log("servers ready: " + ", ".join(f"{p.name}={'ERROR' if p.error else p.port}" for p in procs.values()))
        payloads: dict[tuple[str, int], bytes] = {}
        result["points"] = []
        for point in plan(workers):
            record: dict[str, Any] = {"group": point.group, "server": point.server, "model": point.model,
                                      "rows": point.rows, "concurrency": point.concurrency}
            proc = procs[point.server]
            if proc.error:
                record["error"] = f"server {proc.error}"
            elif time.monotonic() - started > budget:
                record["error"] = "skipped: past the time budget"
                result["skipped"][f"{point.server} {point.model} rows={point.rows} c={point.concurrency}"] = \
                    f"past --budget-s {budget:.0f}"
            else:
                payload = payloads.setdefault((point.model, point.rows), request_bytes(point.model, point.rows))
                log(f"{point.server} {point.model} rows={point.rows} c={point.concurrency}")
                record.update(pool.measure(f"127.0.0.1:{proc.port}", payload, point.rows, point.concurrency,
                                           warmup, duration))
            result["points"].append(record)
        phases["points done"] = round(time.monotonic() - started, 1)
        result["server_compute"] = server_compute(procs, result["ceilings"])
        result["targets"] = targets(result, workers, args.device)
    except Exception as exc:  # the run stops here; what was measured so far is still written and printed
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        status = 1
    finally:
        pool.close()
        if tests is not None and tests.poll() is None:
            tests.kill()
        every = [*procs.values(), *extra_echoes]
        stop_all(every)
        if every:
            collect_logs(every, out)
        for build in builds:
            if build.poll() is None:
                build.kill()
    save(result, out, started)
    text = table(result)
    (out / "device_check.txt").write_text(text + "\n")
    print(text)
    print(f"\nresults: {out / 'device_check.json'}")
    return status or (0 if result.get("tests", {}).get("ok", True) else 1)


if __name__ == "__main__":
    sys.exit(main())
