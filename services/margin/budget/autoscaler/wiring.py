"""How the budget service runs its autoscaler: report-only here (no Kubernetes), or — in a cluster, with
``MARGIN_AUTOSCALER_TARGET`` = hpa | keda | deployment — acting through the Kubernetes adapter on the object named
after each serving deployment, as the leader of a Lease (``margin-autoscaler`` in the same namespace) when the
budget service runs more than one replica."""
from __future__ import annotations

import logging
import os
import socket

from sqlalchemy.orm import sessionmaker

from margin.budget.autoscaler.kube import KINDS, KubeError, KubeScaler, LeaseElector, Target
from margin.budget.autoscaler.planner import AutoscalerLoop, Planner
from margin.budget.store import BudgetStore
from margin.common import config

log = logging.getLogger(__name__)
LEASE_NAME = "margin-autoscaler"


def build_autoscaler(sessions: sessionmaker, budgets: BudgetStore) -> tuple[Planner, AutoscalerLoop]:
    kind, namespace = config.AUTOSCALER_TARGET.get(), config.AUTOSCALER_NAMESPACE.get()
    metrics_url = config.TRITON_METRICS_URL.get() or ""
    interval = config.AUTOSCALER_INTERVAL_SECONDS.get_float()
    if kind not in KINDS:
        raise ValueError(f"MARGIN_AUTOSCALER_TARGET={kind!r}: use one of {sorted(KINDS)}")
    if kind == "report-only":
        planner = Planner(sessions, budgets, metrics_url, kind)
        return planner, AutoscalerLoop(planner, interval)
    from kubernetes import client
    from kubernetes import config as kube_config

    kube_config.load_incluster_config()
    api = client.ApiClient()
    scaler = KubeScaler(api)

    def apply(row, replicas: int, reason: str) -> bool:
        try:
            return scaler.apply(Target(kind, namespace, row.name), replicas, reason)
        except KubeError as err:
            log.error("cannot scale %s to %d: %s", row.name, replicas, err)
            return False

    elector = LeaseElector(api, namespace, LEASE_NAME, os.environ.get("HOSTNAME") or socket.gethostname())

    def leading() -> bool:
        try:
            return elector.try_acquire_or_renew()
        except KubeError as err:
            log.error("leader election failed: %s", err)
            return False

    planner = Planner(sessions, budgets, metrics_url, kind, apply)
    return planner, AutoscalerLoop(planner, interval, leading)
