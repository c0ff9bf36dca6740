"""Wires the gateway into a gRPC service, with a watcher that follows the health of every Triton pool and, after
each probe, the fleet observer that meters the pools' replica time for the budget service."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis
from tritonclient.grpc import service_pb2_grpc

from margin.common import config, costs
from margin.common.server import AioRunningServer, RunningServer
from margin.common.service import ServiceContext, ServiceSpec
from margin.inference.budgetgate import BudgetGate
from margin.inference.coalesce import Coalescer
from margin.inference.deployments import DeploymentManager
from margin.inference.fleet import FleetObserver
from margin.inference.gateway import Gateway
from margin.inference.metering import Meter
from margin.inference.oip_servicer import SERVICE_NAME as OIP_SERVICE_NAME
from margin.inference.oip_servicer import OpenInferenceServicer
from margin.inference.pools import TritonPools, parse_triton_urls
from margin.inference.ratelimit import Limits, RateLimiter
from margin.inference.replicas import parse_pool_address
from margin.inference.scaling import Scaler, ScalingSettings
from margin.inference.served_cost import ServedCost
from margin.inference.servicer import InferenceServicer
from margin.sdk.budgets import BudgetsClient
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
    watch_every_s: float = 0.25
    budget_ttl_s: float = 2.0  # how long a tenant's serving-budget status is cached
    triton_urls: Mapping[str, str] = field(default_factory=dict)  # device class -> its pool's Triton
    budget_address: str = ""   # where the fleet is reported and serving budgets read; "" : neither (a bare gateway)
    triton_device_class: str = "cpu"  # the replicas of triton_url's pool, when it serves every class
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    reload_concurrency: int = 8  # deployments loaded at once on a replica that came back
    coalesce_in_flight: int = 1  # upstream calls per model instance and replica before requests wait to share a batch


class TritonWatcher:
    """Health follows the Triton pools: NOT_SERVING while any pool has no replica that is ready *and has its
    deployments*. Every replica that comes up — a restart, or a new one the autoscaler added — gets its pool's READY
    deployments that it lacks (explicit model control starts empty), loaded in parallel on a background thread
    (:meth:`TritonReplicas.probe`), and takes requests once it has them; health returns to SERVING once every pool
    has such a replica. A pool whose only replica restarted is therefore NOT_SERVING until its deployments are
    back (Predicts meanwhile answer UNAVAILABLE with a retry hint). Health is one status for the whole service
    ("" and margin.v1.Inference): a gateway that cannot serve one of its pools is not ready. The service starts
    NOT_SERVING and does the same once for each replica, so deployments survive a restart of both."""

    def __init__(self, pools: TritonPools, deployments: DeploymentManager, every_s: float,
                 observer: FleetObserver | None = None):
        self._pools, self._deployments, self._every, self._observer = pools, deployments, every_s, observer
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
            try:
                self._check()
            except Exception:  # a bad tick must not end the watcher (health, reloads and metering hang on it)
                log.exception("Triton watcher tick failed")

    def _check(self) -> None:
        ready = {}
        for pool in self._pools.pools:
            def prepare(replica, pool=pool) -> None:
                started = time.monotonic()
                loaded = self._deployments.reload(pool.classes, on=replica)
                log.warning("Triton pool %s: replica %s is ready; loaded %d deployment(s) it lacked in %.1f s",
                            pool.name, replica.url, loaded, time.monotonic() - started)
            pool.client.probe(prepare)
            ready[pool.name] = bool(pool.client.live)
            if self._ready[pool.name] and not ready[pool.name]:
                log.warning("Triton pool %s (%s) has no ready replica", pool.name, pool.client.url)
        self._ready = ready
        if self._observer is not None:
            self._observer.observe()
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
        pools = TritonPools.connect(settings.triton_urls, settings.triton_url, catalog.device_classes,
                                    settings.triton_device_class)
        registry = RegistrySource(settings.registry_address)
        deployments = DeploymentManager(ctx.sessions, pools, settings.repository, registry, catalog,
                                        settings.instance_kind, settings.calibrate_seconds,
                                        settings.reload_concurrency)
        meter = Meter()
        budgets = BudgetsClient(settings.budget_address, ctx.admin_key) if settings.budget_address else None
        if budgets is None:
            log.warning("no budget service: the fleet is not metered and serving budgets are not enforced")
        gate = BudgetGate(budgets, settings.budget_ttl_s) if budgets else None
        observer = FleetObserver(pools, deployments, meter, budgets, settings.scaling.interval_s)
        served = ServedCost()
        observer.on_closed(served.add_interval)
        observer.on_allocated(served.add_allocations)
        limiter = RateLimiter(redis.Redis.from_url(settings.redis_url), settings.limits)
        gateway = Gateway(deployments, pools, registry, limiter, meter, None, served, budget=gate,
                          coalescer=Coalescer(settings.coalesce_in_flight))
        scaler = Scaler(deployments, meter, gate, settings.scaling, served, on_change=gateway.invalidate)
        gateway.attach_scaler(scaler)
        if budgets is not None:
            observer.on_closed(scaler.after_interval)
            observer.on_allocated(scaler.after_billed)
        else:
            observer.on_closed(lambda closed: scaler.after_interval(closed, decide=True))
        deployments.before_unload = lambda d: observer.settle(pools.pool_of(d.device_class), d)
        deployments.changed = observer.changed
        deployments.loaded = scaler.loaded
        servicer = InferenceServicer(gateway)
        watcher = TritonWatcher(pools, deployments, settings.watch_every_s, observer)
        open_inference = OpenInferenceServicer(gateway, pools, ready=lambda: watcher.up)

        def stop() -> None:
            watcher.stop()
            scaler.close()
            observer.close()
            pools.close()
            registry.close()
            if budgets is not None:
                budgets.close()

        return ServiceSpec(
            register=[lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server),
                      lambda server: service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(open_inference,
                                                                                                 server)],
            service_names=[SERVICE_NAME, OIP_SERVICE_NAME], on_stop=stop, on_started=watcher.start, asyncio=True,
            extra={"gateway": gateway, "open_inference": open_inference,
                   "meter": meter, "limiter": limiter, "watcher": watcher, "pools": pools,
                   "observer": observer, "scaler": scaler, "served": served})
    return build


INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "auto")


def settings_from_env() -> InferenceSettings:
    repository = config.MODEL_REPOSITORY.raw()
    instance_kind = config.TRITON_INSTANCE_KIND.get()
    if instance_kind not in INSTANCE_KINDS:
        raise config.ConfigError(f"MARGIN_TRITON_INSTANCE_KIND={instance_kind!r}: use one of {list(INSTANCE_KINDS)}")
    scaling = ScalingSettings(config.FLEET_INTERVAL_SECONDS.get_float(), config.SCALE_TO_ZERO_AFTER_SECONDS.get_float(),
                              config.COLD_START_TIMEOUT_SECONDS.get_float())
    if scaling.interval_s <= 0 or scaling.scale_to_zero_after_s <= 0 or scaling.cold_start_timeout_s <= 0:
        raise config.ConfigError(f"{config.FLEET_INTERVAL_SECONDS.env}, {config.SCALE_TO_ZERO_AFTER_SECONDS.env} and "
                                 f"{config.COLD_START_TIMEOUT_SECONDS.env} must be positive")
    reload_concurrency, in_flight = config.RELOAD_CONCURRENCY.get_int(), config.COALESCE_IN_FLIGHT.get_int()
    for setting, value in ((config.RELOAD_CONCURRENCY, reload_concurrency), (config.COALESCE_IN_FLIGHT, in_flight)):
        if value < 1:
            raise config.ConfigError(f"{setting.env}={value}: it must be at least 1")
    return InferenceSettings(
        triton_url=parse_pool_address(config.TRITON_URL.get()).text,
        triton_urls=parse_triton_urls(config.TRITON_URLS.raw()),
        registry_address=config.REGISTRY_ADDR.get(), redis_url=config.REDIS_URL.get(),
        repository=Path(repository) if repository else config.margin_home() / "model-repository",
        instance_kind=instance_kind,
        limits=Limits(config.RATE_LIMIT_RPS.get_float(), config.RATE_LIMIT_BURST.get_int()),
        budget_address=config.BUDGET_ADDR.get(), triton_device_class=config.TRITON_DEVICE_CLASS.get(),
        scaling=scaling, reload_concurrency=reload_concurrency, coalesce_in_flight=in_flight)


def builder_from_env():
    """Reads the environment when the service starts, so a malformed setting is reported as a configuration
    error (exit status 2) rather than a traceback."""
    return lambda ctx: inference_builder(settings_from_env())(ctx)
