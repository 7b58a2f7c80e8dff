"""What one large request costs the server in memory: resident bytes per byte of requests in flight (issue 15).

    python benchmarks/memory_per_byte.py                          # ~1 minute: 20 and 40 concurrent 51 MB requests
    python benchmarks/memory_per_byte.py --checkout /tmp/before   # the same against another checkout's code
    python benchmarks/memory_per_byte.py --requests 20 --mb 12 --json

The model is the issue's: one FP32 input of shape [-1, -1] (here Relu, so the output is as large as the input),
`max_batch_size` 0, batching off. The server (`nnserve serve`, a subprocess on loopback) gets one warm-up request
of the same size; then its peak resident size is reset (`/proc/PID/clear_refs` 5) and N requests of the same bytes
are sent at once, each from its own thread on its own connection (raw pre-serialized bytes, so the client costs the
server nothing extra). Reported per point: the server's resident size before (VmRSS), its peak during the flood
(VmHWM), the bytes offered at once (N x request size) and

    bytes resident per byte in flight = (VmHWM - VmRSS before) / (N x request size)

With `--budget` the server runs with that `--max-inflight-bytes` (where the checkout has the flag) and the excess is
refused; without it the budget is set far above the flood (so nothing is refused and the figure is the cost of the
whole flood) and the stream limit is raised to 1024, as the code before issue 15 had it. `--checkout DIR` runs the
server from another checkout's source (a `git worktree` of an earlier commit) with this interpreter's packages,
so before and after are measured side by side in one run. Also printed, when this checkout has the budget: what it
costs a request in this process (`InflightBudget.reserve` + `release`, and with the per-model cost lookup and the
reservation's arithmetic as the data plane does them), the empty loop subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import CHECKOUT_BOOTSTRAP as _BOOTSTRAP  # noqa: E402
from benchmarks.common import infer_request_bytes  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODEL = "wide_relu"
MB = 1_000_000


def build_repository(root: Path) -> Path:
    """The issue's model: FP32 [-1, -1] -> Relu -> FP32 [-1, -1], served without a batch dimension."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])], MODEL,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["rows", "columns"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["rows", "columns"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    folder = root / MODEL / "1"
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    (root / MODEL / "config.json").write_text(json.dumps({"max_batch_size": 0, "dynamic_batching": {"enabled": False}}))
    return root


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Server:
    """`nnserve serve` (this checkout's, or `checkout`'s source) on loopback ports chosen by the kernel."""

    def __init__(self, repository: Path, workdir: Path, checkout: Path | None, extra: list[str]) -> None:
        port_file = workdir / f"ports-{time.monotonic_ns()}.json"
        head = [sys.executable, "-c", _BOOTSTRAP, str(checkout)] if checkout else [sys.executable, "-m", "nnserve"]
        self.log = workdir / f"serve-{time.monotonic_ns()}.log"
        command = [*head, "serve", "--model-repository", str(repository), "--host", "127.0.0.1", "--grpc-port", "0",
                   "--http-port", "off", "--metrics-port", "off", "--port-file", str(port_file), *extra]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{json.loads(port_file.read_text())['grpc']}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def call(address: str, payload: bytes, barrier: threading.Barrier | None, results: list[str]) -> None:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:
        infer = channel.unary_unary(METHOD)  # bytes in, bytes out: no client-side protobuf work
        grpc.channel_ready_future(channel).result(timeout=60)
        if barrier is not None:
            barrier.wait(timeout=120)
        try:
            infer(payload, timeout=300, wait_for_ready=True)
            results.append("OK")
        except grpc.RpcError as exc:
            results.append(exc.code().name)


def flood(server: Server, payload: bytes, count: int) -> dict[str, Any]:
    pid = server.process.pid
    warm: list[str] = []
    call(server.address, payload, None, warm)
    if warm != ["OK"]:
        raise SystemExit(f"the warm-up request failed: {warm}\n{server.log.read_text()[-3000:]}")
    before_kib = status_kib(pid, "VmRSS")
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS
    results: list[str] = []
    barrier = threading.Barrier(count)
    threads = [threading.Thread(target=call, args=(server.address, payload, barrier, results)) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak_kib = status_kib(pid, "VmHWM")
    offered = count * len(payload)
    counts = {status: results.count(status) for status in sorted(set(results))}
    return {"requests": count, "request_bytes": len(payload), "offered_bytes": offered,
            "rss_before_bytes": before_kib * 1024, "peak_bytes": peak_kib * 1024,
            "per_byte_in_flight": (peak_kib - before_kib) * 1024 / offered, "statuses": counts}


def check_cost_ns(repeat: int = 200_000) -> dict[str, float] | None:
    """Nanoseconds per request of the budget's work in the data plane, best of 5 (None without a budget here):
    `check` is reserve + release; `accounting` adds the model's cost lookup and the arithmetic of the reservation."""
    try:
        from nnserve.server.batching_settings import BatchingSettings
        from nnserve.server.inflight_budget import CostTable, InflightBudget
        from nnserve.server.tensors import Signature, TensorSpec
    except ImportError:
        return None

    class Served:  # what CostTable reads of a served version
        def __init__(self) -> None:
            spec = TensorSpec("x", "FP32", (-1, 4))
            self.runner = type("Runner", (), {"signature": Signature("m", (spec,), (TensorSpec("y", "FP32", (-1, 3)),),
                                                                     64)})()
            self.batching = BatchingSettings()

    budget, costs, served = InflightBudget(1 << 40), CostTable(), Served()
    reserve, release = budget.reserve, budget.release

    def check() -> None:
        reserve(4096)
        release(4096)

    def accounting() -> None:
        cost = costs.get(served)
        outputs = 2 * (cost.output_bytes * 8 + cost.open_outputs * 128)
        need = 4096 + 0 + outputs + (128 if cost.merges else 0)
        if need > 0:
            reserve(need)
        release(need)

    results = {}
    for name, fn in (("check", check), ("accounting", accounting)):
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter_ns()
            for _ in range(repeat):
                fn()
            best = min(best, (time.perf_counter_ns() - started) / repeat)
        results[name] = best
    def nothing() -> None:
        pass

    empty = float("inf")
    for _ in range(5):  # the loop and the call alone, subtracted
        started = time.perf_counter_ns()
        for _ in range(repeat):
            nothing()
        empty = min(empty, (time.perf_counter_ns() - started) / repeat)
    return {name: value - empty for name, value in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", default="20,40", help="concurrent requests per flood, comma-separated")
    parser.add_argument("--mb", type=float, default=51.0, help="request size in MB (10^6 bytes)")
    parser.add_argument("--checkout", type=Path, help="serve from this checkout's source instead")
    parser.add_argument("--budget", type=int, help="--max-inflight-bytes for the server (default: above the flood)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    counts = [int(part) for part in args.requests.split(",") if part.strip()]
    columns = max(1, int(args.mb * MB / 4 / 1024))
    x = np.random.default_rng(0).standard_normal((1024, columns)).astype(np.float32)
    payload = infer_request_bytes(MODEL, "input", x)
    source = args.checkout or ROOT
    has_budget = "--max-inflight-bytes" in (source / "server" / "cli.py").read_text()
    points = []
    with tempfile.TemporaryDirectory(prefix="nnserve-memory-") as tmp:
        workdir = Path(tmp)
        repository = build_repository(workdir / "repository")
        for count in counts:
            extra = ["--max-concurrent-streams", "1024", "--max-message-bytes", str(max(len(payload) * 2, 64 << 20))]
            if has_budget:
                extra += ["--max-inflight-bytes", str(args.budget or 4 * count * len(payload))]
            server = Server(repository, workdir, args.checkout, extra)
            try:
                points.append(flood(server, payload, count))
            finally:
                server.stop()
    report = {"checkout": str(source), "check_ns": check_cost_ns() if args.checkout is None else None,
              "points": points}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"server code: {source}; model {MODEL} (FP32 [-1, -1] -> Relu, max_batch_size 0)")
    print(f"{'requests':>8} {'each MB':>8} {'offered MB':>10} {'RSS before MB':>13} {'peak MB':>8} "
          f"{'per byte':>8}  statuses")
    for p in points:
        print(f"{p['requests']:>8} {p['request_bytes'] / MB:>8.1f} {p['offered_bytes'] / MB:>10.0f} "
              f"{p['rss_before_bytes'] / MB:>13.0f} {p['peak_bytes'] / MB:>8.0f} {p['per_byte_in_flight']:>8.2f}  "
              f"{p['statuses']}")
    if report["check_ns"] is not None:
        costs = report["check_ns"]
        print(f"budget per request: reserve + release {costs['check']:.0f} ns; with the cost lookup and the "
              f"reservation's arithmetic {costs['accounting']:.0f} ns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
