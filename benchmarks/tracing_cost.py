"""What tracing costs: server CPU per request with tracing off, on at 1% of requests, and on for every request.

    python benchmarks/tracing_cost.py                 # ~2 minutes; Linux only (reads /proc/<pid>/stat)
    python benchmarks/tracing_cost.py --rounds 1 --duration 3

Three `nnserve serve` processes on the seed network, the same but for their OTEL_* variables: `off` (none set),
`1%` (an OTLP endpoint: the default sampler, parent-based with 1% of root requests) and `100%`
(OTEL_TRACES_SAMPLER=always_on), all exporting to an OTLP/gRPC TraceService receiver run by this script (so the
export's serialization and sending are part of the server's CPU, as with a real collector; the receiver's own CPU
is not). The raw load generator drives each at c=1 and c=8 for `--duration` seconds per point, the variants
interleaved within each round, and the server's user + system time per answered request is read from /proc over
the middle of the load (`server_cpu.measure`). The table gives the median over the rounds and the extra
microseconds against `off`; `--json` writes every sample.

In-process, it also times what tracing off adds to a request (the frontend's and data plane's `is None` checks),
and what an unsampled request costs when tracing is on (the sampler's decision).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import timeit
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import CACHE, ROOT, SEED, Server, free_port, machine, start, stop, wait_ready  # noqa: E402
from server_cpu import measure  # noqa: E402

VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "1%": {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
    "100%": {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_TRACES_SAMPLER": "always_on"},
}
CONCURRENCY = (1, 8)


class Receiver:
    """An OTLP/gRPC trace receiver that counts the spans it is sent."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self
        self.spans = 0
        self._lock = threading.Lock()

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                with receiver._lock:
                    receiver.spans += count
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(0)


def seed_repository() -> Path:
    repo = CACHE / "tracing-repository"
    subprocess.run([sys.executable, "-m", "nnserve", "build", str(ROOT / "examples" / "000_layer_4x3.json"), "-r",
                    str(repo), "--skip-unchanged"], check=True, capture_output=True)
    return repo


def server(name: str, repo: Path, env: dict[str, str], endpoint: str) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "nnserve", "--log-level", "WARNING", "serve", "--model-repository", str(repo),
               "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", "off", "--metrics-port", "off",
               "--device", "cpu"]
    filled = {key: value or endpoint for key, value in env.items()}
    return Server(f"tracing-{name}", command, port, (SEED,), env={**filled, "OTEL_BSP_SCHEDULE_DELAY": "200"},
                  perf_analyzer=False)


def in_process() -> dict[str, float]:
    """Microseconds per request of the in-process pieces: tracing off's checks, an unsampled decision."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from nnserve.server.tracing import Tracing
    from nnserve.server.tracing_config import TracingConfig

    class Holder:
        trace = None
        tracing = None

    holder = Holder()

    def off_path() -> None:  # what a request pays with tracing off: the attribute checks of the request path
        if holder.tracing is not None:
            raise AssertionError
        trace = holder.trace
        if trace is not None:
            raise AssertionError
        if trace is not None:
            raise AssertionError

    number = 200_000
    off_us = min(timeit.repeat(off_path, number=number, repeat=5)) / number * 1e6
    tracing = Tracing(TracingConfig(exporters=("otlp",), sampler="parentbased_always_off"),
                      exporter=InMemorySpanExporter())
    metadata = (("user-agent", "grpc-python"), ("content-type", "application/grpc"))
    number = 20_000
    unsampled_us = min(timeit.repeat(lambda: tracing.start_grpc(metadata, "ModelInfer", 0), number=number,
                                     repeat=5)) / number * 1e6
    tracing.shutdown(1.0)
    return {"off_checks_us": off_us, "unsampled_decision_us": unsampled_us}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of load per point (>= 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every variant and concurrency")
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args()
    repo = seed_repository()
    receiver = Receiver()
    endpoint = f"http://127.0.0.1:{receiver.port}"
    servers = {name: server(name, repo, env, endpoint) for name, env in VARIANTS.items()}
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    samples: dict[tuple[str, int], list[dict[str, float]]] = {(n, c): [] for n in servers for c in CONCURRENCY}
    try:
        for running in servers.values():
            start(running, logs)
        for running in servers.values():
            wait_ready(running)
        for round_index in range(args.rounds):
            for concurrency in CONCURRENCY:
                for name, running in servers.items():
                    result = measure(running, concurrency, max(args.duration, 2.0))
                    samples[(name, concurrency)].append(result)
                    print(f"round {round_index + 1} {name:>5} c={concurrency}: {result['us_per_request']:6.0f} us "
                          f"server CPU/request, {result['requests_per_s']:7,.0f} req/s", file=sys.stderr, flush=True)
    finally:
        for running in servers.values():
            stop(running)
        receiver.stop()
    pieces = in_process()
    print(f"\nmachine: {machine().get('cpu', '?')}; {args.rounds} rounds x {args.duration:g} s per point; "
          f"{receiver.spans} spans received")
    print(f"{'tracing':>8} {'conc':>4} {'us/req (median)':>16} {'+us vs off':>11} {'ratio':>6} {'req/s':>8}")
    table: list[dict[str, Any]] = []
    for concurrency in CONCURRENCY:
        base = statistics.median(s["us_per_request"] for s in samples[("off", concurrency)])
        for name in servers:
            runs = samples[(name, concurrency)]
            cost = statistics.median(s["us_per_request"] for s in runs)
            rate = statistics.median(s["requests_per_s"] for s in runs)
            table.append({"tracing": name, "concurrency": concurrency, "us_per_request": cost,
                          "extra_us": cost - base, "ratio": cost / base, "requests_per_s": rate})
            print(f"{name:>8} {concurrency:>4} {cost:>16.0f} {cost - base:>+11.0f} {cost / base:>6.2f} {rate:>8,.0f}")
    print(f"in-process: tracing off adds {pieces['off_checks_us'] * 1000:.0f} ns per request (its checks); "
          f"an unsampled request with tracing on costs {pieces['unsampled_decision_us']:.1f} us (the sampler)")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "table": table, "in_process": pieces,
                                         "samples": {f"{n} c={c}": v for (n, c), v in samples.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
