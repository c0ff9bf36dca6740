"""Scale to zero, and back: deployments that cost nothing while they are not needed.

After every metering interval has been billed (:class:`~margin.inference.fleet.FleetObserver` tells it when the
budget service took the report, so the spend it reads includes that interval) the scaler looks at each READY
deployment:

- **idle** — with ``min_replicas`` 0, one that served nothing (no request through the gateway and no execution in
  Triton: direct traffic counts) for its ``scale_to_zero_after_s`` (the platform's default when 0) is unloaded;
- **budget** — one whose tenant's serving budget is spent (nothing left to pay for its minimum: its share of the
  pool keeps costing every interval while it is loaded) is unloaded when the tenant's policy is ``reject``; with
  ``degrade`` every deployment of the model but the cheapest (the one requests are degraded to) is; ``throttle``
  keeps serving (more slowly) and so keeps them. The check runs as soon as each interval is billed, so the spend
  ends within one metering interval of the budget.

The next Predict for a scaled-to-zero deployment loads it again (:meth:`Scaler.ready`): the request waits up to
``cold_start_timeout_s`` and is then served, or answers UNAVAILABLE with a retry hint while the load goes on —
nothing is dropped silently. Requests that arrive during one cold start share it. Under ``reject`` a cold start
with the budget spent is RESOURCE_EXHAUSTED instead.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from margin.common.costs import format_money
from margin.common.errors import ResourceExhausted, Unavailable
from margin.inference.budgetgate import BudgetGate, ServingBudget
from margin.inference.deployments import READY, Deployment, DeploymentManager
from margin.inference.fleet import ClosedInterval
from margin.inference.metering import Meter
from margin.inference.served_cost import ServedCost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScalingSettings:
    interval_s: float = 15.0              # the metering interval
    scale_to_zero_after_s: float = 900.0  # the platform's default idle time for min_replicas 0
    cold_start_timeout_s: float = 30.0


class Scaler:
    def __init__(self, deployments: DeploymentManager, meter: Meter, budget: BudgetGate | None,
                 settings: ScalingSettings, served: ServedCost | None = None, clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] = lambda: None):
        self._deployments, self._meter, self._budget = deployments, meter, budget
        self._served = served or ServedCost(clock=clock)
        self.settings, self._clock, self._on_change = settings, clock, on_change
        self._active: dict[str, float] = {}  # Triton name -> when it last did anything (or was first seen)
        self._loads: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._work = ThreadPoolExecutor(2, thread_name_prefix="scaler")
        self._closed = False

    # -- scale to zero -----------------------------------------------------------------------------------------
    def after_interval(self, closed: ClosedInterval, decide: bool = False) -> None:
        """Called by the fleet observer when an interval closes: remember who was active; with ``decide`` (no
        budget service tells when it was billed) decide now."""
        for name, usage in closed.usage.items():
            if usage.executions or usage.inferences:
                self._active[name] = closed.end
        for name, count in closed.requests.items():
            if count:
                self._active[name] = closed.end
        if decide:
            self.after_billed()

    def loaded(self, d: Deployment) -> None:
        """A deployment was deployed or loaded from zero: it counts as active from now."""
        self._active[d.triton_name] = self._clock()

    def after_billed(self, _reply=None) -> None:
        """Called when the budget service took a fleet report: decide, on the scaler's own thread (an unload must
        not hold the observer)."""
        if not self._closed:
            self._work.submit(self._guarded_check)

    def _guarded_check(self) -> None:
        try:
            self.check()
        except Exception:
            log.exception("scale-to-zero check failed")

    def check(self) -> list[tuple[Deployment, str]]:
        """Scale to zero what is idle or cannot be paid for; returns what was scaled and why."""
        now = self._clock()
        ready = [d for d in self._deployments.fleet() if d.state == READY]
        wanted: dict[str, tuple[Deployment, str]] = {}
        for d in ready:
            since = self._active.setdefault(d.triton_name, now)
            last = max(since, self._meter.last_served(d.triton_name) or since)
            after = d.scale_to_zero_after_s or self.settings.scale_to_zero_after_s
            if d.min_replicas == 0 and now - last >= after:
                wanted[d.triton_name] = (d, f"idle for {now - last:.0f} s (scale_to_zero_after {after:g} s)")
        if self._budget is not None:
            by_tenant: dict[str, list[Deployment]] = defaultdict(list)
            for d in ready:
                by_tenant[d.tenant].append(d)
            for tenant, deployments in by_tenant.items():
                status = self._budget.status(tenant, fresh=True)
                for d, reason in self._unaffordable(deployments, status):
                    wanted.setdefault(d.triton_name, (d, reason))
        scaled = []
        for d, reason in wanted.values():
            try:
                if self._deployments.scale_to_zero(d.tenant_id, d.name, reason) is not None:
                    scaled.append((d, reason))
            except Exception:
                log.exception("could not scale %s to zero", d.triton_name)
        if scaled:
            self._on_change()
        return scaled

    def _unaffordable(self, deployments: list[Deployment], status: ServingBudget) -> list[tuple[Deployment, str]]:
        if status.policy == "throttle" or not status.exhausted:
            return []
        keep: set[str] = set()
        if status.policy == "degrade":  # requests are degraded to each model's cheapest as served: it keeps serving
            by_model: dict[str, list[Deployment]] = defaultdict(list)
            for d in deployments:
                by_model[d.model].append(d)
            for ds in by_model.values():
                cost = self._served.for_routing(ds)  # what routing compares, so the one kept is the one routed to
                keep.add(min(ds, key=lambda d, cost=cost: (cost(d), -d.version)).triton_name)
        reason = (f"the serving budget is spent ({format_money(status.spent_micros)} of "
                  f"{format_money(status.limit_micros)}): nothing left to pay for its minimum; policy {status.policy}")
        return [(d, reason) for d in deployments if d.triton_name not in keep]

    # -- and back ----------------------------------------------------------------------------------------------
    def admit(self, d: Deployment, status: ServingBudget) -> None:
        """Whether a cold start may begin: under ``reject`` not with the budget spent (it would be scaled to zero
        again at once)."""
        if status.policy == "reject" and status.exhausted:
            raise ResourceExhausted(
                f"{d.name} is scaled to zero and {d.tenant}'s serving budget is spent "
                f"({format_money(status.spent_micros)} of {format_money(status.limit_micros)}); its policy is to "
                "reject — raise the budget")

    def _load(self, d: Deployment) -> Future:
        with self._lock:
            future = self._loads.get(d.triton_name)
            if future is None:
                future = self._work.submit(self._deployments.wake, d.tenant_id, d.name)
                self._loads[d.triton_name] = future
                future.add_done_callback(lambda _, name=d.triton_name: self._loaded(name))
            return future

    def _loaded(self, triton_name: str) -> None:
        with self._lock:
            self._loads.pop(triton_name, None)

    async def ready(self, d: Deployment) -> Deployment:
        """``d`` loaded: at once when it is READY; else after a cold start (shared with the other requests waiting
        for it), or UNAVAILABLE with a retry hint when it takes longer than the timeout."""
        if d.state == READY:
            return d
        future = self._load(d)
        started = self._clock()
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                          self.settings.cold_start_timeout_s)
        except TimeoutError:
            raise self._still_loading(d, self._clock() - started) from None

    def _still_loading(self, d: Deployment, waited: float) -> Unavailable:
        hint = max(1.0, d.last_cold_start_ms / 1000 - waited) if d.last_cold_start_ms else 5.0
        return Unavailable(f"{d.name} is starting from zero (a cold start, {waited:.0f} s so far, longer than the "
                           f"{self.settings.cold_start_timeout_s:g} s this request may wait); retry in about "
                           f"{hint:.0f} s", retry_after_s=hint)

    def close(self) -> None:
        self._closed = True
        self._work.shutdown(wait=False, cancel_futures=True)
