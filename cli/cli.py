"""The `nnserve` command: one entry point, a subcommand per part of the product.

Each part owns its subcommand in a module exposing `add_arguments(parser)` and
`run(args) -> int`; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from nnserve import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build": ("nnserve.builder.cli", "build JSON network specs into ONNX models in a model repository"),
    "serve": ("nnserve.server.cli", "serve a model repository over the KServe v2 gRPC protocol"),
    "infer": ("nnserve.client.cli_infer", "send one inference request to a server"),
    "models": ("nnserve.client.cli_models", "list a server's models, versions, state and size"),
    "wait": ("nnserve.client.cli_wait", "wait until a server (and the models named) is ready"),
    "bench": ("nnserve.client.cli_bench", "measure throughput and latency against a server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnserve",
        description="Build dense networks into ONNX and serve them over the KServe v2 gRPC protocol.",
    )
    parser.add_argument("--version", action="version", version=f"nnserve {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            sub.set_defaults(handler=_not_available(name))
            continue
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def _not_available(name: str):  # type: ignore[no-untyped-def]
    def handler(_args: argparse.Namespace) -> int:
        print(f"nnserve {name}: not yet available in nnserve {__version__}", file=sys.stderr)
        return 2

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
