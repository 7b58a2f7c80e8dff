"""grpc.health.v1.Health for Kubernetes gRPC probes: "" is the server, and each model has its own name.

"" is SERVING once start-up loading is done and the server is ready (strict readiness: every
model it is meant to serve is ready; one unloaded on request no longer counts), NOT_SERVING
while loading or draining: the readiness probe, answered by the same rule as ServerReady. A model name is
SERVING while some version of it is ready. "liveness" is SERVING for as long as the process
serves gRPC at all, loading and draining included, so a liveness probe never restarts a pod
for a broken model or in the middle of a drain. On shutdown everything but "liveness" turns
NOT_SERVING for good.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from nnserve.server.repository import ModelEntry, ModelState

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LIVENESS: str = "liveness"


class HealthReporter:
    """Owns the health servicer and translates server/model state into serving statuses."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self._shutting_down = False
        self._names: set[str] = {""}

    def add_to_server(self, server: object) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set_alive(self) -> None:
        await self.servicer.set(LIVENESS, SERVING)

    async def set_server(self, serving: bool) -> None:
        if self._shutting_down:
            return
        await self.servicer.set("", SERVING if serving else NOT_SERVING)

    async def on_model_change(self, entry: ModelEntry) -> None:
        """Repository listener: keep the model's own health status in step with its state."""
        if self._shutting_down:
            return
        self._names.add(entry.name)
        await self.servicer.set(entry.name, SERVING if entry.state is ModelState.READY else NOT_SERVING)

    async def shutdown(self) -> None:
        """NOT_SERVING for the server and every model, permanently (load balancers stop routing here)."""
        self._shutting_down = True
        for name in sorted(self._names):
            await self.servicer.set(name, NOT_SERVING)
