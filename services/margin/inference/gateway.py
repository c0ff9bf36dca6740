"""The Predict path: resolve the target, check the tenant's allowance, validate, forward to the Triton pool of
the deployment's device class, meter and price the request. Routes and signatures are cached, so no registry call
is on the hot path."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from margin.common.costs import request_cost_micros
from margin.common.errors import InvalidArgument, NotFound
from margin.common.tenancy import Principal
from margin.inference.budgetgate import OPEN, THROTTLE_FACTOR, BudgetGate, ServingBudget
from margin.inference.deployments import READY, Deployment, DeploymentManager
from margin.inference.metering import Meter, MeterKey
from margin.inference.pools import TritonPools
from margin.inference.ratelimit import RateLimiter
from margin.inference.routing import Policy, choose
from margin.inference.triton_client import RawTensor
from margin.inference.validation import validate_inputs, validate_outputs
from margin.sdk.registry_source import RegistrySource


@dataclass(frozen=True)
class Target:
    model: str
    number: int = 0
    alias: str = ""
    policy: Policy | None = None


@dataclass(frozen=True)
class Prediction:
    outputs: list[RawTensor]
    deployment: Deployment
    compute_us: int
    cost_micros: float  # exact share; the ledger rounds once per batch


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


class Gateway:
    def __init__(self, deployments: DeploymentManager, pools: TritonPools, registry: RegistrySource,
                 limiter: RateLimiter, meter: Meter, route_ttl_s: float = 5.0, budget: BudgetGate | None = None):
        self.deployments = deployments
        self._pools = pools
        self._registry = registry
        self._limiter = limiter
        self._meter = meter
        self._routes = _TTLCache(route_ttl_s)
        self._aliases = _TTLCache(route_ttl_s)
        self._budget = budget

    def invalidate(self) -> None:
        """Forget cached routes (after a deploy or undeploy on this replica)."""
        self._routes.clear()

    def predict(self, principal: Principal, api_key: str, target: Target, inputs: Sequence[RawTensor],
                outputs: Sequence[str]) -> Prediction:
        status = self._budget.status(principal.tenant_id) if self._budget else OPEN
        target, factor = self._within_budget(principal, target, status)
        deployment, wanted, rows = self._admit(principal, self._route(principal.tenant_id, api_key, target),
                                               inputs, outputs, factor)
        start = time.perf_counter()
        result = self._pools.for_class(deployment.device_class).infer(deployment.triton_name, inputs, wanted)
        return self._charge(principal, deployment, rows, start, result)

    async def predict_async(self, principal: Principal, api_key: str, target: Target, inputs: Sequence[RawTensor],
                            outputs: Sequence[str]) -> Prediction:
        """:meth:`predict` for an asyncio server: a cache miss resolves the route (and the budget check) on a worker
        thread, and the Triton call awaits instead of blocking."""
        status = (self._budget.cached(principal.tenant_id) or await asyncio.to_thread(
            self._budget.status, principal.tenant_id)) if self._budget else OPEN
        target, factor = self._within_budget(principal, target, status)
        deployment = self._routes.get((principal.tenant_id, target))
        if deployment is None:
            deployment = await asyncio.to_thread(self._route, principal.tenant_id, api_key, target)
        deployment, wanted, rows = self._admit(principal, deployment, inputs, outputs, factor)
        start = time.perf_counter()
        result = await self._pools.for_class(deployment.device_class).infer_async(deployment.triton_name, inputs,
                                                                                 wanted)
        return self._charge(principal, deployment, rows, start, result)

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
               outputs: Sequence[str], factor: int = 1) -> tuple[Deployment, list[str], int]:
        """Validate against the signature and take the rows (× ``factor`` when throttled) from the tenant's
        allowance."""
        validate_inputs(inputs, deployment.signature, deployment.batching.max_batch_size)
        wanted = validate_outputs(outputs, deployment.signature)
        rows = inputs[0].shape[0] if deployment.signature.batched else 1
        self._limiter.take(principal.tenant_id, rows * factor)
        return deployment, wanted, rows

    def _charge(self, principal: Principal, deployment: Deployment, rows: int, start: float,
                result: list[RawTensor]) -> Prediction:
        compute_us = int((time.perf_counter() - start) * 1e6)
        cost = self._price(deployment, rows, compute_us)
        self._meter.record(MeterKey(principal.tenant_id, principal.tenant or "", deployment.name, deployment.model,
                                    deployment.version), compute_us, cost)
        return Prediction(result, deployment, compute_us, cost)

    @staticmethod
    def _price(d: Deployment, rows: int, compute_us: int) -> float:
        """The request's share of the replica: at measured capacity a row costs price/(capacity·3600);
        without a measurement, the replica's price for the time the request took."""
        if d.capacity_rps > 0:
            return rows * d.price_micros_per_hour / (d.capacity_rps * 3600.0)
        return float(request_cost_micros(d.price_micros_per_hour, compute_us / 1e6))

    def _route(self, tenant_id: int, api_key: str, target: Target) -> Deployment:
        if not target.model:
            raise InvalidArgument("version.model is required")
        key = (tenant_id, target)
        cached = self._routes.get(key)
        if cached is not None:
            return cached
        number = target.number
        if target.alias:
            number = self._aliases.get((tenant_id, target.model, target.alias))
            if number is None:
                number = self._registry.version(api_key, target.model, alias=target.alias).number
                self._aliases.put((tenant_id, target.model, target.alias), number)
        ready = self.deployments.ready_for_model(tenant_id, target.model)
        if number:
            found = [d for d in ready if d.version == number]
            if not found:
                raise NotFound(f"{target.model} v{number} is not deployed (ready: "
                                         f"{sorted(d.name for d in ready) or 'none'})")
            deployment = found[0]
        else:
            deployment = choose(target.model, ready, target.policy or Policy())
        assert deployment.state == READY
        self._routes.put(key, deployment)
        return deployment
