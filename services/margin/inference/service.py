"""Wires the gateway into a gRPC service, with a watcher that follows Triton's health."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import redis

from margin.budget.store import BudgetStore
from margin.common import config, costs
from margin.common.server import AioRunningServer, RunningServer
from margin.common.service import ServiceContext, ServiceSpec
from margin.inference.budgetgate import BudgetGate
from margin.inference.deployments import DeploymentManager
from margin.inference.gateway import Gateway
from margin.inference.metering import Meter
from margin.inference.ratelimit import Limits, RateLimiter
from margin.inference.servicer import InferenceServicer
from margin.inference.triton_client import TritonClient
from margin.sdk.registry_source import RegistrySource
from margin.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass(frozen=True)
class InferenceSettings:
    triton_url: str
    registry_address: str
    redis_url: str
    repository: Path
    instance_kind: str = "KIND_CPU"
    limits: Limits = field(default_factory=Limits)
    calibrate_seconds: float = 0.3
    flush_every_s: float = 1.0
    watch_every_s: float = 0.25
    budget_ttl_s: float = 2.0  # how long a tenant's serving-budget status is cached


class TritonWatcher:
    """Health follows Triton: NOT_SERVING while it is unreachable; when it comes back, every READY
    deployment is loaded again (explicit model control starts empty) and health returns to SERVING.
    The service starts NOT_SERVING and does the same once, so deployments survive a restart of both."""

    def __init__(self, triton: TritonClient, deployments: DeploymentManager, every_s: float):
        self._triton, self._deployments, self._every = triton, deployments, every_s
        self._stop = threading.Event()
        self._server: RunningServer | AioRunningServer | None = None
        self.up = False

    def start(self, server: RunningServer | AioRunningServer) -> None:
        self._server = server
        server.set_serving(False)
        threading.Thread(target=self._loop, name="triton-watch", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            ready = self._triton.server_ready()
            if ready and not self.up:
                log.warning("Triton is back: reloading deployments")
                self._deployments.reload_all()
            if ready != self.up:
                self.up = ready
                self._server.set_serving(ready)
                log.warning("Triton is %s", "ready" if ready else "unreachable: health NOT_SERVING")

    def stop(self) -> None:
        self._stop.set()


def inference_builder(settings: InferenceSettings):
    def build(ctx: ServiceContext) -> ServiceSpec:
        triton = TritonClient(settings.triton_url)
        registry = RegistrySource(settings.registry_address)
        deployments = DeploymentManager(ctx.sessions, triton, settings.repository, registry, costs.PriceCatalog.load(),
                                        settings.instance_kind, settings.calibrate_seconds)
        meter = Meter(ctx.sessions, settings.flush_every_s)
        limiter = RateLimiter(redis.Redis.from_url(settings.redis_url), settings.limits)
        gateway = Gateway(deployments, triton, registry, limiter, meter,
                          budget=BudgetGate(BudgetStore(ctx.sessions), settings.budget_ttl_s))
        servicer = InferenceServicer(gateway)
        watcher = TritonWatcher(triton, deployments, settings.watch_every_s)

        def stop() -> None:
            watcher.stop()
            meter.close()
            triton.close()
            registry.close()

        return ServiceSpec(
            register=[lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)],
            service_names=[SERVICE_NAME], on_stop=stop, on_started=watcher.start, asyncio=True,
            extra={"gateway": gateway, "meter": meter, "limiter": limiter, "watcher": watcher})
    return build


def builder_from_env():
    repository = config.MODEL_REPOSITORY.raw()
    return inference_builder(InferenceSettings(
        triton_url=config.TRITON_URL.get(), registry_address=config.REGISTRY_ADDR.get(),
        redis_url=config.REDIS_URL.get(),
        repository=Path(repository) if repository else config.margin_home() / "model-repository",
        instance_kind=config.TRITON_INSTANCE_KIND.get(),
        limits=Limits(config.RATE_LIMIT_RPS.get_float(), config.RATE_LIMIT_BURST.get_int())))
