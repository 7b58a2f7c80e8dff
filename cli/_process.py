"""What nnserve does to a process it owns (the `nnserve` command and the workers of `nnserve serve --workers N`),
and never to an application that imports nnserve as a library.

* gRPC core's own log lines (`I1201 ... ssl_transport_security.cc ... Handshake failed`, `chttp2 ... GOAWAY`) go to
  stderr at INFO by default; they say nothing the command does not already report, so nnserve's processes run with
  `GRPC_VERBOSITY=ERROR` unless the user set `GRPC_VERBOSITY` or `GRPC_TRACE` (or passes `--grpc-verbosity`). gRPC
  reads the variable when it initialises, so this must happen before the command imports grpc.
* A finished command ends with `os._exit` once its logs and output are flushed: tearing down the interpreter (garbage
  collection over every object of onnxruntime, onnx, protobuf, grpc and numpy, then each module, then onnxruntime's
  exit handlers) took 0.13-0.3 s after `serve` had said its last word on the shared 2-core development machine, and
  up to 1.6 s when it was busier; it does nothing for a process that is about to end (files are closed, children
  reaped, sessions and channels stopped by then). `benchmarks/cli_startup.py` measures it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import MutableMapping
from typing import NoReturn

GRPC_VERBOSITY_ENV = "GRPC_VERBOSITY"
GRPC_TRACE_ENV = "GRPC_TRACE"
GRPC_VERBOSITIES: tuple[str, ...] = ("DEBUG", "INFO", "ERROR", "NONE")
DEFAULT_GRPC_VERBOSITY = "ERROR"
"""gRPC core's errors still show; its INFO lines (failed handshakes of misconfigured clients, GOAWAYs) do not."""

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
"""What stops a server gracefully (drain, then exit); the workers of `--workers N` start with them blocked."""


def configure_grpc_logging(level: str | None, environ: MutableMapping[str, str] | None = None) -> None:
    """Set `GRPC_VERBOSITY` for this process (and the children it starts): `level` when given, else ERROR unless
    the user already chose a verbosity or a trace."""
    environ = os.environ if environ is None else environ
    if level is not None:
        environ[GRPC_VERBOSITY_ENV] = level
    elif GRPC_VERBOSITY_ENV not in environ and GRPC_TRACE_ENV not in environ:
        environ[GRPC_VERBOSITY_ENV] = DEFAULT_GRPC_VERBOSITY


def end_process(code: int) -> NoReturn:
    """Flush the logs and the standard streams, then end the process at once with `code` (see the module doc)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe (`nnserve models | head`) must not change the status
            stream.flush()
    os._exit(code)
