"""How a client reaches its server(s): target string, load balancing, TLS, keepalive and channel options.

Both clients build their channel from one `ConnectionSettings`, so a sync and an asyncio client configured alike
behave alike on the wire.

Load balancing across replicas is done by gRPC itself, per call, with the `round_robin` policy:

* `"dns:///nnserve-headless.ml.svc.cluster.local:8001"`: every address the name resolves to. With a Kubernetes
  *headless* Service (`clusterIP: None`) that is one address per ready pod. A normal ClusterIP Service resolves to
  a single virtual IP and pins each client to one pod per connection: use the headless one.
* `"10.0.0.5:8001,10.0.0.6:8001"`: a fixed list (literal IPs become an `ipv4:`/`ipv6:` target; host names are
  resolved once, when the client is created).

gRPC re-resolves DNS when a connection drops, not on a timer: to discover pods added by a scale-up, let the server
close connections after a while (`grpc.max_connection_age_ms` on the server, e.g. 5 minutes) and use
`Keepalive()` here so dead pods (node failure, no TCP reset) are noticed within `time_s + timeout_s` instead of
the kernel's TCP timeout. Keep `time_s` at or above the server's allowed ping interval
(`grpc.http2.min_recv_ping_interval_without_data_ms`), or the server answers with GOAWAY "too_many_pings".
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc

PemSource = bytes | str | Path
"""PEM data: `bytes`, or a `str` starting with "-----BEGIN", is the content; any other `str` or a Path names a file."""

LoadBalancing = Literal["round_robin", "pick_first"]

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""gRPC's default 4 MiB receive limit is smaller than one batch of a large model's outputs; 256 MiB fits most."""

_PASS_THROUGH_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


@dataclass(frozen=True, slots=True)
class Keepalive:
    """HTTP/2 keepalive pings, so a connection to a vanished replica is detected and dropped quickly.

    Recommended for Kubernetes headless services (see the module docstring): `Keepalive()` pings after 30 s without
    activity on a connection with calls in flight and drops the connection when no answer arrives within 10 s.
    """

    time_s: float = 30.0
    """Idle time before a ping."""
    timeout_s: float = 10.0
    """How long to wait for the ping's answer before closing the connection."""
    permit_without_calls: bool = False
    """Ping also when no call is in flight; servers often refuse this (GOAWAY too_many_pings), so off by default."""

    def channel_options(self) -> list[tuple[str, Any]]:
        """The grpc channel arguments for these settings."""
        return [
            ("grpc.keepalive_time_ms", int(self.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", int(self.permit_without_calls)),
            ("grpc.http2.max_pings_without_data", 0),
        ]


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """Everything needed to open a channel; shared by the sync and asyncio clients."""

    url: str
    tls: bool = False
    root_certificates: PemSource | None = None
    private_key: PemSource | None = None
    certificate_chain: PemSource | None = None
    tls_server_name: str | None = None
    gzip: bool = False
    load_balancing: LoadBalancing | None = None
    keepalive: Keepalive | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    reconnect_backoff_s: tuple[float, float] = (0.1, 2.0)
    """Initial and largest wait between gRPC's own reconnection attempts. gRPC's defaults (1 s growing to 120 s)
    would leave a client failing fast for up to two minutes after a server restart; retries need a channel that
    tries again soon."""
    channel_options: Sequence[tuple[str, Any]] = field(default_factory=tuple)
    """Extra raw grpc channel arguments; they override the ones derived from the fields above."""

    @property
    def uses_tls(self) -> bool:
        """TLS is on when asked for or when any certificate or key is given."""
        pem = (self.root_certificates, self.private_key, self.certificate_chain)
        return self.tls or any(x is not None for x in pem)

    def target(self) -> str:
        """The grpc target string for `url` (see `channel_target`)."""
        return channel_target(self.url)

    def options(self) -> list[tuple[str, Any]]:
        """Channel arguments: message limits, reconnect backoff, a connection of its own, load balancing,
        keepalive, TLS name, extras."""
        initial, largest = self.reconnect_backoff_s
        options: dict[str, Any] = {
            "grpc.max_send_message_length": self.max_message_bytes,
            "grpc.max_receive_message_length": self.max_message_bytes,
            "grpc.initial_reconnect_backoff_ms": int(initial * 1000),
            "grpc.max_reconnect_backoff_ms": int(largest * 1000),
            # A connection of this channel's own: by default gRPC shares one TCP connection among every channel of
            # the process with the same target and arguments, so several clients would all reach one worker of a
            # `--workers N` server (which balances connections).
            "grpc.use_local_subchannel_pool": 1,
        }
        policy = self.load_balancing or ("round_robin" if _has_several_backends(self.url) else None)
        if policy is not None:
            options["grpc.service_config"] = json.dumps({"loadBalancingConfig": [{policy: {}}]})
        if self.keepalive is not None:
            options.update(self.keepalive.channel_options())
        if self.tls_server_name:
            options["grpc.ssl_target_name_override"] = self.tls_server_name
        options.update(dict(self.channel_options))
        return list(options.items())

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials (mutual TLS when a key and chain are given), or None for a plaintext channel."""
        if not self.uses_tls:
            return None
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("mutual TLS needs both private_key and certificate_chain")
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.root_certificates),
            private_key=read_pem(self.private_key),
            certificate_chain=read_pem(self.certificate_chain),
        )

    def compression(self) -> grpc.Compression | None:
        """gzip for every call when enabled: worth it for large tensors on slow links, a CPU cost otherwise."""
        return grpc.Compression.Gzip if self.gzip else None


def read_pem(source: PemSource | None) -> bytes | None:
    """PEM bytes from bytes, a PEM string or a file path."""
    if source is None or isinstance(source, bytes):
        return source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        return source.encode()
    return Path(source).read_bytes()


def channel_target(url: str) -> str:
    """The grpc target for a user's url.

    `host:port` and gRPC targets (`dns:///name:port`, `ipv4:...`, `unix:...`) pass through; a `grpc://` prefix is
    dropped; a comma-separated list of `host:port` becomes one `ipv4:`/`ipv6:` target that round-robin spreads over.
    """
    url = url.strip()
    url = url.removeprefix("grpc://")
    if url.startswith(_PASS_THROUGH_SCHEMES) or "," not in url:
        return url
    addresses = [_resolve(item.strip()) for item in url.split(",") if item.strip()]
    families = {family for family, _ in addresses}
    if len(families) != 1:
        raise ValueError(f"cannot mix IPv4 and IPv6 addresses in one target: {url!r}")
    family = families.pop()
    return f"{family}:" + ",".join(address for _, address in addresses)


def _has_several_backends(url: str) -> bool:
    url = url.strip().removeprefix("grpc://")
    return "," in url or url.startswith("dns:")


def _resolve(address: str) -> tuple[str, str]:
    """("ipv4" | "ipv6", "ip:port" or "[ip]:port") for one list entry, resolving a host name once."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port in the address list, got {address!r}")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise ValueError(f"cannot resolve {host!r} in the address list: {error.strerror}") from None
        ip = ipaddress.ip_address(infos[0][4][0])
    if ip.version == 4:
        return "ipv4", f"{ip}:{port}"
    return "ipv6", f"[{ip}]:{port}"


def call_metadata(token: str | None, headers: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: `authorization: Bearer <token>` plus any extra headers (lower-cased keys)."""
    metadata = [(key.lower(), value) for key, value in (headers or {}).items()]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    return tuple(metadata)
