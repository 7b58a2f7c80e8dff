"""`nnserve bench`: throughput and latency against a running server, per concurrency level, from the client side.

Bounded in time (`--warmup` + `--duration` per level) and count (`--max-requests` per level). Prints a table (or
`--json`) with client-side percentiles and the server-side split from ModelStatistics; `--plot FILE.png` draws them.

A failed request fails the run (exit status 1, the failures by status on stderr): figures measured while the server
answered UNAVAILABLE are not figures of a working server. Statuses the measurement expects (RESOURCE_EXHAUSTED when
overloading on purpose) are named with `--allow-status`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from nnserve.client.bench import BenchConfig, LevelResult, failures_by_status, run_bench, unexpected_failures
from nnserve.client.cli_common import (
    EXIT_OK,
    EXIT_REQUEST_FAILED,
    EXIT_USAGE,
    add_connection_arguments,
    format_table,
    make_async_client,
    report_error,
)
from nnserve.client.errors import InferenceError
from nnserve.client.plot import MISSING_MATPLOTLIB, plot_levels, plotting_available

_STATUS_NAMES = frozenset(code.name for code in grpc.StatusCode)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `nnserve bench`."""
    parser.add_argument("model", metavar="MODEL", help="model name")
    parser.add_argument(
        "--concurrency", type=_levels, default=(1, 8, 64), help="comma list of concurrent workers (default 1,8,64)"
    )
    parser.add_argument("--duration", type=_positive_float, default=5.0, help="seconds measured per level (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load per level (default 1)")
    parser.add_argument("--batch-rows", type=_positive_int, default=1, help="rows per request (default 1)")
    parser.add_argument(
        "--max-requests", type=_positive_int, default=1_000_000, help="most requests per level (default 1000000)"
    )
    parser.add_argument("--version", help="model version (default: the server's choice)")
    parser.add_argument(
        "--allow-status", metavar="CODE[,CODE]", type=_statuses, action="append", default=[],
        help="gRPC status that does not fail the run, e.g. RESOURCE_EXHAUSTED (repeatable or a comma list); "
        "by default any failed request makes the exit status 1",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", type=Path, help="save a figure (needs matplotlib)")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run `nnserve bench`; exit codes per `nnserve.client.cli_common`: 1 also when a level had no success, or when
    any request failed with a status not given to --allow-status."""
    if args.plot is not None and not plotting_available():
        print(f"nnserve bench: {MISSING_MATPLOTLIB}", file=sys.stderr)
        return EXIT_USAGE
    config = BenchConfig(
        model=args.model,
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=max(args.warmup, 0.0),
        batch_rows=args.batch_rows,
        max_requests=args.max_requests,
        version=args.version,
        timeout_s=args.timeout,
    )
    try:
        levels = asyncio.run(_bench(args, config))
    except (InferenceError, OSError, ValueError) as error:
        return report_error("bench", error)
    if args.json:
        print(json.dumps(_as_json(args, config, levels), indent=2))
    else:
        print(format_levels(levels))
    if args.plot is not None:
        plot_levels(levels, args.plot, f"nnserve bench {config.model}, {config.batch_rows} row(s) per request")
        print(f"plot written to {args.plot}", file=sys.stderr)
    allowed = {code for codes in args.allow_status for code in codes}
    unexpected = unexpected_failures(levels, allowed)
    failed = failures_by_status(levels)
    if failed:
        verdict = f"not allowed: {', '.join(sorted(unexpected))}" if unexpected else "all allowed by --allow-status"
        print(f"nnserve bench: {sum(failed.values())} requests failed: {_by_status(failed)} ({verdict})",
              file=sys.stderr)
    if not all(level.requests for level in levels):
        print("nnserve bench: a concurrency level had no successful request", file=sys.stderr)
        return EXIT_REQUEST_FAILED
    return EXIT_REQUEST_FAILED if unexpected else EXIT_OK


async def _bench(args: argparse.Namespace, config: BenchConfig) -> list[LevelResult]:
    async with make_async_client(args) as client:

        def progress(level: LevelResult) -> None:
            print(
                f"concurrency {level.concurrency}: {level.requests} requests in {level.duration_s:.1f}s",
                file=sys.stderr,
            )

        return await run_bench(client, config, progress)


def format_levels(levels: list[LevelResult]) -> str:
    """The result table: client-side throughput and percentiles, then the server-side split per request."""
    headers = ["CONC", "REQ/S", "ROWS/S", "P50 MS", "P90 MS", "P99 MS"]
    headers += ["SRV MS", "QUEUE MS", "INFER MS", "ROWS/EXEC", "ERRORS"]
    rows = []
    for level in levels:
        server = level.server
        rows.append(
            [
                level.concurrency,
                f"{level.requests_per_s:,.0f}",
                f"{level.rows_per_s:,.0f}",
                _ms(level.p50_ms),
                _ms(level.p90_ms),
                _ms(level.p99_ms),
                _ms(server.request_ms if server else None),
                _ms(server.queue_ms if server else None),
                _ms(server.compute_infer_ms if server else None),
                f"{server.rows_per_execution:.1f}" if server and server.rows_per_execution else None,
                _by_status(level.errors) or "0",
            ]
        )
    return format_table(headers, rows, right=[True] * (len(headers) - 1) + [False])


def _as_json(args: argparse.Namespace, config: BenchConfig, levels: list[LevelResult]) -> dict[str, Any]:
    return {
        "model": config.model,
        "version": config.version,
        "url": args.url,
        "batch_rows": config.batch_rows,
        "duration_s": config.duration_s,
        "warmup_s": config.warmup_s,
        "levels": [asdict(level) for level in levels],
        "failures": dict(failures_by_status(levels)),
        "allowed_statuses": sorted({code for codes in args.allow_status for code in codes}),
    }


def _by_status(counts: Mapping[str, int]) -> str:
    """`UNAVAILABLE 1200, DEADLINE_EXCEEDED 3`: most frequent first."""
    return ", ".join(f"{code} {count}" for code, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _statuses(text: str) -> tuple[str, ...]:
    codes = tuple(part.strip().upper() for part in text.split(",") if part.strip())
    unknown = [code for code in codes if code not in _STATUS_NAMES or code == "OK"]
    if not codes or unknown:
        raise argparse.ArgumentTypeError(
            f"expected gRPC status names such as RESOURCE_EXHAUSTED or UNAVAILABLE, got {text!r}"
        )
    return codes


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return levels


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value
