"""The autoscaler's Kubernetes adapter, Lease leader election and the Triton pools' replica sums, against a stand-in
of the Kubernetes API server.

There is no Kubernetes here, so :class:`~kube_standin.KubeApiStandIn` (``tests/kube_standin.py``) plays the API
server over real HTTP on 127.0.0.1: the real ``kubernetes`` client builds, serializes and sends the requests, and the
tests check what it sent (method, path, content type, body) and what the objects look like afterwards.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kube_standin import MERGE, KubeApiStandIn, hpa_path, keda_path, scale_path
from kubernetes import client
from margin.budget.autoscaler.controller import Decision
from margin.budget.autoscaler.kube import (
    MIN_ANNOTATION,
    REASON_ANNOTATION,
    SCALED_AT_ANNOTATION,
    KubeScaler,
    LeaseElector,
    LeaseError,
    ScalingError,
    Target,
)
from margin.budget.autoscaler.planner import POOL_REASON_CHARS, Plan, Planner, pool_reason
from margin.budget.autoscaler.wiring import build_autoscaler, parse_targets, pool_applier
from margin.budget.fleet.tables import ServingDeploymentRow as DeploymentRow
from margin.budget.store import Budget, BudgetStore
from margin.common.config import ConfigError
from margin.common.db import make_engine, make_sessionmaker
from margin.common.tenancy import TenantStore
from sqlalchemy import update

NS = "serving"
HPA_PATH = hpa_path(NS, "resnet")
KEDA_PATH = keda_path(NS, "resnet")
SCALE_PATH = scale_path(NS, "resnet")
LEASES_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
LEASE_PATH = f"{LEASES_PATH}/margin-autoscaler"
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)  # whole seconds on purpose: MicroTime must keep ".000000"


@pytest.fixture
def stand_in() -> Iterator[KubeApiStandIn]:
    server = KubeApiStandIn().start()
    yield server
    server.stop()


@pytest.fixture
def api_client(stand_in: KubeApiStandIn) -> Iterator[client.ApiClient]:
    api = client.ApiClient(client.Configuration(host=stand_in.host))
    yield api
    api.close()


def hpa(min_replicas: int = 2, max_replicas: int = 10) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "resnet", "namespace": NS, "annotations": {"team": "vision"}},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "resnet"},
            "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}],
        },
    }


def scaled_object(max_count: int = 10, min_count: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": "resnet", "namespace": NS},
        "spec": {"scaleTargetRef": {"name": "resnet"}, "minReplicaCount": min_count, "maxReplicaCount": max_count,
                 "triggers": [{"type": "prometheus", "metadata": {"threshold": "50"}}]},
    }


def deployment_scale(replicas: int = 3) -> dict[str, Any]:
    return {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "resnet", "namespace": NS},
            "spec": {"replicas": replicas}, "status": {"replicas": replicas, "selector": "app=resnet"}}


def scaler(api_client: client.ApiClient | None) -> KubeScaler:
    return KubeScaler(api_client, clock=lambda: NOW)


# -- HPA ------------------------------------------------------------------------------------------------------------
def test_hpa_max_replicas_patched_with_reason(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(HPA_PATH, hpa(min_replicas=2, max_replicas=10))

    assert scaler(api_client).apply(Target("hpa", NS, "resnet"), 6, "budget: affordable 6 replicas") is True

    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", HPA_PATH), ("PATCH", HPA_PATH)]
    patch = stand_in.requests[1]
    assert patch.content_type == MERGE
    assert patch.body == {
        "metadata": {"annotations": {REASON_ANNOTATION: "budget: affordable 6 replicas",
                                     SCALED_AT_ANNOTATION: "2024-05-01T12:00:00Z"}},
        "spec": {"maxReplicas": 6},
    }
    stored = stand_in.objects[HPA_PATH]
    assert stored["spec"]["maxReplicas"] == 6 and stored["spec"]["minReplicas"] == 2
    assert stored["metadata"]["annotations"] == {"team": "vision", REASON_ANNOTATION: "budget: affordable 6 replicas",
                                                 SCALED_AT_ANNOTATION: "2024-05-01T12:00:00Z"}
    assert stored["spec"]["metrics"] == hpa()["spec"]["metrics"]  # the patch left the rest alone


def test_hpa_not_patched_when_already_at_value(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    before = stand_in.put_object(HPA_PATH, hpa(max_replicas=7))
    assert scaler(api_client).apply(Target("hpa", NS, "resnet"), 7, "demand 7") is False
    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", HPA_PATH)]
    assert stand_in.objects[HPA_PATH]["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_hpa_min_replicas_lowered_below_min(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(HPA_PATH, hpa(min_replicas=3, max_replicas=10))
    assert scaler(api_client).apply(Target("hpa", NS, "resnet"), 2, "budget: affordable 2") is True
    assert stand_in.requests_of("PATCH")[0].body["spec"] == {"maxReplicas": 2, "minReplicas": 2}
    assert stand_in.objects[HPA_PATH]["spec"]["minReplicas"] == 2
    assert stand_in.objects[HPA_PATH]["spec"]["maxReplicas"] == 2


def test_apply_decision_uses_chosen_and_reason(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(HPA_PATH, hpa())
    decision = Decision(demand=9, affordable=4, chosen=4, reason="budget")
    assert scaler(api_client).apply_decision(Target("hpa", NS, "resnet"), decision) is True
    assert stand_in.objects[HPA_PATH]["spec"]["maxReplicas"] == 4
    assert stand_in.objects[HPA_PATH]["metadata"]["annotations"][REASON_ANNOTATION] == "budget"


# -- KEDA, Deployment, report-only ----------------------------------------------------------------------------------
def test_keda_max_replica_count_merge_patched(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(KEDA_PATH, scaled_object(max_count=10))

    assert scaler(api_client).apply(Target("keda", NS, "resnet"), 4, "budget: affordable 4") is True

    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", KEDA_PATH), ("PATCH", KEDA_PATH)]
    patch = stand_in.requests[1]
    assert patch.content_type == MERGE  # custom resources take no strategic merge patch
    assert patch.body["spec"] == {"maxReplicaCount": 4}
    assert patch.body["metadata"]["annotations"][REASON_ANNOTATION] == "budget: affordable 4"
    stored = stand_in.objects[KEDA_PATH]
    assert stored["spec"]["maxReplicaCount"] == 4 and stored["spec"]["minReplicaCount"] == 1
    assert stored["spec"]["triggers"] == scaled_object()["spec"]["triggers"]

    stand_in.requests.clear()
    assert scaler(api_client).apply(Target("keda", NS, "resnet"), 4, "again") is False
    assert [r.method for r in stand_in.requests] == ["GET"]


def test_deployment_scale_subresource_patched(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(SCALE_PATH, deployment_scale(replicas=3))

    assert scaler(api_client).apply(Target("deployment", NS, "resnet"), 5, "demand 5") is True

    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", SCALE_PATH), ("PATCH", SCALE_PATH)]
    assert stand_in.requests[1].content_type == MERGE
    assert stand_in.requests[1].body == {"spec": {"replicas": 5}}
    assert stand_in.objects[SCALE_PATH]["spec"]["replicas"] == 5

    stand_in.requests.clear()
    assert scaler(api_client).apply(Target("deployment", NS, "resnet"), 5, "demand 5") is False
    assert [r.method for r in stand_in.requests] == ["GET"]


def test_report_only_sends_nothing(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    assert scaler(api_client).apply(Target("report-only"), 3, "demand 3") is False
    assert KubeScaler(None).apply(Target("report-only"), 3, "demand 3") is False  # locally: no client at all
    assert stand_in.requests == []


def test_target_validation() -> None:
    with pytest.raises(ValueError, match="unknown scaling target kind"):
        Target("statefulset", NS, "resnet")
    with pytest.raises(ValueError, match="namespace and a name"):
        Target("hpa")
    with pytest.raises(ScalingError, match="no Kubernetes API client"):
        KubeScaler(None).apply(Target("hpa", NS, "resnet"), 2, "x")


# -- the pool's floor: scale to zero (minimum 0) and back (minimum 1) -------------------------------------------------
KEDA = Target("keda", NS, "resnet")
HPA = Target("hpa", NS, "resnet")


def test_keda_floor_zero_then_back_restores_the_charts_min(stand_in: KubeApiStandIn,
                                                           api_client: client.ApiClient) -> None:
    stand_in.put_object(KEDA_PATH, scaled_object(max_count=6, min_count=2))  # the chart's minReplicas 2
    keda = scaler(api_client)

    # every deployment of the pool scaled to zero: KEDA may take the pool to 0, its ceiling stays >= 1
    assert keda.apply(KEDA, 0, "nothing loaded", minimum=0) is True
    patch = stand_in.requests_of("PATCH")[-1]
    assert patch.content_type == MERGE
    assert patch.body["spec"] == {"minReplicaCount": 0, "maxReplicaCount": 1}
    assert patch.body["metadata"]["annotations"][MIN_ANNOTATION] == "2"
    stored = stand_in.objects[KEDA_PATH]
    assert (stored["spec"]["minReplicaCount"], stored["spec"]["maxReplicaCount"]) == (0, 1)
    assert stored["metadata"]["annotations"][MIN_ANNOTATION] == "2"

    # the same again: read, nothing written
    version = stored["metadata"]["resourceVersion"]
    stand_in.requests.clear()
    assert keda.apply(KEDA, 0, "nothing loaded", minimum=0) is False
    assert [r.method for r in stand_in.requests] == ["GET"]
    assert stand_in.objects[KEDA_PATH]["metadata"]["resourceVersion"] == version

    # a deployment is loaded again: the chart's floor comes back and the annotation goes (null in the merge patch)
    stand_in.requests.clear()
    assert keda.apply(KEDA, 4, "demand 4", minimum=1) is True
    patch = stand_in.requests_of("PATCH")[-1]
    assert patch.body["spec"] == {"minReplicaCount": 2, "maxReplicaCount": 4}
    assert MIN_ANNOTATION in patch.body["metadata"]["annotations"]
    assert patch.body["metadata"]["annotations"][MIN_ANNOTATION] is None
    stored = stand_in.objects[KEDA_PATH]
    assert (stored["spec"]["minReplicaCount"], stored["spec"]["maxReplicaCount"]) == (2, 4)
    assert MIN_ANNOTATION not in stored["metadata"]["annotations"]
    assert stored["spec"]["triggers"] == scaled_object()["spec"]["triggers"]

    stand_in.requests.clear()
    assert keda.apply(KEDA, 4, "demand 4", minimum=1) is False
    assert [r.method for r in stand_in.requests] == ["GET"]


def test_keda_floor_zero_keeps_a_ceiling_of_at_least_one_and_the_replicas_above_it(
        stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(KEDA_PATH, scaled_object(max_count=6, min_count=1))
    assert scaler(api_client).apply(KEDA, 3, "draining", minimum=0) is True
    assert stand_in.requests_of("PATCH")[-1].body["spec"] == {"minReplicaCount": 0, "maxReplicaCount": 3}
    assert stand_in.objects[KEDA_PATH]["metadata"]["annotations"][MIN_ANNOTATION] == "1"


def test_keda_restored_floor_never_exceeds_the_ceiling_nor_falls_below_the_minimum(
        stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(KEDA_PATH, scaled_object(max_count=6, min_count=3))
    keda = scaler(api_client)
    assert keda.apply(KEDA, 0, "idle", minimum=0) is True
    # the budget pays for 1 replica: floor 1 (KEDA refuses min > max), the chart's 3 still remembered
    assert keda.apply(KEDA, 1, "budget: 1 affordable", minimum=1) is True
    stored = stand_in.objects[KEDA_PATH]
    assert (stored["spec"]["minReplicaCount"], stored["spec"]["maxReplicaCount"]) == (1, 1)
    assert stored["metadata"]["annotations"][MIN_ANNOTATION] == "3"
    # the budget pays for 5: the whole floor fits again
    assert keda.apply(KEDA, 5, "demand 5", minimum=1) is True
    stored = stand_in.objects[KEDA_PATH]
    assert (stored["spec"]["minReplicaCount"], stored["spec"]["maxReplicaCount"]) == (3, 5)
    assert MIN_ANNOTATION not in stored["metadata"]["annotations"]


def test_keda_without_a_floor_leaves_min_and_the_annotation_alone(stand_in: KubeApiStandIn,
                                                                  api_client: client.ApiClient) -> None:
    obj = scaled_object(max_count=6, min_count=0)
    obj["metadata"]["annotations"] = {MIN_ANNOTATION: "2"}
    stand_in.put_object(KEDA_PATH, obj)
    assert scaler(api_client).apply(KEDA, 4, "demand 4") is True  # minimum None: the old behaviour
    assert stand_in.requests_of("PATCH")[-1].body["spec"] == {"maxReplicaCount": 4}
    stored = stand_in.objects[KEDA_PATH]
    assert stored["spec"]["minReplicaCount"] == 0 and stored["metadata"]["annotations"][MIN_ANNOTATION] == "2"


def test_hpa_floor_zero_keeps_one_replica_and_restores_the_charts_min(
        stand_in: KubeApiStandIn, api_client: client.ApiClient, caplog: pytest.LogCaptureFixture) -> None:
    stand_in.put_object(HPA_PATH, hpa(min_replicas=2, max_replicas=10))
    hpas = scaler(api_client)
    caplog.set_level(logging.WARNING, logger="margin.budget.autoscaler.kube")

    # replicas 0 on an HPA: maxReplicas 1 (not 0, which the API server rejects under minReplicas >= 1)
    assert hpas.apply(HPA, 0, "nothing loaded", minimum=0) is True
    patch = stand_in.requests_of("PATCH")[-1]
    assert patch.body["spec"] == {"maxReplicas": 1, "minReplicas": 1}
    annotations = patch.body["metadata"]["annotations"]
    assert annotations[MIN_ANNOTATION] == "2"
    assert annotations[REASON_ANNOTATION].startswith("nothing loaded; the HPA keeps 1 replica")
    assert "HPAScaleToZero" in annotations[REASON_ANNOTATION]
    stored = stand_in.objects[HPA_PATH]["spec"]
    assert (stored["minReplicas"], stored["maxReplicas"]) == (1, 1)

    # ticks later: no write while nothing changes; the warning was logged once, not every tick
    stand_in.requests.clear()
    for _ in range(3):
        assert hpas.apply(HPA, 0, "nothing loaded", minimum=0) is False
    assert [r.method for r in stand_in.requests] == ["GET"] * 3
    assert hpas.apply(HPA, 2, "draining", minimum=0) is True  # a write, still no second warning
    kept = [r for r in caplog.records if "HPAScaleToZero" in r.getMessage()]
    assert len(kept) == 1 and kept[0].levelno == logging.WARNING
    assert "hpa serving/resnet" in kept[0].getMessage() and "keeps one replica" in kept[0].getMessage()

    # back to a floor of 1: the chart's minReplicas 2 returns, the annotation goes
    assert hpas.apply(HPA, 4, "demand 4", minimum=1) is True
    patch = stand_in.requests_of("PATCH")[-1]
    assert patch.body["spec"] == {"maxReplicas": 4, "minReplicas": 2}
    assert patch.body["metadata"]["annotations"][MIN_ANNOTATION] is None
    stored = stand_in.objects[HPA_PATH]
    assert (stored["spec"]["minReplicas"], stored["spec"]["maxReplicas"]) == (2, 4)
    assert MIN_ANNOTATION not in stored["metadata"]["annotations"]
    assert stored["metadata"]["annotations"]["team"] == "vision"
    assert "HPAScaleToZero" not in stored["metadata"]["annotations"][REASON_ANNOTATION]

    # a floor of 0 again, after a floor of 1: logged again (once)
    assert hpas.apply(HPA, 0, "idle again", minimum=0) is True
    assert len([r for r in caplog.records if "HPAScaleToZero" in r.getMessage()]) == 2


def test_hpa_with_a_floor_of_one_at_min_one_needs_no_annotation(stand_in: KubeApiStandIn,
                                                                api_client: client.ApiClient) -> None:
    stand_in.put_object(HPA_PATH, hpa(min_replicas=1, max_replicas=5))
    hpas = scaler(api_client)
    assert hpas.apply(HPA, 0, "nothing loaded", minimum=0) is True
    patch = stand_in.requests_of("PATCH")[-1]
    assert patch.body["spec"] == {"maxReplicas": 1}
    assert MIN_ANNOTATION not in patch.body["metadata"]["annotations"]
    assert MIN_ANNOTATION not in stand_in.objects[HPA_PATH]["metadata"]["annotations"]
    stand_in.requests.clear()
    assert hpas.apply(HPA, 1, "demand 1", minimum=1) is False  # max 1, min 1 already: nothing to write
    assert [r.method for r in stand_in.requests] == ["GET"]


def test_deployment_goes_to_zero_and_back(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(SCALE_PATH, deployment_scale(replicas=2))
    deployment = Target("deployment", NS, "resnet")
    plain = scaler(api_client)
    assert plain.apply(deployment, 0, "nothing loaded", minimum=0) is True
    assert stand_in.requests_of("PATCH")[-1].body == {"spec": {"replicas": 0}}
    assert stand_in.objects[SCALE_PATH]["spec"]["replicas"] == 0
    stand_in.requests.clear()
    assert plain.apply(deployment, 0, "nothing loaded", minimum=0) is False
    assert [r.method for r in stand_in.requests] == ["GET"]
    assert plain.apply(deployment, 3, "demand 3", minimum=1) is True
    assert stand_in.requests_of("PATCH")[-1].body == {"spec": {"replicas": 3}}
    assert stand_in.objects[SCALE_PATH]["spec"]["replicas"] == 3


def test_pool_applier_passes_the_floor_through(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.put_object(KEDA_PATH, scaled_object(max_count=6, min_count=2))
    apply = pool_applier(scaler(api_client), "keda", NS)
    assert apply("resnet", 0, "nothing loaded", 0) is True
    assert stand_in.objects[KEDA_PATH]["spec"]["minReplicaCount"] == 0
    assert apply("resnet", 3, "demand 3") is True  # the floor defaults to 1: restored
    assert stand_in.objects[KEDA_PATH]["spec"]["minReplicaCount"] == 2
    assert stand_in.objects[KEDA_PATH]["spec"]["maxReplicaCount"] == 3


@pytest.mark.parametrize("minimum", [-1, True, 1.0, "1"])
def test_a_bad_floor_is_refused(minimum: Any) -> None:
    with pytest.raises(ValueError, match="minimum must be None or a non-negative int"):
        KubeScaler(None).apply(Target("report-only"), 1, "x", minimum)


# -- errors ---------------------------------------------------------------------------------------------------------
def test_missing_object_is_a_scaling_error(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    with pytest.raises(ScalingError, match=r"HTTP 404 Not Found") as caught:
        scaler(api_client).apply(Target("hpa", NS, "resnet"), 3, "demand 3")
    assert caught.value.status == 404
    assert "hpa serving/resnet" in str(caught.value)
    assert stand_in.requests_of("PATCH") == []


@pytest.mark.parametrize("method", ["GET", "PATCH"])
def test_forbidden_is_a_scaling_error(stand_in: KubeApiStandIn, api_client: client.ApiClient, method: str) -> None:
    stand_in.put_object(KEDA_PATH, scaled_object())
    stand_in.errors[(method, KEDA_PATH)] = (
        403, "Forbidden", 'scaledobjects.keda.sh "resnet" is forbidden: User "system:serviceaccount:serving:margin" '
        'cannot patch resource "scaledobjects"')
    with pytest.raises(ScalingError, match=r"HTTP 403 Forbidden: scaledobjects\.keda\.sh") as caught:
        scaler(api_client).apply(Target("keda", NS, "resnet"), 3, "demand 3")
    assert caught.value.status == 403 and caught.value.reason == "Forbidden"


def test_unreachable_api_server_is_a_scaling_error(stand_in: KubeApiStandIn) -> None:
    stand_in.stop()
    config = client.Configuration(host=stand_in.host)
    config.retries = 0
    with client.ApiClient(config) as api, pytest.raises(ScalingError, match="unreachable") as caught:
        scaler(api).apply(Target("deployment", NS, "resnet"), 3, "demand 3")
    assert caught.value.status is None


# -- leader election ------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def elector(api_client: client.ApiClient, identity: str, clock: Clock) -> LeaseElector:
    return LeaseElector(api_client, NS, "margin-autoscaler", identity, lease_duration_s=15, clock=clock)


def test_lease_election_create_hold_expire_take_over(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    clock = Clock(NOW)
    a, b = elector(api_client, "autoscaler-a", clock), elector(api_client, "autoscaler-b", clock)

    assert a.try_acquire_or_renew() is True
    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", LEASE_PATH), ("POST", LEASES_PATH)]
    created = stand_in.requests[1]
    assert created.content_type == "application/json"
    assert created.body["spec"] == {"holderIdentity": "autoscaler-a", "leaseDurationSeconds": 15,
                                    "acquireTime": "2024-05-01T12:00:00.000000Z",
                                    "renewTime": "2024-05-01T12:00:00.000000Z", "leaseTransitions": 0}

    clock.now = NOW + timedelta(seconds=5)
    assert b.try_acquire_or_renew() is False  # fresh lease held by a
    assert a.try_acquire_or_renew() is True   # renew
    lease = stand_in.objects[LEASE_PATH]
    assert lease["spec"]["holderIdentity"] == "autoscaler-a"
    assert lease["spec"]["renewTime"] == "2024-05-01T12:00:05.000000Z"
    assert lease["spec"]["acquireTime"] == "2024-05-01T12:00:00.000000Z"
    renew = stand_in.requests_of("PUT")[-1]
    assert renew.path == LEASE_PATH and renew.content_type == "application/json"
    assert renew.body["metadata"]["resourceVersion"]  # optimistic concurrency

    clock.now = NOW + timedelta(seconds=5 + 14)
    assert b.try_acquire_or_renew() is False  # renewTime + 15 s not passed yet
    clock.now = NOW + timedelta(seconds=5 + 16)  # a stopped renewing: expired
    assert b.try_acquire_or_renew() is True
    lease = stand_in.objects[LEASE_PATH]["spec"]
    assert lease["holderIdentity"] == "autoscaler-b" and lease["leaseTransitions"] == 1
    assert lease["acquireTime"] == lease["renewTime"] == "2024-05-01T12:00:21.000000Z"
    assert a.try_acquire_or_renew() is False and a.is_leader is False
    assert b.is_leader is True


def test_lease_concurrent_update_loses_without_error(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    clock = Clock(NOW)
    assert elector(api_client, "autoscaler-a", clock).try_acquire_or_renew() is True
    clock.now = NOW + timedelta(seconds=60)  # expired: both b and c go for it

    def c_wins() -> None:  # c's update lands between b's read and b's write
        lease = json.loads(json.dumps(stand_in.objects[LEASE_PATH]))
        lease["spec"]["holderIdentity"] = "autoscaler-c"
        stand_in.put_object(LEASE_PATH, lease)

    stand_in.before[("PUT", LEASE_PATH)] = c_wins
    assert elector(api_client, "autoscaler-b", clock).try_acquire_or_renew() is False
    assert stand_in.objects[LEASE_PATH]["spec"]["holderIdentity"] == "autoscaler-c"


def test_lease_create_race_loses_without_error(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    clock = Clock(NOW)
    assert elector(api_client, "autoscaler-a", clock).try_acquire_or_renew() is True
    stand_in.errors[("GET", LEASE_PATH)] = (404, "NotFound", "not found")  # b read before a created it
    assert elector(api_client, "autoscaler-b", clock).try_acquire_or_renew() is False
    assert stand_in.requests[-1].method == "POST"
    assert stand_in.objects[LEASE_PATH]["spec"]["holderIdentity"] == "autoscaler-a"


def test_lease_forbidden_is_an_error(stand_in: KubeApiStandIn, api_client: client.ApiClient) -> None:
    stand_in.errors[("GET", LEASE_PATH)] = (403, "Forbidden", "cannot get resource leases")
    with pytest.raises(LeaseError, match="HTTP 403 Forbidden"):
        elector(api_client, "autoscaler-a", Clock(NOW)).try_acquire_or_renew()


# -- pools: the planner sets each Triton pool's object to the sum over the deployments it serves ---------------------
CPU_POOL, L4_POOL = "margin-triton-cpu", "margin-triton-nvidia-l4"
TARGETS = {"cpu": CPU_POOL, "nvidia-l4": L4_POOL}
MID_MONTH = datetime(2026, 3, 15, 12, 0, 0, tzinfo=UTC).timestamp()


class TritonMetrics:
    """Triton's /metrics endpoint: cumulative request counters per model, set by the test between ticks."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = "".join(f'nv_inference_request_success{{model="{m}",version="1"}} {n}\n'
                               f'nv_inference_queue_duration_us{{model="{m}",version="1"}} 0\n'
                               for m, n in metrics.requests.items()).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Pools:
    planner: Planner
    clock: list[float]
    triton: TritonMetrics
    sessions: Any
    tenants: dict[str, int]


@pytest.fixture
def pools(tmp_path, stand_in: KubeApiStandIn, api_client: client.ApiClient) -> Iterator[Pools]:
    """Two tenants' deployments over a real SQLite database: two on "cpu" (one per tenant), one on "nvidia-l4" and
    one on "nvidia-a100", which has no pool target; the two pools' HPAs in the stand-in API server."""
    engine = make_engine(f"sqlite:///{tmp_path / 'margin.db'}")
    sessions = make_sessionmaker(engine)
    tenancy, budgets = TenantStore(sessions), BudgetStore(sessions)
    tenants = {name: tenancy.create_tenant(name).id for name in ("acme", "other")}
    # 'other' has 0.30 $ of serving budget left: bert's 1 $/h replicas are cut to the one it can pay for
    budgets.set_budget(Budget(tenant_id=tenants["other"], period="monthly", total_micros=300_000))
    with sessions.begin() as s:
        for tenant, name, device_class, capacity, minimum, price in (
                ("acme", "digits-v2", "cpu", 100.0, 1, 100_000),
                ("other", "bert-v3", "cpu", 20.0, 2, 1_000_000),
                ("acme", "resnet-v1", "nvidia-l4", 50.0, 1, 800_000),
                ("acme", "llama-v1", "nvidia-a100", 10.0, 1, 4_000_000)):
            tid = tenants[tenant]
            s.add(DeploymentRow(tenant_id=tid, name=name, triton_name=f"t{tid}--{name}", model=name.split("-")[0],
                                version=int(name[-1]), state="READY", device_class=device_class, capacity_rps=capacity,
                                min_replicas=minimum, max_replicas=10, price_micros_per_hour=price))
    for pool, minimum in ((CPU_POOL, 2), (L4_POOL, 1)):
        obj = hpa(min_replicas=minimum, max_replicas=10)
        obj["metadata"]["name"] = obj["spec"]["scaleTargetRef"]["name"] = pool
        stand_in.put_object(hpa_path(NS, pool), obj)
    triton, clock = TritonMetrics(), [MID_MONTH]
    planner = Planner(sessions, budgets, triton.url, "hpa", pool_applier(scaler(api_client), "hpa", NS),
                      clock=lambda: clock[0], targets=TARGETS)
    yield Pools(planner, clock, triton, sessions, tenants)
    triton.stop()
    engine.dispose()


def test_each_pool_gets_the_sum_of_its_deployments_replicas(pools: Pools, stand_in: KubeApiStandIn) -> None:
    cpu, l4 = hpa_path(NS, CPU_POOL), hpa_path(NS, L4_POOL)
    acme, other = pools.tenants["acme"], pools.tenants["other"]
    models = {f"t{acme}--digits-v2": 0, f"t{other}--bert-v3": 0, f"t{acme}--resnet-v1": 0, f"t{acme}--llama-v1": 0}
    pools.triton.requests = dict(models)
    plans = {p.deployment: p for p in pools.planner.tick()}  # no interval yet: every deployment at its minimum
    assert {d: p.chosen for d, p in plans.items()} == {"digits-v2": 1, "bert-v3": 1, "resnet-v1": 1, "llama-v1": 1}
    assert plans["bert-v3"].reason.startswith("budget: 1 replicas affordable")  # chosen, not wanted (its minimum 2)
    assert stand_in.objects[cpu]["spec"]["maxReplicas"] == 2  # 1 + 1
    assert stand_in.objects[l4]["spec"]["maxReplicas"] == 1

    # 10 s later: digits 200 rps (3 replicas at 100 rps × 0.7), resnet 100 rps (3 at 50 × 0.7), bert 30 rps (wants 3,
    # can pay for 1), llama 100 rps (15 wanted, its maximum 10, on a class without a pool)
    pools.clock[0] += 10
    pools.triton.requests = {f"t{acme}--digits-v2": 2000, f"t{other}--bert-v3": 300, f"t{acme}--resnet-v1": 1000,
                             f"t{acme}--llama-v1": 1000}
    stand_in.requests.clear()
    plans = {p.deployment: p for p in pools.planner.tick()}
    assert {d: p.chosen for d, p in plans.items()} == {"digits-v2": 3, "bert-v3": 1, "resnet-v1": 3, "llama-v1": 10}
    assert stand_in.objects[cpu]["spec"]["maxReplicas"] == 4 == plans["digits-v2"].pool_replicas  # 3 + 1
    assert stand_in.objects[l4]["spec"]["maxReplicas"] == 3 == plans["resnet-v1"].pool_replicas
    assert stand_in.objects[cpu]["spec"]["minReplicas"] == 2  # the pool's own floor left alone (2 <= 4)
    assert [(r.method, r.path) for r in stand_in.requests] == [("GET", cpu), ("PATCH", cpu), ("GET", l4),
                                                               ("PATCH", l4)]
    assert all(r.content_type == MERGE for r in stand_in.requests_of("PATCH"))
    reason = stand_in.objects[cpu]["metadata"]["annotations"][REASON_ANNOTATION]
    assert reason.startswith(f"{CPU_POOL}: 4 = sum over 2 deployment(s) on cpu: t{acme}--digits-v2 3 (demand 3")
    assert f"t{other}--bert-v3 1 (budget: 1 replicas affordable" in reason
    assert plans["digits-v2"].applied and plans["bert-v3"].applied and plans["resnet-v1"].applied
    assert (plans["digits-v2"].pool, plans["resnet-v1"].pool) == (CPU_POOL, L4_POOL)

    # the class without a target: reported, never sent to Kubernetes
    llama = plans["llama-v1"]
    assert not llama.applied and llama.pool == "" and llama.demand == 15
    assert llama.reason.endswith("; not applied: no pool target for device class nvidia-a100")
    assert not [r for r in stand_in.requests if "a100" in r.path or "llama" in r.path]
    assert set(stand_in.objects) == {cpu, l4}

    # the same sums again: read, nothing written
    stand_in.requests.clear()
    pools.clock[0] += 10
    pools.triton.requests = {m: n * 2 for m, n in pools.triton.requests.items()}
    assert {p.deployment: p.applied for p in pools.planner.tick()} == dict.fromkeys(plans, False)
    assert [r.method for r in stand_in.requests] == ["GET", "GET"]

    # GetScalingPlan for one tenant: its plans only, but the pool still sums over every tenant
    stand_in.requests.clear()
    pools.clock[0] += 10
    pools.triton.requests = {m: n + (n // 2) for m, n in pools.triton.requests.items()}
    plan = pools.planner.plan(acme, "digits-v2")
    assert plan.deployment == "digits-v2" and plan.pool_replicas == 4
    assert stand_in.requests == [], "GetScalingPlan (any replica, leader or not) computes; only the loop acts"
    assert [p.tenant_id for p in pools.planner.tick(other)] == [other]
    assert stand_in.objects[cpu]["spec"]["maxReplicas"] == 4
    assert stand_in.requests_of("PATCH") == []


def test_a_pool_with_no_ready_deployment_goes_to_its_minimum(pools: Pools, stand_in: KubeApiStandIn) -> None:
    pools.planner.tick()
    assert stand_in.objects[hpa_path(NS, L4_POOL)]["spec"]["maxReplicas"] == 1
    grown = json.loads(json.dumps(stand_in.objects[hpa_path(NS, L4_POOL)]))
    grown["spec"]["maxReplicas"] = 6
    stand_in.put_object(hpa_path(NS, L4_POOL), grown)
    with pools.sessions.begin() as s:  # resnet undeployed: nothing left on the l4 pool
        s.execute(update(DeploymentRow).where(DeploymentRow.name == "resnet-v1").values(state="DELETED"))
    pools.planner.tick()
    l4 = stand_in.objects[hpa_path(NS, L4_POOL)]
    assert l4["spec"]["maxReplicas"] == 1
    assert l4["metadata"]["annotations"][REASON_ANNOTATION] == f"{L4_POOL}: minimum 1: no ready deployment to serve"


def test_a_failing_pool_does_not_stop_the_others(pools: Pools, stand_in: KubeApiStandIn) -> None:
    stand_in.errors[("GET", hpa_path(NS, CPU_POOL))] = (403, "Forbidden", "cannot get horizontalpodautoscalers")
    plans = {p.deployment: p for p in pools.planner.tick()}
    assert not plans["digits-v2"].applied and not plans["bert-v3"].applied
    assert plans["resnet-v1"].applied and stand_in.objects[hpa_path(NS, L4_POOL)]["spec"]["maxReplicas"] == 1
    del stand_in.errors[("GET", hpa_path(NS, CPU_POOL))]
    pools.planner.tick()  # retried on the next tick, not only when the sum changes
    assert stand_in.objects[hpa_path(NS, CPU_POOL)]["spec"]["maxReplicas"] == 2


def test_a_long_pool_reason_is_truncated_and_counts_the_rest() -> None:
    rows = [DeploymentRow(triton_name=f"t1--model-{i:03d}-v1", device_class="cpu") for i in range(60)]
    served = [(row, Plan(1, row.triton_name[4:], 1, 2, None, 1, 2, "demand 2 (" + "x" * 200 + ")", 0, None, 1.0,
                         1.0, 1.0, 0.0, "hpa", False, datetime(2026, 1, 1, tzinfo=UTC))) for row in rows]
    reason = pool_reason(CPU_POOL, 120, served)
    assert len(reason) <= POOL_REASON_CHARS and reason.startswith(f"{CPU_POOL}: 120 = sum over 60 deployment(s)")
    shown = reason.count("t1--model-")
    assert 0 < shown < 60 and reason.endswith(f"; … and {60 - shown} more")
    assert f"t1--model-000-v1 2 (demand 2 ({'x' * 100}" in reason  # each part clipped, not dropped


# -- MARGIN_AUTOSCALER_TARGETS --------------------------------------------------------------------------------------
def test_targets_parse() -> None:
    assert parse_targets(json.dumps(TARGETS), "hpa") == TARGETS
    assert parse_targets('{"cpu": "pools.margin-triton-cpu"}', "keda") == {"cpu": "pools.margin-triton-cpu"}


@pytest.mark.parametrize(("raw", "fragment"), [
    ("", "MARGIN_AUTOSCALER_TARGETS is not set but MARGIN_AUTOSCALER_TARGET=hpa"),
    ("{}", "is an empty object"),
    ("{cpu: margin-triton-cpu}", "is not valid JSON"),
    ('["margin-triton-cpu"]', "must be a JSON object"),
    ('{"cpu": 3}', "must be named by a string"),
    ('{"cpu": null}', "must be named by a string"),
    ('{"cpu": "Margin_Triton"}', "'Margin_Triton' (device class 'cpu') is not a valid Kubernetes object name"),
    ('{"cpu": "-pool"}', "not a valid Kubernetes object name"),
    ('{"cpu": "' + "a" * 254 + '"}', "not a valid Kubernetes object name"),
    ('{"": "pool"}', "empty or has surrounding spaces"),
    ('{"cpu": "a", "cpu": "b"}', "given twice"),
])
def test_bad_targets_are_a_configuration_error(raw: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_targets(raw, "hpa")
    assert fragment in str(err.value) and "MARGIN_AUTOSCALER_TARGETS" in str(err.value)


def test_a_cluster_kind_without_targets_refuses_to_start(monkeypatch, tmp_path) -> None:
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'margin.db'}"))
    monkeypatch.setenv("MARGIN_AUTOSCALER_TARGET", "keda")
    monkeypatch.delenv("MARGIN_AUTOSCALER_TARGETS", raising=False)
    with pytest.raises(ConfigError, match="MARGIN_AUTOSCALER_TARGETS is not set but MARGIN_AUTOSCALER_TARGET=keda"):
        build_autoscaler(sessions, BudgetStore(sessions))
    monkeypatch.setenv("MARGIN_AUTOSCALER_TARGETS", '{"cpu": "UPPER"}')
    with pytest.raises(ConfigError, match="not a valid Kubernetes object name"):
        build_autoscaler(sessions, BudgetStore(sessions))
    monkeypatch.setenv("MARGIN_AUTOSCALER_TARGET", "report-only")  # report-only: as always, no map needed
    planner, _ = build_autoscaler(sessions, BudgetStore(sessions))
    assert planner.target_kind == "report-only" and planner.targets == {}
