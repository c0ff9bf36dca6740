"""How the budget service runs its autoscaler: report-only here (no Kubernetes), or — in a cluster, with
``MARGIN_AUTOSCALER_TARGET`` = hpa | keda | deployment — acting through the Kubernetes adapter on the objects of the
Triton pools, as the leader of a Lease (``margin-autoscaler`` in the same namespace) when the budget service runs
more than one replica.

Serving deployments come and go (rows of ``inference_deployments``) and share one Triton pool per device class, so
what scales is the pool: ``MARGIN_AUTOSCALER_TARGETS`` maps each device class to the name of its pool's object (of
the configured kind, in ``MARGIN_AUTOSCALER_NAMESPACE``), e.g. ``{"cpu": "margin-triton-cpu", "nvidia-l4":
"margin-triton-nvidia-l4"}``; every tick the planner sets each pool to the sum of the replicas chosen for the
deployments it serves (see :mod:`margin.budget.autoscaler.planner`). The map is parsed strictly at start: a
malformed one, or none with a cluster kind, is a :class:`~margin.common.config.ConfigError` and the service does
not start. ``report-only`` ignores it and stays as it always was."""
from __future__ import annotations

import json
import logging
import os
import re
import socket

from sqlalchemy.orm import sessionmaker

from margin.budget.autoscaler.kube import KINDS, KubeError, KubeScaler, LeaseElector, Target
from margin.budget.autoscaler.planner import Apply, AutoscalerLoop, Planner
from margin.budget.store import BudgetStore
from margin.common import config
from margin.common.config import ConfigError

log = logging.getLogger(__name__)
LEASE_NAME = "margin-autoscaler"
# metadata.name of an HPA, a ScaledObject or a Deployment: a DNS-1123 subdomain; a namespace: a DNS-1123 label
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_OBJECT = {"hpa": "HorizontalPodAutoscaler", "keda": "KEDA ScaledObject", "deployment": "Deployment"}
_EXAMPLE = '{"cpu": "margin-triton-cpu", "nvidia-l4": "margin-triton-nvidia-l4"}'


def parse_targets(raw: str, kind: str) -> dict[str, str]:
    """``MARGIN_AUTOSCALER_TARGETS`` (a JSON object: device class -> the name of its Triton pool's object), checked
    strictly; :class:`ConfigError` saying what is wrong."""
    env, what = config.AUTOSCALER_TARGETS.env, _OBJECT.get(kind, "object")
    usage = (f"set {env} to a JSON object mapping each device class to the name of the {what} of the Triton pool "
             f"serving it, e.g. {_EXAMPLE}")
    if not raw.strip():
        raise ConfigError(f"{env} is not set but MARGIN_AUTOSCALER_TARGET={kind}: the autoscaler would not know "
                          f"which objects to scale; {usage}")

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in pairs]
        if duplicates := sorted({k for k in keys if keys.count(k) > 1}):
            raise ConfigError(f"{env}: device class(es) {duplicates} given twice; {usage}")
        return dict(pairs)

    try:
        data = json.loads(raw, object_pairs_hook=unique)
    except ValueError as err:
        raise ConfigError(f"{env} is not valid JSON ({err}); {usage}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{env} must be a JSON object, got {type(data).__name__} {raw.strip()[:80]!r}; {usage}")
    if not data:
        raise ConfigError(f"{env} is an empty object but MARGIN_AUTOSCALER_TARGET={kind}: nothing would be "
                          f"scaled; {usage}")
    for device_class, name in data.items():
        if not device_class or device_class != device_class.strip():
            raise ConfigError(f"{env}: device class {device_class!r} is empty or has surrounding spaces")
        if not isinstance(name, str):
            raise ConfigError(f"{env}: the pool of device class {device_class!r} must be named by a string, got "
                              f"{json.dumps(name)}")
        if len(name) > 253 or not _SUBDOMAIN.fullmatch(name):
            raise ConfigError(f"{env}: {name!r} (device class {device_class!r}) is not a valid Kubernetes object "
                              "name: lower-case letters, digits, '-' and '.', starting and ending with a letter or "
                              "digit, at most 253 characters")
    return dict(data)


def pool_applier(scaler: KubeScaler, kind: str, namespace: str) -> Apply:
    """The planner's ``apply``: set the pool object ``pool`` (of ``kind`` in ``namespace``) to ``replicas``, with the
    pool's floor ``minimum`` (0: every deployment of the pool is scaled to zero; see :meth:`KubeScaler.apply`). A
    Kubernetes error is logged — once per pool until it changes or clears, not every tick — and answers False."""
    failing: dict[str, str] = {}

    def apply(pool: str, replicas: int, reason: str, minimum: int = 1) -> bool:
        try:
            changed = scaler.apply(Target(kind, namespace, pool), replicas, reason, minimum)
        except KubeError as err:
            (log.debug if failing.get(pool) == str(err) else log.error)(
                "cannot set pool %s to %d replicas: %s", pool, replicas, err)
            failing[pool] = str(err)
            return False
        if failing.pop(pool, None) is not None:
            log.info("pool %s: scaling works again", pool)
        return changed

    return apply


def build_autoscaler(sessions: sessionmaker, budgets: BudgetStore) -> tuple[Planner, AutoscalerLoop]:
    kind, namespace = config.AUTOSCALER_TARGET.get(), config.AUTOSCALER_NAMESPACE.get()
    metrics_url = config.TRITON_METRICS_URL.get() or ""
    interval = config.AUTOSCALER_INTERVAL_SECONDS.get_float()
    if kind not in KINDS:
        raise ConfigError(f"MARGIN_AUTOSCALER_TARGET={kind!r}: use one of {sorted(KINDS)}")
    if kind == "report-only":
        planner = Planner(sessions, budgets, metrics_url, kind)
        return planner, AutoscalerLoop(planner, interval)
    targets = parse_targets(config.AUTOSCALER_TARGETS.get(), kind)
    if len(namespace) > 63 or not _LABEL.fullmatch(namespace):
        raise ConfigError(f"MARGIN_AUTOSCALER_NAMESPACE={namespace!r} is not a valid Kubernetes namespace")
    from kubernetes import client
    from kubernetes import config as kube_config

    kube_config.load_incluster_config()
    api = client.ApiClient()
    elector = LeaseElector(api, namespace, LEASE_NAME, os.environ.get("HOSTNAME") or socket.gethostname())

    def leading() -> bool:
        try:
            return elector.try_acquire_or_renew()
        except KubeError as err:
            log.error("leader election failed: %s", err)
            return False

    log.info("autoscaler: %s in namespace %s, pools %s", kind, namespace,
             ", ".join(f"{c} -> {n}" for c, n in sorted(targets.items())))
    planner = Planner(sessions, budgets, metrics_url, kind, pool_applier(KubeScaler(api), kind, namespace),
                      targets=targets)
    return planner, AutoscalerLoop(planner, interval, leading)
