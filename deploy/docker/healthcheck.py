#!/usr/bin/env python
"""Container HEALTHCHECK: exit 0 when nnserve's grpc.health.v1 service reports SERVING.

Usage: nnserve-healthcheck [SERVICE]. SERVICE "" (the default) is the whole server, SERVING only
once every model has loaded and until a drain begins; a model name checks that model alone. The
port is the server's own NNSERVE_GRPC_PORT. Docker and Podman run this; Kubernetes ignores
HEALTHCHECK and uses the Deployment's native gRPC probes instead.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str, timeout_s: float) -> tuple[bool, str]:
    """(healthy, what to print) for one Check call."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return False, f"{target} service {service!r}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target} service {service!r}: {status}"


def main(argv: list[str]) -> int:
    service = argv[1] if len(argv) > 1 else ""
    target = f"localhost:{os.environ.get('NNSERVE_GRPC_PORT', '8001')}"
    healthy, message = check(target, service, float(os.environ.get("NNSERVE_HEALTHCHECK_TIMEOUT", "3")))
    sys.stdout.write(message + "\n")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
