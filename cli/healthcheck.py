"""`nnserve-healthcheck`: exit 0 when a server's grpc.health.v1 service reports SERVING, 1 otherwise.

For container HEALTHCHECKs and Kubernetes exec probes, where the kubelet's built-in gRPC probe cannot be used
(it speaks no TLS). SERVICE "" (the default) is the whole server, SERVING once every model it is meant to serve is
ready and until a drain begins; a model name checks that model alone; `liveness` only whether the process serves.

The address is `--address`, else `$NNSERVE_HEALTHCHECK_ADDRESS`, else the gRPC port of `$NNSERVE_PORT_FILE` (the
server's port report, for servers started on port 0), else `localhost:$NNSERVE_GRPC_PORT` (8001): run inside the
server's container, it finds the server from the server's own environment. TLS is on when a CA is given
(`--root-cert` / `$NNSERVE_HEALTHCHECK_ROOT_CERT`) or `--tls`; mutual TLS adds `--client-cert` and `--client-key`
(`$NNSERVE_HEALTHCHECK_CLIENT_CERT`, `$NNSERVE_HEALTHCHECK_CLIENT_KEY`), and `--tls-server-name`
(`$NNSERVE_HEALTHCHECK_SERVER_NAME`) is the name the server's certificate holds when it is not the address's host.

It imports only grpc and its health stubs (not the SDK, numpy or onnxruntime): probes run every few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENV_PREFIX = "NNSERVE_HEALTHCHECK_"


def _env(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name) or None


def default_address() -> str:
    """Where the server of this environment listens (see the module docstring)."""
    explicit = _env("ADDRESS")
    if explicit:
        return explicit
    port_file = os.environ.get("NNSERVE_PORT_FILE")
    if port_file:
        try:
            return f"localhost:{int(json.loads(Path(port_file).read_text())['grpc'])}"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not written yet (still starting): fall back to the configured port
    return f"localhost:{os.environ.get('NNSERVE_GRPC_PORT', '8001')}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnserve-healthcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("service", nargs="?", default="", help='health service name: "" (the server, default), '
                        "a model name, or liveness")
    parser.add_argument("--address", default=None, help="host:port of the server (default: see below)")
    parser.add_argument("--timeout", type=float, default=float(_env("TIMEOUT") or 3.0),
                        help="seconds for the check (env NNSERVE_HEALTHCHECK_TIMEOUT; default %(default)s)")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    parser.add_argument("--root-cert", default=_env("ROOT_CERT"), metavar="PEM",
                        help="CA that signed the server's certificate (implies TLS; env NNSERVE_HEALTHCHECK_ROOT_CERT)")
    parser.add_argument("--client-cert", default=_env("CLIENT_CERT"), metavar="PEM",
                        help="client certificate chain for mutual TLS (env NNSERVE_HEALTHCHECK_CLIENT_CERT)")
    parser.add_argument("--client-key", default=_env("CLIENT_KEY"), metavar="PEM",
                        help="client private key for mutual TLS (env NNSERVE_HEALTHCHECK_CLIENT_KEY)")
    parser.add_argument("--tls-server-name", default=_env("SERVER_NAME"), metavar="NAME",
                        help="name in the server's certificate (env NNSERVE_HEALTHCHECK_SERVER_NAME)")
    parser.epilog = ("Address: --address, else $NNSERVE_HEALTHCHECK_ADDRESS, else the grpc port in $NNSERVE_PORT_FILE, "
                     "else localhost:$NNSERVE_GRPC_PORT (8001). Exit 0 when SERVING, 1 otherwise, 2 on usage errors.")
    args = parser.parse_args(argv)
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("mutual TLS needs both --client-cert and --client-key")
    return args


def channel(args: argparse.Namespace) -> Any:
    """A plaintext or TLS grpc.Channel to the server, as the flags say."""
    import grpc

    target = args.address or default_address()
    if not (args.tls or args.root_cert or args.client_cert):
        return grpc.insecure_channel(target)

    def read(path: str | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    credentials = grpc.ssl_channel_credentials(read(args.root_cert), read(args.client_key), read(args.client_cert))
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(target, credentials, options)


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """(healthy, what to print) for one Check call."""
    import grpc  # here, after main() has set gRPC's log level for this process
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.address or default_address()
    try:
        opened = channel(args)
    except OSError as exc:
        return False, f"cannot read a TLS file: {exc}"
    with opened:
        try:
            reply = health_pb2_grpc.HealthStub(opened).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            hint = ""
            details = exc.details() or ""  # type: ignore[attr-defined]
            if "Socket closed" in details and not (args.tls or args.root_cert):
                hint = " (if the server serves TLS, pass --root-cert, and --client-cert/--client-key for mutual TLS)"
            return False, f"{target} service {args.service!r}: {exc.code().name}: {details}{hint}"  # type: ignore[attr-defined]
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target} service {args.service!r}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # its own process: keep gRPC core's log lines out of probes
    healthy, message = check(parse_args(sys.argv[1:] if argv is None else argv))
    sys.stdout.write(message + "\n")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
