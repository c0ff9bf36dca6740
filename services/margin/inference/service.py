"""Wires the gateway into a gRPC service, with a watcher that follows the health of every Triton pool."""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
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
from margin.inference.pools import TritonPools, parse_triton_urls
from margin.inference.ratelimit import Limits, RateLimiter
from margin.inference.replicas import parse_pool_address
from margin.inference.servicer import InferenceServicer
from margin.sdk.registry_source import RegistrySource
from margin.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass(frozen=True)
class InferenceSettings:
    triton_url: str  # serves every device class, unless triton_urls is set
    registry_address: str
    redis_url: str
    repository: Path
    instance_kind: str = "KIND_CPU"
    limits: Limits = field(default_factory=Limits)
    calibrate_seconds: float = 0.3
    flush_every_s: float = 1.0
    watch_every_s: float = 0.25
    budget_ttl_s: float = 2.0  # how long a tenant's serving-budget status is cached
    triton_urls: Mapping[str, str] = field(default_factory=dict)  # device class -> its pool's Triton


class TritonWatcher:
    """Health follows the Triton pools: NOT_SERVING while any pool has no ready replica. Every replica that comes
    up — a restart, or a new one the autoscaler added — gets its pool's READY deployments that it lacks (explicit
    model control starts empty), and health returns to SERVING once every pool has a ready replica. The service
    starts NOT_SERVING and does the same once for each replica, so deployments survive a restart of both."""

    def __init__(self, pools: TritonPools, deployments: DeploymentManager, every_s: float):
        self._pools, self._deployments, self._every = pools, deployments, every_s
        self._stop = threading.Event()
        self._server: RunningServer | AioRunningServer | None = None
        self._ready = {pool.name: False for pool in pools.pools}
        self.up = False

    def start(self, server: RunningServer | AioRunningServer) -> None:
        self._server = server
        server.set_serving(False)
        threading.Thread(target=self._loop, name="triton-watch", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self._check()

    def _check(self) -> None:
        ready = {}
        for pool in self._pools.pools:
            def prepare(replica, pool=pool) -> None:
                loaded = self._deployments.reload(pool.classes, on=replica)
                log.warning("Triton pool %s: replica %s is ready; loaded %d deployment(s) it lacked", pool.name,
                            replica.url, loaded)
            pool.client.probe(prepare)
            ready[pool.name] = bool(pool.client.live)
            if self._ready[pool.name] and not ready[pool.name]:
                log.warning("Triton pool %s (%s) has no ready replica", pool.name, pool.client.url)
        self._ready = ready
        up = all(ready.values())
        if up != self.up:
            self.up = up
            self._server.set_serving(up)
            log.warning("Triton pools are %s", "ready" if up else "not all ready: health NOT_SERVING")

    def stop(self) -> None:
        self._stop.set()


def inference_builder(settings: InferenceSettings):
    def build(ctx: ServiceContext) -> ServiceSpec:
        catalog = costs.PriceCatalog.load()
        pools = TritonPools.connect(settings.triton_urls, settings.triton_url, catalog.device_classes)
        registry = RegistrySource(settings.registry_address)
        deployments = DeploymentManager(ctx.sessions, pools, settings.repository, registry, catalog,
                                        settings.instance_kind, settings.calibrate_seconds)
        meter = Meter(ctx.sessions, settings.flush_every_s)
        limiter = RateLimiter(redis.Redis.from_url(settings.redis_url), settings.limits)
        gateway = Gateway(deployments, pools, registry, limiter, meter,
                          budget=BudgetGate(BudgetStore(ctx.sessions), settings.budget_ttl_s))
        servicer = InferenceServicer(gateway)
        watcher = TritonWatcher(pools, deployments, settings.watch_every_s)

        def stop() -> None:
            watcher.stop()
            meter.close()
            pools.close()
            registry.close()

        return ServiceSpec(
            register=[lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)],
            service_names=[SERVICE_NAME], on_stop=stop, on_started=watcher.start, asyncio=True,
            extra={"gateway": gateway, "meter": meter, "limiter": limiter, "watcher": watcher, "pools": pools})
    return build


INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "auto")


def settings_from_env() -> InferenceSettings:
    repository = config.MODEL_REPOSITORY.raw()
    instance_kind = config.TRITON_INSTANCE_KIND.get()
    if instance_kind not in INSTANCE_KINDS:
        raise config.ConfigError(f"MARGIN_TRITON_INSTANCE_KIND={instance_kind!r}: use one of {list(INSTANCE_KINDS)}")
    return InferenceSettings(
        triton_url=parse_pool_address(config.TRITON_URL.get()).text,
        triton_urls=parse_triton_urls(config.TRITON_URLS.raw()),
        registry_address=config.REGISTRY_ADDR.get(), redis_url=config.REDIS_URL.get(),
        repository=Path(repository) if repository else config.margin_home() / "model-repository",
        instance_kind=instance_kind,
        limits=Limits(config.RATE_LIMIT_RPS.get_float(), config.RATE_LIMIT_BURST.get_int()))


def builder_from_env():
    """Reads the environment when the service starts, so a malformed setting is reported as a configuration
    error (exit status 2) rather than a traceback."""
    return lambda ctx: inference_builder(settings_from_env())(ctx)
