"""Closed-loop load generator (its own process): N concurrent callers, each sending its next request when the last
one returns; prints one JSON object with throughput and latency percentiles.

Two clients, selected with --client:

* `raw`: grpc.aio with pre-serialized request bytes (no protobuf work per call): the cheapest Python client, used
  for every target alike (nnserve, the bare echo server, MLServer, Triton) so that differences are the servers'.
* `sdk`: nnserve's own `AsyncInferenceClient.infer` (numpy in, numpy out), what an application would run.

Run as `python benchmarks/loadgen.py --target 127.0.0.1:8001 --model m --rows 1 --width 4 --concurrency 8`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import infer_request_bytes

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def _drive(
    call: Callable[[int], Awaitable[None]], concurrency: int, warmup_s: float, duration_s: float
) -> tuple[list[float], int, float]:
    """Warm up, then measure `duration_s` of closed-loop load; latencies of successful calls, errors, elapsed."""
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.monotonic() + warmup_s

    async def worker(index: int) -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                await call(index)
            except grpc.RpcError:
                if measuring:
                    errors += 1
                continue
            if measuring:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    measuring = True
    started = time.monotonic()
    stop_at = started + duration_s
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, errors, time.monotonic() - started


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.width)).astype(np.float32)
    if args.client == "raw":
        # Separate connections (a local subchannel pool each), so that `--workers` servers see them spread.
        channels = [grpc.aio.insecure_channel(args.target, options=[*options, ("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(args.channels)]
        payload = infer_request_bytes(args.model, args.input, x)
        methods = [channel.unary_unary(INFER_METHOD) for channel in channels]

        async def call(worker: int) -> None:
            # Each caller keeps to one connection: a slower server process behind it slows only its own callers.
            await methods[worker % len(methods)](payload, timeout=args.timeout)

        closers = [channel.close() for channel in channels]
    else:
        from nnserve.client import AsyncInferenceClient

        client = AsyncInferenceClient(args.target, retry=None, timeout=args.timeout,
                                      channel_options=[("grpc.use_local_subchannel_pool", 1)])
        inputs = {args.input: x}

        async def call(worker: int) -> None:
            try:
                await client.infer(args.model, inputs)
            except Exception as exc:  # the SDK's InferenceError: count it like an RpcError
                raise grpc.RpcError(str(exc)) from exc

        closers = [client.close()]
    latencies, errors, elapsed = await _drive(call, args.concurrency, args.warmup, args.duration)
    for closer in closers:
        await closer
    ms = np.asarray(latencies) * 1000.0
    count = len(latencies)
    return {
        "client": args.client,
        "concurrency": args.concurrency,
        "rows": args.rows,
        "requests": count,
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": count / elapsed,
        "rows_per_s": count * args.rows / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if count else None,
        "p99_ms": float(np.percentile(ms, 99)) if count else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", default="input")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--channels", type=int, default=1, help="connections (raw client); >1 spreads over workers")
    parser.add_argument("--client", choices=("raw", "sdk"), default="raw")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
