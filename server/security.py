"""Who may talk to the gRPC port: TLS (optionally mutual) credentials, bearer-token scopes, and the call gate.

TLS: `--tls-cert` and `--tls-key` serve TLS; `--tls-client-ca` also requires every client to present a
certificate signed by that CA (mutual TLS). The files are checked at start with Python's `ssl` module, so a key
that does not match its certificate stops the server with that sentence instead of failing every handshake later.

Tokens: a token file (or `NNSERVE_AUTH_TOKENS`) holds one token per line with the scopes it grants:

    # token                                                           scopes              name (optional, for logs)
    3b7c9f2e61d04a8f9d2c7e5b1a0f4c3d8e9f6a7b5c4d3e2f1a0b9c8d7e6f5a4b  infer,metadata      app
    9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0  *                   ops

Scopes: `infer` (ModelInfer, ModelStreamInfer, and the read-only facts a client needs to run inference: ServerLive,
ServerReady, ModelReady, ModelMetadata, ModelConfig), `metadata` (those facts plus server metadata, statistics,
repository index, and server reflection), `repository` (load and unload), `*` for all three.
`grpc.health.v1.Health` is never authenticated: kubelet gRPC probes cannot send metadata. Clients send
`authorization: Bearer <token>`. Tokens are compared as SHA-256 digests with `hmac.compare_digest` against every
configured token (no early exit), and never logged: logs name a token by its name or its line number.

The gate (`TokenGate`, a grpc.aio server interceptor) checks scopes on every call when tokens are configured.
Requests that do not parse are refused by `nnserve.server.decode_guard`, which wraps the handlers once when the
services register.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server.decode_guard import Handler

log = logging.getLogger(__name__)

INFER = "infer"
METADATA = "metadata"
REPOSITORY = "repository"
SCOPES: tuple[str, ...] = (INFER, METADATA, REPOSITORY)
ALL_SCOPES_WORD = "*"
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096
TOKENS_ENV = "NNSERVE_AUTH_TOKENS"

_INFERENCE_SERVICE: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Scope each RPC of the v2 service needs; a test checks that every method of the service is listed.
INFERENCE_METHOD_SCOPES: dict[str, str] = {
    "ModelInfer": INFER,
    "ModelStreamInfer": INFER,
    "ServerLive": METADATA,
    "ServerReady": METADATA,
    "ModelReady": METADATA,
    "ServerMetadata": METADATA,
    "ModelMetadata": METADATA,
    "ModelConfig": METADATA,
    "ModelStatistics": METADATA,
    "RepositoryIndex": METADATA,
    "RepositoryModelLoad": REPOSITORY,
    "RepositoryModelUnload": REPOSITORY,
}
INFER_ALSO_GRANTS: frozenset[str] = frozenset(
    {"ServerLive", "ServerReady", "ModelReady", "ModelMetadata", "ModelConfig"}
)
"""`metadata` RPCs that an `infer` token may call too: what a client needs to run inference on a model (its readiness,
input names and datatypes, max_batch_size), so that an application holding only `infer` can use the SDK and CLI.
Statistics, the repository index, server metadata and reflection stay `metadata` only."""
OPEN_SERVICES: tuple[str, ...] = ("grpc.health.v1.Health",)
"""Services reachable without a token: the probes' health service only."""
REFLECTION_SERVICES: tuple[str, ...] = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
"""Reflection describes the services (grpcurl needs it): `metadata` scope, like the other descriptive RPCs."""

_METHOD_SCOPES: dict[str, frozenset[str]] = {
    f"/{_INFERENCE_SERVICE}/{method}": frozenset({scope, INFER} if method in INFER_ALSO_GRANTS else {scope})
    for method, scope in INFERENCE_METHOD_SCOPES.items()
}
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token: what may follow "Bearer "
_BEARER_RE = re.compile(r"bearer +(\S+) *", re.IGNORECASE)


class SecurityConfigError(ValueError):
    """TLS files or token definitions are unusable; the message names the file (or variable) and the line."""


# ---------------------------------------------------------------------------------------------------------------
# TLS


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """gRPC server credentials; mutual TLS (client certificates required) when `client_ca` is given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert_pem, key_pem = _read(cert, "--tls-cert"), _read(key, "--tls-key")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise SecurityConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its matching private key "
            f"({exc.reason or exc})"
        ) from None
    ca_pem = None
    if client_ca is not None:
        ca_pem = _read(client_ca, "--tls-client-ca")
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except ssl.SSLError as exc:
            raise SecurityConfigError(
                f"--tls-client-ca {client_ca}: not a PEM CA certificate ({exc.reason or exc})"
            ) from None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{flag} {path}: cannot be read: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True, slots=True)
class _Token:
    digest: bytes
    scopes: frozenset[str]
    name: str


class TokenTable:
    """The configured tokens, kept only as SHA-256 digests; `repr` never shows them."""

    def __init__(self, tokens: tuple[_Token, ...]) -> None:
        self._tokens = tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return f"TokenTable({len(self._tokens)} tokens)"

    @classmethod
    def parse(cls, text: str, source: str) -> TokenTable:
        """Parse `token scopes [name]` lines (`#` starts a comment); in NNSERVE_AUTH_TOKENS `;` also ends an entry."""
        tokens: list[_Token] = []
        seen: set[bytes] = set()
        inline = source == TOKENS_ENV
        for number, raw in enumerate(re.split(r"[\n;]" if inline else r"\n", text), start=1):
            line = raw.split("#", 1)[0].strip()  # '#' cannot occur in a token
            if not line:
                continue
            where = f"{source}, {'entry' if inline else 'line'} {number}"
            fields = line.split()
            if len(fields) not in (2, 3):
                raise SecurityConfigError(
                    f"{where}: expected 'TOKEN SCOPES [NAME]' (scopes: {', '.join(SCOPES)} or '*', comma-separated), "
                    f"found {len(fields)} fields"
                )
            token, scope_text = fields[0], fields[1]
            name = fields[2] if len(fields) == 3 else f"{'entry' if inline else 'line'} {number}"
            if not _TOKEN_RE.fullmatch(token) or not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
                raise SecurityConfigError(
                    f"{where}: the token must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters of "
                    "A-Z a-z 0-9 - . _ ~ + / (then optional '='), e.g. the output of `openssl rand -hex 32`"
                )
            scopes = _parse_scopes(scope_text, where)
            digest = _digest(token)
            if digest in seen:
                raise SecurityConfigError(f"{where}: the same token is defined twice")
            seen.add(digest)
            tokens.append(_Token(digest, scopes, name))
        if not tokens:
            raise SecurityConfigError(f"{source}: defines no tokens; authentication would let no one in")
        return cls(tuple(tokens))

    @classmethod
    def load(cls, path: Path | None, inline: str | None) -> TokenTable | None:
        """The table from `--auth-token-file` or `NNSERVE_AUTH_TOKENS`; None when neither is set (no auth)."""
        if path is not None and inline is not None:
            raise SecurityConfigError(f"set --auth-token-file or {TOKENS_ENV}, not both")
        if path is not None:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise SecurityConfigError(f"--auth-token-file {path}: cannot be read: {reason}") from None
            return cls.parse(text, str(path))
        if inline is not None:
            return cls.parse(inline, TOKENS_ENV)
        return None

    def match(self, token: str) -> _Token | None:
        """The entry for a presented token, comparing digests in constant time with every entry."""
        presented = _digest(token)
        found: _Token | None = None
        for entry in self._tokens:
            if hmac.compare_digest(presented, entry.digest):
                found = entry
        return found


def _parse_scopes(text: str, where: str) -> frozenset[str]:
    scopes = {s.strip() for s in text.split(",") if s.strip()}
    if ALL_SCOPES_WORD in scopes:
        return frozenset(SCOPES)
    unknown = sorted(scopes - set(SCOPES))
    if unknown or not scopes:
        raise SecurityConfigError(
            f"{where}: unknown scope {unknown[0] if unknown else '(none)'!r}; expected a comma-separated list of "
            f"{', '.join(SCOPES)}, or '*' for all"
        )
    return frozenset(scopes)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def required_scope(method: str) -> str | None:
    """The scope a full method name (`/package.Service/Method`) is listed under; None for open services."""
    service = method[1:].rpartition("/")[0]
    if service in OPEN_SERVICES:
        return None
    short = method.rpartition("/")[2]
    if method in _METHOD_SCOPES:
        return INFERENCE_METHOD_SCOPES[short]
    if service in REFLECTION_SERVICES:
        return METADATA
    return REPOSITORY  # anything unlisted is treated as the most privileged: fail closed


def accepted_scopes(method: str) -> frozenset[str] | None:
    """Every scope that lets a token call `method` (its own, and `infer` for INFER_ALSO_GRANTS); None: open."""
    listed = _METHOD_SCOPES.get(method)
    if listed is not None:
        return listed
    scope = required_scope(method)
    return None if scope is None else frozenset({scope})


# ---------------------------------------------------------------------------------------------------------------
# Log hygiene.

_GRPC_LOGGER = "grpc._cython.cygrpc"
_CLIENT_GONE = "ExecuteBatchError raised in core by servicer method"


class _ClientGoneFilter(logging.Filter):
    """Turns grpc's ERROR-with-traceback for an answer that could not be sent into one DEBUG line.

    grpc.aio logs it when a client's deadline passes (or it cancels) just as the server answers, before grpc has
    noticed the client is gone: nothing failed on the server, and a client sending requests with tiny deadlines
    could otherwise fill the log with tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != _GRPC_LOGGER or not record.getMessage().startswith(_CLIENT_GONE):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = f"{record.getMessage()} (the client had gone; nothing to answer)", None
        record.exc_info = record.exc_text = None
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def install_log_filters() -> None:
    """Install the filter above once per process (idempotent: servers in tests share a process)."""
    logger = logging.getLogger(_GRPC_LOGGER)
    if not any(isinstance(f, _ClientGoneFilter) for f in logger.filters):
        logger.addFilter(_ClientGoneFilter())


# ---------------------------------------------------------------------------------------------------------------
# Authorization, the same for every protocol: which RPC (a gRPC method name; HTTP routes name theirs) a token may call.


@dataclass(frozen=True)
class Denial:
    """Why a call is refused: `unauthenticated` (no or a wrong token: gRPC UNAUTHENTICATED, HTTP 401), else the
    token lacks the scope (PERMISSION_DENIED, 403)."""

    unauthenticated: bool
    message: str


def authorize(tokens: TokenTable, method: str, values: Sequence[str | bytes], carrier: str) -> Denial | None:
    """None when `method` may be called with these `authorization` values (of the metadata or the header, as
    `carrier` says for the messages), else why not."""
    scopes = accepted_scopes(method)
    if scopes is None:
        return None
    rpc = method.rpartition("/")[2] or method
    if not values:
        log.debug("refused %s: no authorization %s", method, carrier)
        return Denial(True, f"{rpc} needs a token: this server requires the {carrier} 'authorization: Bearer <token>'")
    if len(values) > 1:
        return Denial(True, f"send exactly one 'authorization' {carrier} entry")
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else str(values[0])
    bearer = _BEARER_RE.fullmatch(value)
    if bearer is None:
        log.debug("refused %s: authorization %s is not a bearer token", method, carrier)
        return Denial(True, f"the 'authorization' {carrier} must be 'Bearer <token>'")
    entry = tokens.match(bearer.group(1))
    if entry is None:
        log.debug("refused %s: unknown bearer token", method)
        return Denial(True, "the bearer token is not valid on this server")
    if not scopes & entry.scopes:
        scope = required_scope(method)
        log.debug("refused %s: token %s lacks scope %s", method, entry.name, scope)
        return Denial(False, f"the token does not grant the '{scope}' scope that {rpc} needs "
                             f"(it grants: {', '.join(sorted(entry.scopes))})")
    return None


# ---------------------------------------------------------------------------------------------------------------
# The gate: bearer-token scopes on every call (installed only when tokens are configured).


class TokenGate(grpc.aio.ServerInterceptor):
    """Checks the bearer token's scope on every call; installed only when tokens are configured, because a grpc.aio
    interceptor costs every call a coroutine and a handler lookup in Python (about 10 us, 3 % of a tiny model's
    request)."""

    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens
        self._denials: dict[tuple[str, grpc.StatusCode, str], Handler] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        denial = self._authorize(method, handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        if denial is not None:
            return self._denial_handler(method, handler, *denial)
        return handler

    def _authorize(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message to refuse it with."""
        values = [value for key, value in (metadata or ()) if key == "authorization"]
        denial = authorize(self._tokens, method, values, "metadata")
        if denial is None:
            return None
        return (grpc.StatusCode.UNAUTHENTICATED if denial.unauthenticated else grpc.StatusCode.PERMISSION_DENIED,
                denial.message)

    def _denial_handler(self, method: str, handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
        key = (method, code, message)
        denial = self._denials.get(key)
        if denial is None:
            denial = self._denials[key] = _aborting_handler(handler, code, message)
        return denial


def _aborting_handler(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of the same streaming kind that refuses the call without reading (or parsing) the request."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)
