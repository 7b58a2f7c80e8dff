"""Assembling and running the server: `create_server` builds and binds, `serve` runs until SIGTERM/SIGINT.

Start-up opens the gRPC port first (liveness and startup probes answer while models load),
then loads the repository, then turns health SERVING. Shutdown: health NOT_SERVING, new
inference requests refused with UNAVAILABLE, accepted ones finished, all within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from nnserve import __version__
from nnserve._process import STOP_SIGNALS
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server.dataplane import DataPlane
from nnserve.server.decode_guard import GuardedRegistrar
from nnserve.server.errors import DeviceUnavailableError, InvalidInputError
from nnserve.server.frontends.grpc_payload import PayloadCodecs
from nnserve.server.frontends.grpc_servicer import InferenceServicer
from nnserve.server.frontends.grpc_threads import ThreadedServer
from nnserve.server.frontends.rest import RestFrontend
from nnserve.server.frontends.rest_http import HttpServer, listening_socket, server_ssl_context
from nnserve.server.health import SERVICE_NAME as HEALTH_SERVICE
from nnserve.server.health import HealthReporter
from nnserve.server.inflight_budget import FLOOR_BYTES, default_limit, format_bytes, transport_limits
from nnserve.server.memory_limit import MemoryLimit, container_memory, resident_bytes
from nnserve.server.metrics import MetricsServer, MultiprocessWriter, ServingState, multiprocess_dir
from nnserve.server.port_report import log_ports, port_report, remove_port_file, write_port_file
from nnserve.server.providers import cuda_unavailable_reason
from nnserve.server.repository import ModelEntry, ModelRepository, ModelState
from nnserve.server.repository_layout import LayoutError
from nnserve.server.security import (
    SecurityConfigError,
    TokenGate,
    TokenTable,
    install_log_filters,
    server_credentials,
)
from nnserve.server.settings import ServerSettings
from nnserve.server.tracing_config import TracingConfigError, load_tracing

if TYPE_CHECKING:
    from nnserve.server.tracing import Tracing

log = logging.getLogger(__name__)

INFERENCE_SERVICE: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class StartupError(RuntimeError):
    """The server cannot start (repository missing, port taken, device unusable); the message says which."""


class InferenceServer:
    """A bound but not yet started server: gRPC services, repository, health and metrics."""

    def __init__(
        self,
        settings: ServerSettings,
        grpc_server: grpc.aio.Server | ThreadedServer,
        port: int,
        repository: ModelRepository,
        dataplane: DataPlane,
        health: HealthReporter,
        http: HttpServer | None = None,
        plan: MemoryPlan | None = None,
    ) -> None:
        self.settings = settings
        self.port = port
        self.repository = repository
        self.dataplane = dataplane
        self.health = health
        self.metrics: MetricsServer | None = None
        self.metrics_writer: MultiprocessWriter | None = None
        tracing = dataplane.tracing
        self.metrics_state = ServingState(repository, dataplane.unrouted, lambda: dataplane.inflight,
                                          dataplane.budget, None if tracing is None else tracing.counts.snapshot)
        self.plan = plan or memory_plan(settings)
        """The memory this process may use and the transport limits in force (derived where the settings say None)."""
        self._grpc = grpc_server
        self._http = http
        self.http_port: int | None = http.port if http is not None else None
        """The HTTP/REST port (the real one when 0 was asked for), None when HTTP is off."""
        self._stopping: asyncio.Task[None] | None = None
        self._port_file_written = False

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    async def start(self) -> None:
        """Listen, load every model, then report ready."""
        await self._grpc.start()
        address = f"{self.settings.host}:{self.port}"
        log.info("nnserve %s listening on %s (gRPC: KServe v2 inference, health, reflection)", __version__, address)
        if self._http is not None:
            await self._http.start()
            log.info("HTTP/REST (KServe v2 REST, Triton's HTTP extensions) on %s://%s:%d",
                     "http" if self.settings.tls_cert is None else "https",
                     self.settings.http_host or self.settings.host, self.http_port)
        if self.settings.metrics_port is not None:
            metrics_host = self.settings.metrics_host or self.settings.host
            self.metrics = MetricsServer(self.metrics_state)
            try:
                port = self.metrics.start(metrics_host, self.settings.metrics_port)
            except OSError as exc:
                self.metrics = None
                raise StartupError(
                    f"cannot serve metrics on {metrics_host}:{self.settings.metrics_port}: {exc}"
                ) from None
            log.info("metrics on http://%s:%d/metrics", metrics_host, port)
        self._report_ports()
        started = time.monotonic()
        await self.repository.load_all()
        entries = self.repository.entries()
        ready = [e for e in entries if e.state is ModelState.READY]
        log.info("loaded %d of %d models in %.1f s", len(ready), len(entries), time.monotonic() - started)
        self._size_budget()
        for entry in entries:
            if entry.state is not ModelState.READY:
                log.warning("model '%s' is UNAVAILABLE: %s", entry.name, entry.why_not_ready())
        if multiprocess_dir() is not None:  # one of several workers: the supervisor serves the merged metrics
            self.metrics_writer = MultiprocessWriter(self.metrics_state)
            self.metrics_writer.start()
        await self._update_server_health()
        if self.dataplane.is_ready():
            log.info("ready: serving on %s", address)
        else:
            log.warning("not ready (strict readiness: every model must be ready); serving the ready models anyway")

    def _size_budget(self) -> None:
        """Set the derived in-flight budget now that the models' resident size is known, and log the memory bounds."""
        settings, budget, memory = self.settings, self.dataplane.budget, self.plan.memory
        if settings.max_inflight_bytes is None:
            resident = resident_bytes()
            budget.limit = default_limit(memory.bytes, resident)
            how = (f"half of the {format_bytes(memory.bytes)} this process may use ({memory.source}) after "
                   f"{format_bytes(resident)} resident with the models loaded, at least {format_bytes(FLOOR_BYTES)}")
        else:
            how = "--max-inflight-bytes"
        streams, message = self.plan.max_concurrent_streams, self.plan.max_message_bytes
        derived = [flag for flag, value in (("--max-message-bytes", settings.max_message_bytes),
                                            ("--max-concurrent-streams", settings.max_concurrent_streams))
                   if value is None]
        log.info("in-flight budget: %s of accepted, unanswered requests (%s); gRPC transport: %s messages x %d "
                 "streams = %s per connection received before any handler runs%s", format_bytes(budget.limit), how,
                 format_bytes(message), streams, format_bytes(message * streams),
                 f" ({' and '.join(derived)} derived: a quarter of the memory per connection)" if derived else "")

    def _report_ports(self) -> None:
        """Every listener is bound: say where (log line, `--port-file`), before the models load.

        A worker of `--workers N` says nothing: its supervisor reports the shared port and the merged metrics.
        """
        if self.settings.reuse_port:
            return
        log_ports(self.port, self.http_port, self.metrics_port)
        if self.settings.port_file is not None:
            report = port_report(pid=os.getpid(), host=self.settings.host, grpc=self.port, http=self.http_port,
                                 metrics=self.metrics_port)
            try:
                write_port_file(self.settings.port_file, report)
            except OSError as exc:
                raise StartupError(f"cannot write --port-file {self.settings.port_file}: {exc}") from None
            self._port_file_written = True

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; idempotent, and concurrent calls wait for the same shutdown."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown(self.settings.grace_period_s if grace is None
                                                                  else grace))
        await asyncio.shield(self._stopping)

    async def wait_for_termination(self) -> None:
        await self._grpc.wait_for_termination()

    async def _shutdown(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        await self.health.shutdown()
        self.dataplane.begin_drain()
        inflight = self.dataplane.inflight
        log.info("shutting down: draining %d accepted requests (grace period %.1f s)", inflight, grace)
        # Nothing to wait for is not a timeout: wait_for(..., 0) (a failed start stops with grace 0) times out
        # before it ever looks, even when no request is running.
        idle = self.dataplane.inflight == 0 or await self.dataplane.wait_idle(grace)
        if not idle and self.dataplane.inflight:
            log.warning("%d requests were still running when the grace period ended", self.dataplane.inflight)
        await self._grpc.stop(max(0.0, min(1.0, deadline - time.monotonic())))
        if self._http is not None:
            await self._http.stop()
        await self.repository.close(timeout=max(0.0, deadline - time.monotonic()))
        if self.dataplane.tracing is not None:  # the last spans, within what is left of the grace period
            await asyncio.to_thread(self.dataplane.tracing.shutdown, max(0.0, deadline - time.monotonic()))
        if self.metrics_writer is not None:
            await self.metrics_writer.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self._port_file_written and self.settings.port_file is not None:
            remove_port_file(self.settings.port_file, os.getpid())
        log.info("stopped; %d inference requests were accepted since the start", self.dataplane.accepted_total)

    async def _update_server_health(self, _entry: ModelEntry | None = None) -> None:
        if self._stopping is None:
            await self.health.set_server(self.dataplane.is_ready())


async def create_server(settings: ServerSettings, *, tracing: Tracing | None = None) -> tuple[InferenceServer, int]:
    """Build every part and bind the gRPC port (0 picks a free one); nothing is served until `start()`.

    `tracing` (`tracing_config.load_tracing`: what `serve` reads from the OTEL_* variables) traces the requests
    and batches; None leaves tracing off. The server shuts it down with itself."""
    root = settings.model_repository
    if not root.is_dir():
        raise StartupError(f"model repository {root} does not exist or is not a directory")
    if settings.device == "cuda":
        reason = cuda_unavailable_reason(settings.device_id)
        if reason is not None:
            raise DeviceUnavailableError(f"--device cuda was requested but CUDA cannot be used: {reason}")
    try:
        tokens = TokenTable.load(settings.auth_token_file, settings.auth_tokens)
        credentials = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except SecurityConfigError as exc:
        raise StartupError(str(exc)) from None
    install_log_filters()
    try:
        repository = ModelRepository(settings)
    except (LayoutError, InvalidInputError) as exc:  # a single-model layout without a (valid) --model-name
        raise StartupError(f"--model-repository {settings.model_repository}: {exc}") from None
    log.info("model repository: %s", repository.layout.describe())
    dataplane = DataPlane(repository, settings)
    dataplane.tracing = tracing
    if tracing is not None:
        log.info("tracing: on, %s (OpenTelemetry; the OTEL_* variables)", tracing.config.describe())
    plan = memory_plan(settings)
    if settings.max_inflight_bytes is None:  # until the models are loaded and measured (InferenceServer.start)
        dataplane.budget.limit = default_limit(plan.memory.bytes, resident_bytes())
    message, streams = plan.max_message_bytes, plan.max_concurrent_streams
    servicer = InferenceServicer(dataplane)
    health = HealthReporter()
    grpc_server = _grpc_server_factory(settings)(
        # Token scopes, on every call; no interceptor at all without tokens (each costs every call).
        interceptors=[] if tokens is None else [TokenGate(tokens)],
        options=[
            ("grpc.max_receive_message_length", message),
            ("grpc.max_send_message_length", message),
            ("grpc.max_concurrent_streams", streams),
            # gRPC's "overload protection" counts streams not yet freed after they finished against the limit and
            # resets new ones (REFUSED_STREAM, UNAVAILABLE to the client) in that window: with calls answered as fast
            # as refusals are, a client with more calls than the limit saw about half of them reset. Off, clients queue
            # the excess, as HTTP/2 means them to.
            ("grpc.http.overload_protection", 0),
            # Fail loudly if another process holds the port instead of silently sharing it; only the workers of
            # `--workers N` share it, by design (nnserve.server.workers).
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ]
    )
    registrar = GuardedRegistrar(grpc_server)  # INVALID_ARGUMENT for request bytes that do not parse
    # ModelInfer's messages parsed and written without copies of their tensors (grpc_payload), then guarded.
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, PayloadCodecs(registrar, INFERENCE_SERVICE))
    health.add_to_server(registrar)
    # The asyncio servicer named directly: enable_server_reflection picks it only for a grpc.aio.Server instance.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer((INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)), registrar
    )
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(settings.grpc_address)
        else:
            port = grpc_server.add_secure_port(settings.grpc_address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {settings.grpc_address}: {exc} (is the port in use?)") from None
    log.info(
        "gRPC transport: %s; token authentication: %s; calls served by %s",
        "plaintext" if credentials is None
        else "TLS, client certificates required" if settings.tls_client_ca is not None else "TLS",
        "off" if tokens is None else f"on ({len(tokens)} tokens; grpc.health.v1 open to probes)",
        "grpc.aio on the event loop" if settings.grpc_transport == "aio"
        else f"grpc's thread pool ({settings.grpc_threads} threads; --grpc-transport threads)",
    )
    http = _http_frontend(settings, dataplane, tokens, message) if settings.http_port is not None else None
    app = InferenceServer(settings, grpc_server, port, repository, dataplane, health, http, plan)
    await health.set_server(False)
    await health.set_alive()
    repository.add_listener(health.on_model_change)
    repository.add_listener(app._update_server_health)
    return app, port


@dataclass(frozen=True)
class MemoryPlan:
    """The memory this process may use, and the transport limits that follow from it where not set explicitly."""

    memory: MemoryLimit
    max_message_bytes: int
    max_concurrent_streams: int


def _grpc_server_factory(settings: ServerSettings) -> Callable[..., grpc.aio.Server | ThreadedServer]:
    """`grpc.aio.server`, or the threaded transport's server with the same arguments (`--grpc-transport`)."""
    if settings.grpc_transport == "threads":
        return functools.partial(ThreadedServer, threads=settings.grpc_threads)
    return grpc.aio.server


def memory_plan(settings: ServerSettings) -> MemoryPlan:
    """What this process may use (the supervisor's share for a worker, else the cgroup limit, else the host's), and
    the message and stream limits derived from it (`inflight_budget.transport_limits`) where the settings say None."""
    if settings.memory_limit_bytes is not None:
        memory = MemoryLimit(settings.memory_limit_bytes, "this worker's share of the container")
    else:
        memory = container_memory(settings.cgroup_root)
    message, streams = transport_limits(memory.bytes, settings.max_message_bytes, settings.max_concurrent_streams)
    return MemoryPlan(memory, message, streams)


def _http_frontend(
    settings: ServerSettings, dataplane: DataPlane, tokens: TokenTable | None, max_body_bytes: int
) -> HttpServer:
    """The REST frontend on its bound socket (bound here, like gRPC's port, so a taken port stops the start)."""
    host = settings.http_host or settings.host
    assert settings.http_port is not None
    try:
        sock = listening_socket(host, settings.http_port, reuse_port=settings.reuse_port)
    except OSError as exc:
        raise StartupError(f"cannot listen on {settings.http_address} (HTTP): {exc.strerror or exc} "
                           "(is the port in use? --http-port off disables HTTP)") from None
    context = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        client_ca = str(settings.tls_client_ca) if settings.tls_client_ca is not None else None
        context = server_ssl_context(str(settings.tls_cert), str(settings.tls_key), client_ca)
    frontend = RestFrontend(dataplane, tokens=tokens, max_body_bytes=max_body_bytes)
    return HttpServer(frontend, sock, context)


async def serve(settings: ServerSettings) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; the process exit status."""
    sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
    try:
        tracing = load_tracing(os.environ)
    except TracingConfigError as exc:
        raise StartupError(str(exc)) from None
    try:
        app, _port = await create_server(settings, tracing=tracing)
    except BaseException:
        if tracing is not None:
            tracing.shutdown(0.0)
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    # A worker of --workers starts with them blocked (workers.py); one that came while it started is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    starting = asyncio.ensure_future(app.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        stopping.cancel()
        await app.stop(grace=0)
        raise starting.exception()  # type: ignore[misc]
    await stopping
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
    await app.stop()
    return 0


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("received %s again; still draining (the grace period bounds the wait)", sig.name)
        return
    log.info("received %s", sig.name)
    stop.set()
