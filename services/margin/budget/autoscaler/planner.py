"""The autoscaler's loop body: for each ready serving deployment, gather the controller's inputs — Triton's demand
signals, the deployment's measured capacity and replica price, the tenant's remaining serving budget, the time
left in the period and the other deployments' burn — decide, record the plan (Prometheus gauges, the last plan
per deployment for ``GetScalingPlan``), and act, or only report when the target is ``report-only`` (the local
mode: there is no Kubernetes here).

In a cluster, serving deployments are rows of a table, created and removed at any time, and they share Triton
*pools*, one per device class: the Kubernetes object that scales (an HPA, a KEDA ScaledObject or a Deployment) is
the pool's, not a deployment's. So once a tick has decided for every deployment, the planner groups the decisions
by the pool serving each deployment's device class (``targets``: device class -> the pool object's name) and sets
each pool to the *sum* of the replicas chosen for the deployments it serves — at least
:data:`POOL_MIN_REPLICAS` — through an ``apply(pool, replicas, reason)`` callback (the Kubernetes adapter, see
:mod:`margin.budget.autoscaler.wiring`; anything in tests). A deployment whose class has no pool target is not
applied, and its plan says so. Because a pool's sum spans every tenant, a tick that applies (GetScalingPlan's
included) decides for every ready deployment, and returns the plans asked for.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from prometheus_client import Gauge
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from margin.budget.autoscaler import triton_metrics
from margin.budget.autoscaler.controller import Controller, Decision, Inputs
from margin.budget.fleet.tables import ServingDeploymentRow as DeploymentRow
from margin.budget.store import BudgetStore
from margin.common.errors import NotFound

log = logging.getLogger(__name__)
REPLICAS = Gauge("margin_autoscaler_replicas", "The autoscaler's replica counts per deployment: demand, affordable "
                 "(-1 without a serving budget) and chosen.", ["deployment", "kind"])
POOL_REPLICAS = Gauge("margin_autoscaler_pool_replicas", "Replicas the autoscaler set on each Triton pool's object: "
                      "the sum of the replicas chosen for the deployments it serves (at least 1).", ["pool"])
READY, LOADING, SCALED_TO_ZERO = "READY", "LOADING", "SCALED_TO_ZERO"
BURN_HISTORY_S = 900.0  # the deployment's burn rate so far counts once the period is this old
POOL_MIN_REPLICAS = 1   # a pool keeps one replica even when none of its deployments wants any
POOL_REASON_CHARS = 1000  # a pool's reason (an annotation on its object) stays under this
DEPLOYMENT_REASON_CHARS = 160  # each deployment's part of it


@dataclass(frozen=True)
class Plan:
    tenant_id: int
    deployment: str
    current: int
    demand: int
    affordable: int | None
    minimum: int
    chosen: int
    reason: str
    price_micros_per_hour: int
    remaining_micros: int | None
    hours_left: float
    observed_rps: float
    capacity_rps: float
    queue_us_per_request: float
    target_kind: str
    applied: bool                     # its pool's object was patched this tick
    at: datetime
    pool: str = ""                    # the object of the Triton pool serving it ("" : none, or report-only)
    pool_replicas: int = 0            # what that pool was set to: the sum over the deployments it serves
    state: str = READY


Apply = Callable[[str, int, str, int], bool]
"""``apply(pool, replicas, reason, minimum)``: set the pool object named ``pool`` to ``replicas`` with the floor
``minimum``; True when a patch was sent (False: it already held the value, or it failed — the callback logs
why)."""


@dataclass(frozen=True)
class TenantView:
    """One tenant's money as the tick read it, before any decision."""
    remaining: int | None
    seconds_left: float
    spent_by_deployment: dict[str, int]
    burn: dict[str, int]      # allocated micros per hour, by deployment
    elapsed_s: float


def pool_reason(pool: str, replicas: int, served: list[tuple[DeploymentRow, Plan]]) -> str:
    """Why ``pool`` gets ``replicas``: the sum, then each deployment's count and reason, largest first, truncated
    to :data:`POOL_REASON_CHARS` (the rest counted, not dropped silently)."""
    total = sum(plan.chosen for _, plan in served)
    classes = ", ".join(sorted({row.device_class for row, _ in served}))
    if not served:
        head = f"{pool}: minimum {POOL_MIN_REPLICAS}: no ready deployment to serve"
    elif total < POOL_MIN_REPLICAS:
        head = f"{pool}: minimum {POOL_MIN_REPLICAS} (the {len(served)} deployment(s) on {classes} want {total})"
    else:
        head = f"{pool}: {replicas} = sum over {len(served)} deployment(s) on {classes}"
    ordered = sorted(served, key=lambda item: (-item[1].chosen, item[0].triton_name))
    parts = [_clip(f"{row.triton_name} {plan.chosen} ({plan.reason})", DEPLOYMENT_REASON_CHARS)
             for row, plan in ordered]
    text = head
    for shown, part in enumerate(parts):
        more = len(parts) - shown - 1
        tail = f"; … and {more} more" if more else ""
        candidate = f"{text}{': ' if shown == 0 else '; '}{part}"
        if len(candidate) + len(tail) > POOL_REASON_CHARS:
            return _clip(f"{text}; … and {len(parts) - shown} more", POOL_REASON_CHARS)
        text = candidate
    return text


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


class Planner:
    def __init__(self, sessions: sessionmaker, budgets: BudgetStore, metrics_url: str = "",
                 target_kind: str = "report-only", apply: Apply | None = None,
                 clock: Callable[[], float] = time.time, targets: Mapping[str, str] | None = None):
        self._sessions, self.budgets, self.metrics_url = sessions, budgets, metrics_url
        self.target_kind, self._apply, self._clock = target_kind, apply, clock
        self.targets: dict[str, str] = dict(targets or {})  # device class -> the name of its pool's object
        self._pooled = apply is not None and target_kind != "report-only"
        self.pool_replicas: dict[str, int] = {}  # what each pool was last set to
        self._controllers: dict[str, Controller] = {}
        self._replicas: dict[str, int] = {}
        self._plans: dict[str, Plan] = {}
        self._last_scrape: triton_metrics.Counters | None = None
        self._lock = threading.Lock()

    def _rows(self, tenant_id: int | None = None) -> list[DeploymentRow]:
        with self._sessions() as s:
            query = select(DeploymentRow).where(DeploymentRow.state.in_([READY, LOADING, SCALED_TO_ZERO]))
            if tenant_id is not None:
                query = query.where(DeploymentRow.tenant_id == tenant_id)
            rows = list(s.scalars(query.order_by(DeploymentRow.id)))
            s.expunge_all()
            return rows

    def _demand(self, now: float) -> tuple[triton_metrics.Counters | None, triton_metrics.Counters | None]:
        if not self.metrics_url:
            return None, None
        try:
            current = triton_metrics.scrape(self.metrics_url, now)
        except OSError as err:
            log.warning("cannot read Triton's metrics at %s: %s", self.metrics_url, err)
            return self._last_scrape, None
        before, self._last_scrape = self._last_scrape, current
        return before, current

    def tick(self, tenant_id: int | None = None, act: bool = True) -> list[Plan]:
        """Decide for every deployment (of one tenant, or all) and, with ``act``, apply the pools' replicas;
        returns the plans. Only the autoscaler's loop acts (as the Lease leader in a cluster); GetScalingPlan, which
        any replica answers, only computes."""
        with self._lock:
            now = self._clock()
            before, after = self._demand(now)
            # a pool's sum spans every tenant: a tick that applies decides for all, and returns the plans asked for
            rows = self._rows(None if self._pooled else tenant_id)
            current = {row.triton_name: self._current(row) for row in rows}  # the snapshot: before any decision
            tenants = {t: self._tenant_view(t, now) for t in sorted({row.tenant_id for row in rows})}
            decided: list[tuple[DeploymentRow, Plan]] = []
            for row in rows:
                view = tenants[row.tenant_id]
                others = sum(micros for name, micros in view.burn.items() if name != row.name)
                own = view.burn.get(row.name)  # its allocated burn now; else its average so far this period
                if own is None and view.elapsed_s >= BURN_HISTORY_S:
                    own = int(view.spent_by_deployment.get(row.name, 0) * 3600 / view.elapsed_s)
                rates = triton_metrics.rates(before, after, row.triton_name) if before and after else None
                decided.append((row, self._decide(row, now, rates, view, current[row.triton_name], others, own)))
            for row, plan in decided:
                self._replicas[row.triton_name] = plan.chosen
            if self._pooled:
                decided = self._apply_pools(decided, act)
            for _, plan in decided:
                self._plans[f"{plan.tenant_id}/{plan.deployment}"] = plan
            return [plan for _, plan in decided if tenant_id is None or plan.tenant_id == tenant_id]

    def _tenant_view(self, tenant_id: int, now: float) -> TenantView:
        at = datetime.fromtimestamp(now, UTC)
        spend = self.budgets.spend(tenant_id, at)
        return TenantView(
            remaining=spend.remaining_for("serving"), seconds_left=(spend.period_end - at).total_seconds(),
            spent_by_deployment={line.key: line.micros for line in spend.by_deployment if line.category == "serving"},
            burn=self.budgets.serving_burn(tenant_id, at, spend.period_start),
            elapsed_s=(at - spend.period_start).total_seconds())

    def _apply_pools(self, decided: list[tuple[DeploymentRow, Plan]], act: bool = True) \
            -> list[tuple[DeploymentRow, Plan]]:
        """Set every pool that has a target to the sum of its deployments' chosen replicas (at least the pool's
        minimum); a deployment whose class has no target is not applied, and its plan says so."""
        members: dict[str, list[int]] = {pool: [] for pool in self.targets.values()}
        result = list(decided)
        for i, (row, plan) in enumerate(result):
            pool = self.targets.get(row.device_class)
            if pool is None:
                result[i] = (row, replace(plan, reason=f"{plan.reason}; not applied: no pool target for device "
                                                       f"class {row.device_class}"))
            else:
                members[pool].append(i)
        for pool, indexes in sorted(members.items()):
            served = [result[i] for i in indexes]
            asleep = bool(served) and all(plan.state == SCALED_TO_ZERO and plan.chosen == 0 for _, plan in served)
            minimum = 0 if asleep else POOL_MIN_REPLICAS
            replicas = max(minimum, sum(plan.chosen for _, plan in served))
            try:
                applied = act and bool(self._apply(pool, replicas, pool_reason(pool, replicas, served), minimum))
            except Exception:  # one pool's failure must not keep the others from their replicas
                log.exception("cannot set pool %s to %d replicas", pool, replicas)
                applied = False
            self.pool_replicas[pool] = replicas
            POOL_REPLICAS.labels(pool).set(replicas)
            for i in indexes:
                row, plan = result[i]
                result[i] = (row, replace(plan, applied=applied, pool=pool, pool_replicas=replicas))
        return result

    def _current(self, row: DeploymentRow) -> int:
        return self._replicas.get(row.triton_name, max(row.min_replicas, 1))

    def _decide(self, row: DeploymentRow, now: float, rates: triton_metrics.Rates | None, view: TenantView,
                current: int, others: int, own: int | None) -> Plan:
        controller = self._controllers.setdefault(row.triton_name, Controller())
        inputs = Inputs(now_s=now, observed_rps=rates.rps if rates else 0.0,
                        queue_us_per_request=rates.queue_us_per_request if rates else 0.0,
                        capacity_rps_per_replica=row.capacity_rps, current_replicas=current,
                        min_replicas=row.min_replicas, max_replicas=max(row.max_replicas, row.min_replicas),
                        replica_micros_per_hour=row.price_micros_per_hour, remaining_micros=view.remaining,
                        seconds_left=view.seconds_left, others_micros_per_hour=others, own_micros_per_hour=own)
        if row.state == SCALED_TO_ZERO:
            decision = Decision(0, None, 0, "scaled to zero: it is unloaded until a request loads it again")
        else:
            decision = controller.decide(inputs)
            if row.state == LOADING and decision.chosen < 1:
                decision = Decision(decision.demand, decision.affordable, 1, "cold start: loading from zero")
        for kind, value in (("demand", decision.demand), ("chosen", decision.chosen),
                            ("affordable", -1 if decision.affordable is None else decision.affordable)):
            REPLICAS.labels(row.name, kind).set(value)
        return Plan(row.tenant_id, row.name, current, decision.demand, decision.affordable, row.min_replicas,
                    decision.chosen, decision.reason, row.price_micros_per_hour, view.remaining,
                    view.seconds_left / 3600, inputs.observed_rps, row.capacity_rps, inputs.queue_us_per_request,
                    self.target_kind, False, datetime.fromtimestamp(now, UTC), state=row.state)

    def plan(self, tenant_id: int, deployment: str) -> Plan:
        """The deployment's plan as of now (a tick for the tenant's deployments)."""
        for plan in self.tick(tenant_id, act=False):
            if plan.deployment == deployment:
                return plan
        raise NotFound(f"no serving deployment {deployment!r} (deployments appear here once the inference gateway "
                       "reports them, within a metering interval of Deploy)")


class AutoscalerLoop:
    """Ticks the planner every ``interval_s`` while ``leading()`` (a Lease elector in a cluster; always locally)."""

    def __init__(self, planner: Planner, interval_s: float, leading: Callable[[], bool] = lambda: True):
        self.planner, self.interval_s, self.leading = planner, interval_s, leading
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autoscaler", daemon=True)

    def start(self) -> AutoscalerLoop:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.leading():
                    self.planner.tick()
            except Exception:  # a bad tick must not end the loop
                log.exception("autoscaler tick failed")
