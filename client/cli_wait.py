"""`nnserve wait`: block until a server (and the models named) is ready, for scripts, init containers and CI.

It asks what a load balancer asks (the grpc.health.v1 service: "" for the server, each model's name), so it needs no
token scope at all, and it waits for a server that is not listening yet. Exit 0 once everything is ready, 1 with a
line naming what was not when `--timeout` runs out, 2 for usage errors.
"""

from __future__ import annotations

import argparse

from nnserve.client.cli_common import EXIT_OK, add_connection_arguments, make_client, report_error
from nnserve.client.errors import InferenceError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `nnserve wait`."""
    parser.add_argument("--model", "-m", action="append", default=[], metavar="NAME",
                        help="also wait for this model to be ready (repeatable)")
    add_connection_arguments(parser)
    parser.set_defaults(timeout=60.0)
    for action in parser._actions:  # the shared --timeout means "per call" elsewhere; here it bounds the whole wait
        if action.dest == "timeout":
            action.help = "seconds to wait for readiness in all (default %(default)s)"


def run(args: argparse.Namespace) -> int:
    """Entry point of `nnserve wait`."""
    try:
        with make_client(args) as client:
            client.wait_until_ready(timeout=args.timeout, models=args.model)
    except InferenceError as error:
        return report_error("wait", error)
    names = ", ".join(repr(m) for m in args.model)
    print(f"ready: {args.url}" + (f" (models {names})" if names else ""))
    return EXIT_OK
