"""`nnserve serve --workers N`: a supervisor and N server processes sharing one gRPC port (SO_REUSEPORT).

Why processes: one grpc.aio server is one Python thread for everything but the model's own compute (protobuf,
asyncio, the servicer), so a small network saturates one core at a few thousand requests per second whatever the
machine. N workers, each the complete server (every model loaded, its own batcher and health service), bind the same
port with SO_REUSEPORT and the kernel spreads *connections* among them. What that implies:

* Balance is per connection, not per request: one client with one channel talks to one worker. Load generators and
  services with several channels (or several clients) spread; a single channel does not.
* Batching is per worker: each batches its own share of the requests, so a large model batches less than with one
  process. Use workers for small, request-rate-bound networks; use one process (and more intra-op threads) for large
  ones, where one process already keeps every core busy in onnxruntime.
* onnxruntime's intra-op threads are divided: each worker gets `available CPUs // N` unless set explicitly, so the
  workers together use what the container's CPU quota allows (`cpu_quota`).
* Memory: every worker holds every model, and gets 1/N of the container's memory to size its in-flight byte budget
  and stream limit from (`--max-inflight-bytes`, given explicitly, is per worker too).

Lifecycle. The supervisor reserves the port (a bound, non-listening SO_REUSEPORT socket: port 0 picks one, and a
port held by an ordinary listener fails at once), starts the workers (multiprocessing "spawn": fresh interpreters,
no forked gRPC or onnxruntime state), and waits. SIGTERM or SIGINT is forwarded to every worker, each drains as a
single server does (health NOT_SERVING, finish accepted work within the grace period), and the supervisor exits when
all have, killing any that outlive the grace period by 10 s. Workers start with SIGTERM and SIGINT blocked and
unblock them once their server's handlers are installed, so a stop that reaches a worker still starting (a pod
terminated during start-up) is drained by it like any other, never its default action killing it.

A worker that exits on its own (crash, OOM kill, failed start) is not restarted: the supervisor logs its exit status,
stops the others the same graceful way and exits with status 1, so that the orchestrator (Kubernetes, systemd)
restarts the whole server where everyone sees it, instead of a silently smaller or flapping one. Workers get
SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG), so no orphan keeps the port.

Health and readiness are per worker: a probe's connection reaches one of them. They load the same repository and
start together; a worker that cannot serve brings the supervisor (and its probes) down as above.

Metrics: workers run with `PROMETHEUS_MULTIPROC_DIR` set to a fresh directory and their own metrics port off; the
supervisor serves the merged metrics on the metrics port (`nnserve.server.metrics.AggregatedMetricsServer`).

Ports: the supervisor binds both (the reserved gRPC port, the merged metrics) before it starts the workers, then
logs them and writes `--port-file` (its own pid), so the file never waits for the workers' interpreters and models;
the workers start listening on the reserved port moments later (wait on the health service from then on).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from typing import Protocol

from nnserve._process import STOP_SIGNALS, end_process
from nnserve.server import cpu_quota
from nnserve.server.memory_limit import container_memory
from nnserve.server.port_report import log_ports, port_report, remove_port_file, write_port_file
from nnserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
KILL_AFTER_GRACE_S = 10.0
"""How long past the grace period the supervisor waits for a draining worker before killing it."""
_PR_SET_PDEATHSIG = 1


class SupervisorError(RuntimeError):
    """The workers cannot be started (port in use, bad address); the message says why."""


def supervise(settings: ServerSettings) -> int:
    """Run `settings.workers` servers on one port until SIGTERM/SIGINT or a worker's exit; the exit status."""
    count = settings.workers
    reservation = reserve_port(settings.host, settings.grpc_port)
    port = int(reservation.getsockname()[1])
    http_reservation = None
    http_port = None
    if settings.http_port is not None:  # the workers share the HTTP port too
        try:
            http_reservation = reserve_port(settings.http_host or settings.host, settings.http_port)
        except SupervisorError:
            reservation.close()
            raise
        http_port = int(http_reservation.getsockname()[1])
    threads = settings.intra_op_threads or cpu_quota.intra_op_threads(count)
    # Each worker sizes its in-flight budget and stream limit from its share of the container's memory.
    memory = settings.memory_limit_bytes or container_memory(settings.cgroup_root).bytes
    metrics_dir = tempfile.mkdtemp(prefix="nnserve-metrics-")
    worker_settings = dataclasses.replace(
        settings, workers=1, reuse_port=True, grpc_port=port, http_port=http_port, metrics_port=None,
        intra_op_threads=threads, port_file=None, memory_limit_bytes=max(1 << 20, memory // count),
    )
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    stop_requested: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop_requested.append(signum))
                for sig in STOP_SIGNALS}
    previous_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    workers: list[BaseProcess] = []
    metrics_server: _Stoppable | None = None
    port_file_written = False
    try:
        metrics_server, metrics_port = _serve_metrics(settings, metrics_dir)
        log_ports(port, http_port, metrics_port)
        if settings.port_file is not None:
            report = port_report(pid=os.getpid(), host=settings.host, grpc=port, http=http_port, metrics=metrics_port)
            try:
                write_port_file(settings.port_file, report)
            except OSError as exc:
                raise SupervisorError(f"cannot write --port-file {settings.port_file}: {exc}") from None
            port_file_written = True
        os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the spawned workers
        context = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        # Workers start with SIGTERM and SIGINT blocked (a signal mask survives fork and exec) and unblock them once
        # their server's handlers are in place (app.serve): a stop forwarded while a worker is still starting is
        # then drained by it, not its default action killing it. Here they are only held until the workers exist.
        # multiprocessing's resource tracker is started first: starting it unblocks both signals in this thread.
        resource_tracker.ensure_running()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for index in range(count):
                worker = context.Process(
                    target=_worker_main, args=(worker_settings, index, level, os.getpid()),
                    name=f"nnserve-worker-{index}",
                )
                worker.start()
                workers.append(worker)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        log.info(
            "supervisor (pid %d): %d workers on %s:%d (pids %s), %d onnxruntime intra-op threads each",
            os.getpid(), count, settings.host, port, ", ".join(str(w.pid) for w in workers), threads,
        )
        clean = _wait(workers, wake_r, stop_requested, settings.grace_period_s)
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for started in workers:
            if started.is_alive():
                started.kill()
            started.join(timeout=5)
        wake_r.close()
        wake_w.close()
        reservation.close()
        if http_reservation is not None:
            http_reservation.close()
        if metrics_server is not None:
            metrics_server.stop()
        if port_file_written and settings.port_file is not None:
            remove_port_file(settings.port_file, os.getpid())
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        _stop_resource_tracker()
    # The last line, once nothing is left to wait for (the process ends right after it: nnserve._process).
    log.info("all %d workers stopped%s", count, "" if clean else " (not cleanly: exit status 1)")
    return 0 if clean else 1


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on host:port that holds the port for the workers.

    Fails (SupervisorError) when the port is taken by a listener, whether or not it allows sharing: a second
    `nnserve --workers` on the same port would otherwise silently split the traffic with the first.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SupervisorError(f"cannot resolve --host {host!r}: {exc}") from None
    family, kind, proto, _name, address = infos[0]
    if port and _accepts_connections(family, address):
        raise SupervisorError(f"cannot listen on {host}:{port}: another process is listening there")
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SupervisorError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (is the port in use?)") from None
    return sock


def _accepts_connections(family: int, address: tuple[object, ...]) -> bool:
    """Whether something already listens on the address (a wildcard address is probed on loopback)."""
    host = address[0]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            return probe.connect_ex((host, *address[1:])) == 0
    except OSError:
        return False


class _Stoppable(Protocol):
    def stop(self) -> None: ...


def _serve_metrics(settings: ServerSettings, directory: str) -> tuple[_Stoppable | None, int | None]:
    """The workers' merged metrics on the metrics port: the endpoint (to stop at exit) and the port it bound."""
    if settings.metrics_port is None:
        return None, None
    from nnserve.server.metrics import AggregatedMetricsServer

    host = settings.metrics_host or settings.host
    server = AggregatedMetricsServer(directory)
    try:
        port = server.start(host, settings.metrics_port)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s; the workers serve on without /metrics",
                  host, settings.metrics_port, exc)
        return None, None
    log.info("aggregated metrics of the workers on http://%s:%d/metrics", host, port)
    return server, port


def _stop_resource_tracker() -> None:
    """Reap multiprocessing's resource tracker (spawn starts one) instead of leaving it to notice our exit."""
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()


def _wait(
    workers: list[BaseProcess], wake: socket.socket, stop_requested: list[int], grace_period_s: float
) -> bool:
    """Block until a stop signal or a worker's own exit, then stop every worker; whether all stopped cleanly."""
    sentinels = {worker.sentinel: worker for worker in workers}
    failed: BaseProcess | None = None
    while not stop_requested and failed is None:
        ready = multiprocessing.connection.wait([*sentinels, wake])
        with contextlib.suppress(BlockingIOError):
            wake.recv(64)
        for item in ready:
            worker = sentinels.get(item)  # type: ignore[call-overload,arg-type]
            if worker is not None:
                failed = worker
                break
    if failed is not None:
        failed.join()
        log.error(
            "worker %s (pid %s) exited on its own (%s); stopping the other workers and exiting with status 1: "
            "nnserve restarts nothing itself, the orchestrator restarts the whole server",
            failed.name, failed.pid, _describe_exit(failed.exitcode),
        )
    else:
        log.info("received %s: stopping %d workers", signal.Signals(stop_requested[0]).name, len(workers))
    _stop_all(workers, grace_period_s, wake, stop_requested)
    return failed is None and all(worker.exitcode == 0 for worker in workers)


def _stop_all(workers: list[BaseProcess], grace_period_s: float, wake: socket.socket, signals: list[int]) -> None:
    """SIGTERM every live worker and wait for their drain; kill those still running well past the grace period."""
    for worker in workers:
        if worker.exitcode is None and worker.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_period_s + KILL_AFTER_GRACE_S
    seen = len(signals)
    while True:
        alive = [worker for worker in workers if worker.exitcode is None]
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            break
        multiprocessing.connection.wait([worker.sentinel for worker in alive] + [wake], timeout=left)
        with contextlib.suppress(BlockingIOError):
            wake.recv(64)
        if len(signals) > seen:
            seen = len(signals)
            log.warning("received another stop signal; still draining (the grace period bounds the wait)")
    for worker in workers:
        if worker.exitcode is None:
            log.error("worker %s (pid %s) did not stop in time; killing it", worker.name, worker.pid)
            worker.kill()
        worker.join(timeout=5)
        if worker.exitcode not in (0, None):
            log.warning("worker %s (pid %s) %s", worker.name, worker.pid, _describe_exit(worker.exitcode))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _worker_main(settings: ServerSettings, index: int, log_level: int, supervisor_pid: int) -> None:
    """One worker: a complete server on the shared port, until SIGTERM (from the supervisor or its death)."""
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s [worker {index} pid %(process)d] %(name)s: %(message)s",
    )
    _die_with_parent(supervisor_pid)
    import asyncio

    from nnserve.server.app import StartupError, serve
    from nnserve.server.errors import ServingError

    try:
        code = asyncio.run(serve(settings))
    except (StartupError, ServingError) as exc:
        logging.getLogger(__name__).critical("%s", exc)
        code = 1
    except KeyboardInterrupt:
        code = 130
    end_process(code)  # no interpreter teardown: the supervisor is waiting for this exit (nnserve._process)


def _die_with_parent(supervisor_pid: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies, so an orphaned worker drains and frees the port."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
