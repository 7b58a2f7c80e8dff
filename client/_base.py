"""What the sync and asyncio clients share: construction, call metadata, deadlines and the metadata cache."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from nnserve.client.connection import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ConnectionSettings,
    Keepalive,
    LoadBalancing,
    PemSource,
    call_metadata,
)
from nnserve.client.retry import RetryPolicy
from nnserve.client.types import ModelMetadata

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRY = RetryPolicy()


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
        """
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

    @property
    def url(self) -> str:
        """The url this client was created with."""
        return self._settings.url

    def _timeout(self, timeout: float | None) -> float | None:
        return self._default_timeout if timeout is None else timeout

    def _cached(self, model: str, version: str | int | None) -> ModelMetadata | None:
        return self._metadata_cache.get((model, "" if version is None else str(version)))

    def _remember(self, model: str, version: str | int | None, metadata: ModelMetadata) -> ModelMetadata:
        self._metadata_cache[(model, "" if version is None else str(version))] = metadata
        return metadata

    def _forget(self, model: str) -> None:
        """Drop cached metadata of a model after an error that may mean it was reloaded with another signature."""
        for key in [key for key in self._metadata_cache if key[0] == model]:
            self._metadata_cache.pop(key, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._settings.url!r})"
