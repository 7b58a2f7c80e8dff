"""The `nnserve` command: one entry point, a subcommand per part of the product.

Each part owns its subcommand in a module exposing `add_arguments(parser)` and `run(args) -> int`; this file only
wires them together. Only the module of the command being run is imported: the others pull in onnx, onnxruntime,
grpc and numpy (about 0.5 s on an idle 2-core machine, seconds on a busy one), which `nnserve --version`,
`nnserve --help` and a client command such as `nnserve infer` do not need. A new subcommand is one line of
`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Collection, Sequence
from typing import NoReturn

from nnserve import __version__
from nnserve._process import GRPC_VERBOSITIES, configure_grpc_logging, end_process

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build": ("nnserve.builder.cli", "build JSON network specs into ONNX models in a model repository"),
    "serve": ("nnserve.server.cli", "serve a model repository over the KServe v2 gRPC protocol"),
    "infer": ("nnserve.client.cli_infer", "send one inference request to a server"),
    "models": ("nnserve.client.cli_models", "list a server's models, versions, state and size"),
    "wait": ("nnserve.client.cli_wait", "wait until a server (and the models named) is ready"),
    "bench": ("nnserve.client.cli_bench", "measure throughput and latency against a server"),
}

LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _ScanError(Exception):
    """The top-level flags do not parse; the real parser reports it."""


class _Scanner(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ScanError(message)


def _add_global_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags before COMMAND; the scanner and the real parser must agree on which of them take a value."""
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="logging level of nnserve's own messages (default: %(default)s)")
    parser.add_argument(
        "--grpc-verbosity", type=str.upper, choices=GRPC_VERBOSITIES, default=None,
        help="gRPC core's own log lines on stderr (sets GRPC_VERBOSITY for this process and its workers); "
        "default: $GRPC_VERBOSITY if set, else ERROR (INFO shows e.g. failed TLS handshakes, GOAWAYs)",
    )


def scan(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """The command named in `argv` and the --grpc-verbosity given, without importing any subcommand."""
    scanner = _Scanner(add_help=False)
    _add_global_arguments(scanner)
    scanner.add_argument("command", nargs="?")
    try:
        known, _rest = scanner.parse_known_args(list(argv))
    except _ScanError:
        return None, None
    return known.command, known.grpc_verbosity


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `nnserve` parser. Only the subcommands in `commands` (all when None) get their flags, which imports their
    modules; the others are listed by name and help only."""
    parser = argparse.ArgumentParser(
        prog="nnserve",
        description="Build dense networks into ONNX and serve them over the KServe v2 gRPC protocol.",
    )
    parser.add_argument("--version", action="version", version=f"nnserve {__version__}")
    _add_global_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if commands is None or name in commands:
            _add_subcommand(sub, name, module_name)
    return parser


def _add_subcommand(sub: argparse.ArgumentParser, name: str, module_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        sub.set_defaults(handler=_not_available(name))
        return
    module.add_arguments(sub)
    sub.set_defaults(handler=module.run)


def _not_available(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(_args: argparse.Namespace) -> int:
        print(f"nnserve {name}: not yet available in nnserve {__version__}", file=sys.stderr)
        return 2

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Called without `argv` (the `nnserve` executable, `python -m nnserve`), the process is
    nnserve's own: gRPC core's log lines are quiet unless asked for, and the process ends as soon as the command
    has (`nnserve._process`). With `argv`, from Python, only the command runs and its status is returned."""
    own_process = argv is None
    arguments = sys.argv[1:] if argv is None else list(argv)
    command, grpc_verbosity = scan(arguments)
    if own_process or grpc_verbosity is not None:
        configure_grpc_logging(grpc_verbosity)  # before the command's module imports grpc
    parser = build_parser(() if command is None else (command,))
    args = parser.parse_args(arguments)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code = int(args.handler(args) or 0)
    if own_process:
        end_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
