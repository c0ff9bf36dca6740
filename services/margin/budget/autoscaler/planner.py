"""The autoscaler's loop body: for each ready serving deployment, gather the controller's inputs — Triton's demand
signals, the deployment's measured capacity and replica price, the tenant's remaining serving budget, the time
left in the period and the other deployments' burn — decide, record the plan (Prometheus gauges, the last plan
per deployment for ``GetScalingPlan``), and act through an ``apply`` callback (the Kubernetes adapter), or only
report when the target is ``report-only`` (the local mode: there is no Kubernetes here).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import Gauge
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from margin.budget.autoscaler import triton_metrics
from margin.budget.autoscaler.controller import Controller, Inputs
from margin.budget.store import BudgetStore
from margin.common.errors import NotFound
from margin.inference.tables import DeploymentRow

log = logging.getLogger(__name__)
REPLICAS = Gauge("margin_autoscaler_replicas", "The autoscaler's replica counts per deployment: demand, affordable "
                 "(-1 without a serving budget) and chosen.", ["deployment", "kind"])
READY = "READY"
BURN_HISTORY_S = 900.0  # the deployment's burn rate so far counts once the period is this old


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
    applied: bool
    at: datetime


Apply = Callable[[DeploymentRow, int, str], bool]


class Planner:
    def __init__(self, sessions: sessionmaker, budgets: BudgetStore, metrics_url: str = "",
                 target_kind: str = "report-only", apply: Apply | None = None,
                 clock: Callable[[], float] = time.time):
        self._sessions, self.budgets, self.metrics_url = sessions, budgets, metrics_url
        self.target_kind, self._apply, self._clock = target_kind, apply, clock
        self._controllers: dict[str, Controller] = {}
        self._replicas: dict[str, int] = {}
        self._plans: dict[str, Plan] = {}
        self._last_scrape: triton_metrics.Counters | None = None
        self._lock = threading.Lock()

    def _rows(self, tenant_id: int | None = None) -> list[DeploymentRow]:
        with self._sessions() as s:
            query = select(DeploymentRow).where(DeploymentRow.state == READY)
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

    def tick(self, tenant_id: int | None = None) -> list[Plan]:
        """Decide for every ready deployment (of one tenant, or all) and act; returns the plans."""
        with self._lock:
            now = self._clock()
            before, after = self._demand(now)
            rows = self._rows(tenant_id)
            by_tenant: dict[int, list[DeploymentRow]] = {}
            for row in rows:
                by_tenant.setdefault(row.tenant_id, []).append(row)
            plans = []
            for tenant, deployments in by_tenant.items():
                spend = self.budgets.spend(tenant, datetime.fromtimestamp(now, UTC))
                remaining = spend.remaining_for("serving")
                at = datetime.fromtimestamp(now, UTC)
                seconds_left = (spend.period_end - at).total_seconds()
                elapsed = (at - spend.period_start).total_seconds()
                spent = {line.key: line.micros for line in spend.by_deployment if line.category == "serving"}
                for row in deployments:
                    others = sum(self._current(d) * d.price_micros_per_hour for d in deployments if d.id != row.id)
                    own = int(spent.get(row.name, 0) * 3600 / elapsed) if elapsed >= BURN_HISTORY_S else None
                    rates = triton_metrics.rates(before, after, row.triton_name) if before and after else None
                    plans.append(self._decide(row, now, rates, remaining, seconds_left, others, own))
            return plans

    def _current(self, row: DeploymentRow) -> int:
        return self._replicas.get(row.triton_name, max(row.min_replicas, 1))

    def _decide(self, row: DeploymentRow, now: float, rates: triton_metrics.Rates | None, remaining: int | None,
                seconds_left: float, others: int, own: int | None) -> Plan:
        controller = self._controllers.setdefault(row.triton_name, Controller())
        current = self._current(row)
        inputs = Inputs(now_s=now, observed_rps=rates.rps if rates else 0.0,
                        queue_us_per_request=rates.queue_us_per_request if rates else 0.0,
                        capacity_rps_per_replica=row.capacity_rps, current_replicas=current,
                        min_replicas=row.min_replicas, max_replicas=max(row.max_replicas, row.min_replicas),
                        replica_micros_per_hour=row.price_micros_per_hour, remaining_micros=remaining,
                        seconds_left=seconds_left, others_micros_per_hour=others, own_micros_per_hour=own)
        decision = controller.decide(inputs)
        applied = False
        if self._apply is not None and self.target_kind != "report-only" and decision.chosen != current:
            applied = self._apply(row, decision.chosen, decision.reason)
        self._replicas[row.triton_name] = decision.chosen
        for kind, value in (("demand", decision.demand), ("chosen", decision.chosen),
                            ("affordable", -1 if decision.affordable is None else decision.affordable)):
            REPLICAS.labels(row.name, kind).set(value)
        plan = Plan(row.tenant_id, row.name, current, decision.demand, decision.affordable, row.min_replicas,
                    decision.chosen, decision.reason, row.price_micros_per_hour, remaining, seconds_left / 3600,
                    inputs.observed_rps, row.capacity_rps, inputs.queue_us_per_request, self.target_kind, applied,
                    datetime.fromtimestamp(now, UTC))
        self._plans[f"{row.tenant_id}/{row.name}"] = plan
        return plan

    def plan(self, tenant_id: int, deployment: str) -> Plan:
        """The deployment's plan as of now (a tick for the tenant's deployments)."""
        for plan in self.tick(tenant_id):
            if plan.deployment == deployment:
                return plan
        raise NotFound(f"no ready deployment {deployment!r}")


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
