"""A pool's floor (scale to zero and back) applied by the budget autoscaler's Kubernetes adapter to the objects the
chart renders, through the real ``kubernetes`` client against the Kubernetes API stand-in (tests/kube_standin.py;
there is no Kubernetes here).

Checks that the patched ScaledObjects / HPAs still validate (KEDA's documented spec, the Kubernetes 1.35 schemas),
hold a floor no higher than their ceiling, stay within the chart's Role (get + patch only), and come back to exactly
the chart's spec once a deployment needs a replica again.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart import CHART, env_of, named, render, validate_builtin, validate_scaled_object
from kube_standin import KubeApiStandIn, hpa_path, keda_path
from kubernetes import client
from margin.budget.autoscaler.kube import MIN_ANNOTATION, KubeScaler, Target

NAMESPACE = "serving"


@pytest.fixture
def api() -> Iterator[KubeApiStandIn]:
    standin = KubeApiStandIn().start()
    yield standin
    standin.stop()


@pytest.fixture
def api_client(api: KubeApiStandIn) -> Iterator[client.ApiClient]:
    with client.ApiClient(client.Configuration(host=api.host)) as api_client:
        yield api_client


def _plain(obj: dict[str, Any]) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))
    obj["metadata"].pop("resourceVersion", None)
    return obj


def _role_allows(role: dict[str, Any], group: str, resource: str, verb: str, name: str) -> bool:
    return any(group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
               and name in rule.get("resourceNames", [name]) for rule in role["rules"])


def test_keda_pools_go_to_zero_and_back_to_the_charts_floor(api: KubeApiStandIn, api_client: client.ApiClient) -> None:
    objs = render(CHART / "ci" / "keda-values.yaml", namespace=NAMESPACE)
    targets = json.loads(env_of(named(objs, "Deployment", "margin-budget"))["MARGIN_AUTOSCALER_TARGETS"])
    charted = {name: named(objs, "ScaledObject", name) for name in targets.values()}
    assert {o["spec"]["minReplicaCount"] for o in charted.values()} == {1, 2}  # the ci values' two floors
    for name, obj in charted.items():
        api.put_object(keda_path(NAMESPACE, name), obj)
    scaler = KubeScaler(api_client)

    for name in charted:
        assert scaler.apply(Target("keda", NAMESPACE, name), 0, "every deployment scaled to zero", minimum=0)
        obj = _plain(api.objects[keda_path(NAMESPACE, name)])
        validate_scaled_object(obj)
        assert (obj["spec"]["minReplicaCount"], obj["spec"]["maxReplicaCount"]) == (0, 1)
        assert obj["metadata"]["annotations"][MIN_ANNOTATION] == str(charted[name]["spec"]["minReplicaCount"])

    for name in charted:
        ceiling = charted[name]["spec"]["maxReplicaCount"]
        assert scaler.apply(Target("keda", NAMESPACE, name), ceiling, "demand", minimum=1)
        obj = _plain(api.objects[keda_path(NAMESPACE, name)])
        validate_scaled_object(obj)
        assert obj["spec"] == charted[name]["spec"]  # the chart's floor and ceiling, nothing else touched
        assert MIN_ANNOTATION not in obj["metadata"]["annotations"]

    role = named(objs, "Role", "margin-autoscaler")
    for recorded in api.requests:
        name = recorded.path.rsplit("/", 1)[-1]
        verb = {"GET": "get", "PATCH": "patch"}[recorded.method]
        assert _role_allows(role, "keda.sh", "scaledobjects", verb, name), (verb, name)


def test_hpa_pools_keep_one_replica_and_stay_valid(api: KubeApiStandIn, api_client: client.ApiClient,
                                                   tmp_path: Path) -> None:
    values = yaml.safe_load((CHART / "ci" / "gpu-pools-values.yaml").read_text())
    values["triton"]["pools"][1]["autoscaling"]["minReplicas"] = 2  # the l4 pool: a floor above the HPA's least
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    objs = render(tmp_path / "values.yaml", namespace=NAMESPACE)
    targets = json.loads(env_of(named(objs, "Deployment", "margin-budget"))["MARGIN_AUTOSCALER_TARGETS"])
    charted = {name: named(objs, "HorizontalPodAutoscaler", name) for name in targets.values()}
    assert sorted(o["spec"]["minReplicas"] for o in charted.values()) == [1, 2]
    for name, obj in charted.items():
        api.put_object(hpa_path(NAMESPACE, name), obj)
    scaler = KubeScaler(api_client)

    for name in charted:
        scaler.apply(Target("hpa", NAMESPACE, name), 0, "every deployment scaled to zero", minimum=0)
        obj = _plain(api.objects[hpa_path(NAMESPACE, name)])
        assert (obj["spec"]["minReplicas"], obj["spec"]["maxReplicas"]) == (1, 1)
        remembered = obj["metadata"]["annotations"].get(MIN_ANNOTATION)
        assert remembered == (None if charted[name]["spec"]["minReplicas"] == 1 else "2")
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(obj))
        result = validate_builtin(path)
        assert result.returncode == 0, result.stdout + result.stderr

    for name in charted:
        spec = charted[name]["spec"]
        scaler.apply(Target("hpa", NAMESPACE, name), spec["maxReplicas"], "demand", minimum=1)
        obj = _plain(api.objects[hpa_path(NAMESPACE, name)])
        assert obj["spec"] == spec
        assert MIN_ANNOTATION not in obj["metadata"]["annotations"]
