"""What the sync and asyncio clients share: construction, call metadata, deadlines, readiness waits and the
metadata cache."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from grpc_health.v1 import health_pb2

from nnserve.client.connection import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ConnectionSettings,
    Keepalive,
    LoadBalancing,
    PemSource,
    call_metadata,
)
from nnserve.client.errors import ServerNotReadyError
from nnserve.client.retry import RetryPolicy
from nnserve.client.types import ModelMetadata

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRY = RetryPolicy()
DEFAULT_READY_TIMEOUT_S = 60.0
SERVER = ""
"""The health service name of the server as a whole (what a load balancer's readiness probe asks)."""
_HEALTH_WORDS = {
    health_pb2.HealthCheckResponse.SERVING: "SERVING",
    health_pb2.HealthCheckResponse.NOT_SERVING: "NOT_SERVING",
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
    health_pb2.HealthCheckResponse.UNKNOWN: "UNKNOWN",
}
_WHY = {
    (SERVER, "NOT_SERVING"): "still loading, draining, or a model it should serve is not ready",
    (None, "NOT_SERVING"): "not loaded, failed to load, or unloaded",
    (None, "SERVICE_UNKNOWN"): "the server has no such model",
}


class ClientBase:
    """Settings and state common to both clients; neither opens a channel before its first call."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        gzip: bool = False,
        tls: bool = False,
        root_certificates: PemSource | None = None,
        private_key: PemSource | None = None,
        certificate_chain: PemSource | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        load_balancing: LoadBalancing | None = None,
        keepalive: Keepalive | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
        wait_for_ready: bool = False,
        connections: int = 1,
    ) -> None:
        """Configure a client for `url`; nothing is connected until the first call.

        Args:
            url: `host:port`, a comma list `host1:port,host2:port`, or a gRPC target such as
                `dns:///nnserve-headless:8001` (see `nnserve.client.connection` for load balancing).
            timeout: default deadline in seconds of every call, retries included; None waits forever.
            retry: backoff policy for UNAVAILABLE / RESOURCE_EXHAUSTED; None never retries.
            gzip: compress requests with gzip (the server answers in kind).
            tls: use TLS with the system's root certificates (implied by any certificate argument).
            root_certificates: PEM (bytes, PEM str or file path) of the CA that signed the server's certificate.
            private_key: client key for mutual TLS.
            certificate_chain: client certificate chain for mutual TLS.
            tls_server_name: the name to verify in the server's certificate when it differs from the url's host.
            token: sent as `authorization: Bearer <token>` with every call.
            headers: extra metadata sent with every call.
            load_balancing: "round_robin" or "pick_first"; default round_robin for address lists and dns:/// urls.
            keepalive: HTTP/2 keepalive pings (recommended behind Kubernetes headless services).
            max_message_bytes: largest request or response, both ways.
            channel_options: raw grpc channel arguments, applied last.
            wait_for_ready: default of every call's `wait_for_ready`: False fails a call at once (UNAVAILABLE) while
                the server cannot be reached; True lets it wait for the connection until its deadline (gRPC's own
                call option), e.g. for a client that may start before its server.
            connections: TCP connections this client opens and spreads its calls over in turn. Each client has
                connections of its own (never shared with other clients in the process), so several clients, or
                one client with `connections` > 1, reach every worker of a `--workers N` server (which balances
                connections, not requests).
        """
        if isinstance(connections, bool) or not isinstance(connections, int) or not 1 <= connections <= 256:
            raise ValueError(f"connections must be an integer in [1, 256], got {connections!r}")
        self._settings = ConnectionSettings(
            url=url,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            tls_server_name=tls_server_name,
            gzip=gzip,
            load_balancing=load_balancing,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
            channel_options=tuple(channel_options),
        )
        self._credentials = self._settings.credentials()  # fails here on unreadable or incomplete certificates
        self._default_timeout = timeout
        self._retry = retry or RetryPolicy.disabled()
        self._metadata = call_metadata(token, headers)
        self._metadata_cache: dict[tuple[str, str], ModelMetadata] = {}
        self._lock = threading.Lock()  # guards lazy channel creation and closing
        self._wait_for_ready = wait_for_ready
        self._connections = connections
        self._turn = itertools.count()  # which connection the next call uses (round robin)

    @property
    def url(self) -> str:
        """The url this client was created with."""
        return self._settings.url

    def _timeout(self, timeout: float | None) -> float | None:
        return self._default_timeout if timeout is None else timeout

    def _waits(self, wait_for_ready: bool | None) -> bool:
        return self._wait_for_ready if wait_for_ready is None else wait_for_ready

    def _not_ready_error(self, timeout: float, services: Sequence[str], seen: Mapping[str, str]) -> ServerNotReadyError:
        """The error `wait_until_ready` raises: every service that was not SERVING, with what was last seen of it."""
        if not seen:
            return ServerNotReadyError(
                f"no server answered at {self.url} within {timeout:g} s: is it running and listening there"
                + (", with TLS?" if self._settings.uses_tls else "? (a TLS server needs tls=True)"),
                dict.fromkeys(services, "unreachable"),
            )
        not_ready = {service: seen.get(service, "not checked") for service in services
                     if seen.get(service) != "SERVING"}
        parts = []
        for service, status in not_ready.items():
            what = "the server" if service == SERVER else f"model {service!r}"
            why = _WHY.get((SERVER if service == SERVER else None, status))
            parts.append(f"{what}: {status}" + (f" ({why})" if why else ""))
        return ServerNotReadyError(f"not ready after {timeout:g} s at {self.url}: " + "; ".join(parts), not_ready)

    def _cached(self, model: str, version: str | int | None) -> ModelMetadata | None:
        return self._metadata_cache.get((model, "" if version is None else str(version)))

    def _remember(self, model: str, version: str | int | None, metadata: ModelMetadata) -> ModelMetadata:
        self._metadata_cache[(model, "" if version is None else str(version))] = metadata
        return metadata

    def _forget(self, model: str) -> None:
        """Drop cached metadata of a model after an error that may mean it was reloaded with another signature."""
        for key in [key for key in self._metadata_cache if key[0] == model]:
            self._metadata_cache.pop(key, None)

    def _next_index(self) -> int:
        """The connection for the next call, in turn."""
        return next(self._turn) % self._connections if self._connections > 1 else 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._settings.url!r})"


def health_word(status: int) -> str:
    """The name of a grpc.health.v1 serving status."""
    return _HEALTH_WORDS.get(status, str(status))  # type: ignore[call-overload]
