"""A closed-loop HTTP/1.1 load generator for when `wrk` is not installed: pre-serialized requests on raw sockets.

    python benchmarks/http_loadgen.py --port P --request-file F --connections C --duration S [--warmup S]

Each of C keep-alive connections sends the same request bytes, reads one response (status line, Content-Length,
body) and sends again. Prints the same figures `http_stack.py` reads from wrk, as one JSON line: requests, duration,
non-2xx statuses, p50/p90/p99 latency in microseconds. Standard library only; one process, so past a few thousand
requests per second it spends more of the shared cores than wrk does (http_stack.py reports the client's CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path


async def connection(port: int, request: bytes, stop_at: float, measure_from: float, latencies: list[int],
                     counts: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            started = time.perf_counter_ns()
            if started >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            ended = time.perf_counter_ns()
            if started >= measure_from:
                latencies.append(ended - started)
                counts["requests"] += 1
                if not 200 <= status < 300:
                    counts["status"] += 1
    finally:
        writer.close()


async def run(port: int, request: bytes, connections: int, duration: float, warmup: float) -> dict[str, float]:
    now = time.perf_counter_ns()
    measure_from = now + int(warmup * 1e9)
    stop_at = measure_from + int(duration * 1e9)
    latencies: list[int] = []
    counts = {"requests": 0, "status": 0}
    await asyncio.gather(*(connection(port, request, stop_at, measure_from, latencies, counts)
                           for _ in range(connections)))
    latencies.sort()

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1e3 if latencies else 0.0

    return {"requests": counts["requests"], "duration_us": duration * 1e6, "status": counts["status"],
            "connect": 0, "read": 0, "write": 0, "timeout": 0,
            "p50_us": percentile(0.50), "p90_us": percentile(0.90), "p99_us": percentile(0.99)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--request-file", type=Path, required=True, help="the whole HTTP request, head and body")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.0)
    args = parser.parse_args()
    result = asyncio.run(run(args.port, args.request_file.read_bytes(), args.connections, args.duration,
                             args.warmup))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
