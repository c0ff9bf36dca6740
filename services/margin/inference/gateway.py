"""The Predict path: resolve the target, check the tenant's allowance, load a scaled-to-zero deployment (a cold
start), validate, forward to the Triton pool of the deployment's device class, count the request and estimate its
cost. Routes and signatures are cached, so no registry call is on the hot path. What a request really costs is
its deployment's share of its pool's bill, allocated every metering interval (:mod:`margin.inference.fleet`); the
figure in the response is the deployment's served cost per request (:mod:`margin.inference.served_cost`)."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from margin.common.errors import InvalidArgument, NotFound, Unavailable
from margin.common.tenancy import Principal
from margin.inference.budgetgate import OPEN, THROTTLE_FACTOR, BudgetGate, ServingBudget
from margin.inference.coalesce import Coalescer
from margin.inference.deployments import READY, Deployment, DeploymentManager
from margin.inference.metering import Meter, MeterKey
from margin.inference.pools import TritonPools
from margin.inference.ratelimit import RateLimiter
from margin.inference.replicas import RETRY_AFTER_S, TritonReplicas
from margin.inference.routing import Policy, choose
from margin.inference.scaling import Scaler
from margin.inference.served_cost import ServedCost
from margin.inference.triton_client import ModelNotLoaded, RawTensor
from margin.inference.validation import validate_inputs, validate_outputs
from margin.sdk.registry_source import RegistrySource


class Target(NamedTuple):
    """What a request names (a named tuple: made and hashed, as a route cache key, per request)."""
    model: str
    number: int = 0
    alias: str = ""
    policy: Policy | None = None
    default_alias: str = ""  # with no number, alias or policy: this alias's version when the model has it set


DEFAULT_ALIAS = "production"


@dataclass(frozen=True)
class Prediction:
    outputs: list[RawTensor]
    deployment: Deployment
    compute_us: int
    cost_micros: float  # an estimate: the deployment's served cost per request; the ledger is authoritative


class _TTLCache:
    def __init__(self, ttl_s: float):
        self._ttl = ttl_s
        self._data: dict = {}
        self._lock = threading.Lock()

    def get(self, key):
        hit = self._data.get(key)
        return hit[1] if hit and time.monotonic() - hit[0] < self._ttl else None

    def put(self, key, value) -> None:
        with self._lock:
            if len(self._data) > 50_000:
                self._data.clear()
            self._data[key] = (time.monotonic(), value)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def _model_ms(d: Deployment) -> float:
    """How long the deployment takes to answer one request alone: Deploy's batch-1 latency, less the queue delay it
    asked Triton to wait for company."""
    return max(0.0, d.latency_p50_ms - d.batching.max_queue_delay_us / 1000)


class Gateway:
    def __init__(self, deployments: DeploymentManager, pools: TritonPools, registry: RegistrySource,
                 limiter: RateLimiter, meter: Meter, scaler: Scaler | None, served: ServedCost,
                 route_ttl_s: float = 5.0, budget: BudgetGate | None = None,
                 coalescer: Coalescer | None = None):
        self.deployments = deployments
        self._pools = pools
        self._registry = registry
        self._limiter = limiter
        self._meter = meter
        self._scaler = scaler
        self.served = served
        self._routes = _TTLCache(route_ttl_s)
        self._aliases = _TTLCache(route_ttl_s)
        self._budget = budget
        self.coalescer = coalescer or Coalescer()
        self._senders: dict[tuple[int, str], tuple[str, object]] = {}

    def attach_scaler(self, scaler: Scaler) -> None:
        """The scaler (which calls :meth:`invalidate` when it scales something to zero)."""
        self._scaler = scaler

    def invalidate(self) -> None:
        """Forget cached routes (after a deploy, an undeploy or a scale to zero on this replica)."""
        self._routes.clear()

    async def predict_async(self, principal: Principal, api_key: str, target: Target, inputs: Sequence[RawTensor],
                            outputs: Sequence[str]) -> Prediction:
        """Serve one request on the caller's event loop: a cache miss resolves the route (and the budget check) on a
        worker thread; a scaled-to-zero deployment is loaded first (the request waits for the cold start, up to its
        timeout); the Triton call awaits instead of blocking."""
        tenant = principal.tenant or str(principal.tenant_id)
        status = (self._budget.cached(tenant) or await asyncio.to_thread(self._budget.status, tenant)) \
            if self._budget else OPEN
        target, factor = self._within_budget(principal, target, status)
        deployment = self._routes.get((principal.tenant_id, target))
        if deployment is None:
            deployment = await asyncio.to_thread(self._route, principal.tenant_id, api_key, target)
        inputs, wanted, rows = self._admit(principal, deployment, inputs, outputs, factor)
        if deployment.state != READY:
            self._scaler.admit(deployment, status)
            deployment = await self._scaler.ready(deployment)
            self._routes.clear()
        start = time.perf_counter()
        pool = self._pools.for_class(deployment.device_class)
        batched = deployment.batching.max_batch_size if deployment.signature.batched else 0
        try:
            lane, send = self._sender(pool, deployment.triton_name)
            result = await self.coalescer.infer(lane, send, inputs, wanted, rows, batched,
                                                deployment.instances * len(pool.live), _model_ms(deployment))
        except ModelNotLoaded as err:
            raise await asyncio.to_thread(self._not_loaded, pool, deployment, err) from None
        return self._count(principal, deployment, rows, start, result)

    def _sender(self, pool: TritonReplicas, triton_name: str) -> tuple[str, object]:
        """The deployment's lane (its pool and Triton name: a redeploy may move it to another pool) and the coroutine
        function that sends its (coalesced) requests there; made once."""
        key = (id(pool), triton_name)
        found = self._senders.get(key)
        if found is None:
            if len(self._senders) > 10_000:
                self._senders.clear()
            found = self._senders[key] = (f"{pool.url}/{triton_name}", partial(pool.infer_async, triton_name))
        return found

    async def resolve(self, principal: Principal, api_key: str, target: Target) -> Deployment:
        """The deployment a request for ``target`` would reach now (no admission, no cold start)."""
        cached = self._routes.get((principal.tenant_id, target))
        return cached or await asyncio.to_thread(self._route, principal.tenant_id, api_key, target)

    def _not_loaded(self, pool: TritonReplicas, deployment: Deployment, err: ModelNotLoaded) -> Unavailable:
        """A replica taking requests says it has no model for ``deployment``. Still READY: the replica restarted
        between two probes (or lost the model): it is set aside, and the watcher's next probe loads its
        deployments again. Not READY any more (scaled to zero, redeployed, undeployed): the cached route was
        stale. Either way the caller may retry: UNAVAILABLE with a retry hint, never FAILED_PRECONDITION."""
        current = self.deployments.get(deployment.tenant_id, deployment.name)
        if current.state == READY and current.triton_name == deployment.triton_name:
            if err.replica is not None:
                pool.lost_models(err.replica)
            return Unavailable(f"{deployment.name} is being loaded again on its Triton pool (a replica restarted); "
                               "retry", retry_after_s=err.retry_after_s or RETRY_AFTER_S)
        self.invalidate()
        return Unavailable(f"{deployment.name} changed ({current.state}) while this request was on its way; retry",
                           retry_after_s=RETRY_AFTER_S)

    @staticmethod
    def _within_budget(principal: Principal, target: Target, status: ServingBudget) -> tuple[Target, int]:
        """The target and the rate-limit tokens per row, after the tenant's policy for a spent serving budget
        (:mod:`margin.inference.budgetgate`)."""
        if not status.exhausted:
            return target, 1
        if status.policy == "degrade":
            return Target(target.model, policy=target.policy), 1
        if status.policy == "throttle":
            return target, THROTTLE_FACTOR
        raise status.refuse(principal.tenant or str(principal.tenant_id))

    def _admit(self, principal: Principal, deployment: Deployment, inputs: Sequence[RawTensor],
               outputs: Sequence[str], factor: int = 1) -> tuple[list[RawTensor], list[str], int]:
        """Validate against the signature and take the rows (× ``factor`` when throttled) from the tenant's
        allowance. The inputs come back in the signature's order (so that requests can share a batch)."""
        ordered = validate_inputs(inputs, deployment.signature, deployment.batching.max_batch_size)
        wanted = validate_outputs(outputs, deployment.signature)
        rows = inputs[0].shape[0] if deployment.signature.batched else 1
        self._limiter.take(principal.tenant_id, rows * factor)
        return ordered, wanted, rows

    def _count(self, principal: Principal, deployment: Deployment, rows: int, start: float,
               result: list[RawTensor]) -> Prediction:
        compute_us = int((time.perf_counter() - start) * 1e6)
        self._meter.record(MeterKey(principal.tenant_id, principal.tenant or "", deployment.name, deployment.model,
                                    deployment.version, deployment.triton_name), compute_us, rows)
        per_million, _ = self.served.per_million(deployment)
        return Prediction(result, deployment, compute_us, rows * per_million / 1e6)

    def _route(self, tenant_id: int, api_key: str, target: Target) -> Deployment:
        if not target.model:
            raise InvalidArgument("version.model is required")
        key = (tenant_id, target)
        cached = self._routes.get(key)
        if cached is not None:
            return cached
        number = target.number
        if target.alias:
            number = self._alias(tenant_id, api_key, target.model, target.alias)
        elif not number and target.policy is None and target.default_alias:
            number = self._alias(tenant_id, api_key, target.model, target.default_alias, missing_ok=True)
        servable = self.deployments.servable_for_model(tenant_id, target.model)
        if number:
            found = [d for d in servable if d.version == number]
            if not found:
                raise NotFound(f"{target.model} v{number} is not deployed (deployed: "
                               f"{sorted(d.name for d in servable) or 'none'})")
            deployment = found[0]
        else:
            deployment = choose(target.model, servable, target.policy or Policy(), self.served.for_routing(servable))
        self._routes.put(key, deployment)
        return deployment

    def _alias(self, tenant_id: int, api_key: str, model: str, alias: str, missing_ok: bool = False) -> int:
        """The version ``alias`` points at (cached); 0 when it is not set and ``missing_ok``."""
        number = self._aliases.get((tenant_id, model, alias))
        if number is None:
            try:
                number = self._registry.version(api_key, model, alias=alias).number
            except NotFound:
                if not missing_ok:
                    raise
                number = 0
            self._aliases.put((tenant_id, model, alias), number)
        return number
