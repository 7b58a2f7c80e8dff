"""What the client subcommands share: connection flags, client construction, error reporting and table output.

Exit codes are the same for every subcommand: 0 success, 1 the server or a request failed (status and message are
printed), 2 a usage error (bad flags, unreadable input files).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from nnserve.client._base import DEFAULT_URL
from nnserve.client.async_client import AsyncInferenceClient
from nnserve.client.errors import InferenceError
from nnserve.client.retry import RetryPolicy
from nnserve.client.sync_client import InferenceClient

EXIT_OK = 0
EXIT_REQUEST_FAILED = 1
EXIT_USAGE = 2

URL_ENV = "NNSERVE_URL"
TOKEN_ENV = "NNSERVE_TOKEN"


class UsageError(Exception):
    """Bad command-line input found after parsing (e.g. malformed --data); exits with code 2."""


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--url, --timeout and the TLS / token / gzip flags, with environment-variable defaults."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"server address: host:port, a comma list, or dns:///name:port (env {URL_ENV}; default %(default)s)",
    )
    group.add_argument("--timeout", type=float, default=30.0, help="deadline per call in seconds (default %(default)s)")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    group.add_argument("--root-cert", metavar="PEM", help="CA certificate to verify the server (implies --tls)")
    group.add_argument("--client-cert", metavar="PEM", help="client certificate chain for mutual TLS")
    group.add_argument("--client-key", metavar="PEM", help="client private key for mutual TLS")
    group.add_argument("--tls-server-name", metavar="NAME", help="name expected in the server's certificate")
    group.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help=f"bearer token sent with every call (env {TOKEN_ENV})"
    )
    group.add_argument("--gzip", action="store_true", help="compress requests with gzip")


def client_options(args: argparse.Namespace, *, retry: RetryPolicy | None) -> dict[str, Any]:
    """Keyword arguments for either client from the parsed connection flags."""
    return {
        "timeout": args.timeout,
        "retry": retry,
        "gzip": args.gzip,
        "tls": args.tls,
        "root_certificates": args.root_cert,
        "private_key": args.client_key,
        "certificate_chain": args.client_cert,
        "tls_server_name": args.tls_server_name,
        "token": args.token,
    }


def make_client(args: argparse.Namespace) -> InferenceClient:
    """A sync client; a CLI call retries briefly so that a server still starting is not an error."""
    return InferenceClient(args.url, **client_options(args, retry=RetryPolicy(max_attempts=3)))


def make_async_client(args: argparse.Namespace, *, retry: RetryPolicy | None = None) -> AsyncInferenceClient:
    """An asyncio client; no retries by default, so that measurements count every rejection."""
    return AsyncInferenceClient(args.url, **client_options(args, retry=retry))


def report_error(command: str, error: BaseException) -> int:
    """Print a failure on stderr and return its exit code."""
    if isinstance(error, InferenceError):
        print(f"nnserve {command}: {error.code.name}: {error.message}", file=sys.stderr)
        return EXIT_REQUEST_FAILED
    print(f"nnserve {command}: {error}", file=sys.stderr)
    return EXIT_USAGE


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[bool] = ()) -> str:
    """A plain text table: a header, a rule, one line per row; columns right-aligned where `right` says so."""
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = [*right, *([False] * (len(headers) - len(right)))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, align, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])
