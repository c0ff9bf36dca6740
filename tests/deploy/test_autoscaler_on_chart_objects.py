"""The budget autoscaler's Kubernetes adapter against the objects the chart renders (issue #6 meets #7).

The chart's HPAs / ScaledObjects are loaded into the Kubernetes API stand-in (there is no Kubernetes here; see
tests/kube_standin.py), the real ``kubernetes`` client in :class:`KubeScaler` and :class:`LeaseElector` acts on them
by the names the chart hands the budget service (MARGIN_AUTOSCALER_TARGETS), and the test checks that
- every request the adapter sends is allowed by the chart's Role for the autoscaler (group, resource, verb, name),
- the patched objects still validate against the Kubernetes schemas / KEDA's spec and carry the new ceiling.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from chart import CHART, env_of, named, of_kind, render, validate_builtin, validate_scaled_object
from kube_standin import KubeApiStandIn, hpa_path, keda_path
from kubernetes import client
from margin.budget.autoscaler.kube import KubeScaler, LeaseElector, Target
from margin.budget.autoscaler.wiring import LEASE_NAME

NAMESPACE = "serving"
REQUEST = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)"
                     r"(/(?P<name>[^/]+))?$")
VERBS = {"GET": "get", "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}


@pytest.fixture
def api() -> Iterator[KubeApiStandIn]:
    standin = KubeApiStandIn().start()
    yield standin
    standin.stop()


def _client(standin: KubeApiStandIn) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = standin.host
    return client.ApiClient(configuration)


def allowed(role: dict, group: str, resource: str, verb: str, name: str | None) -> bool:
    for rule in role["rules"]:
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            names = rule.get("resourceNames")
            if not names or (name is not None and name in names):
                return True
    return False


def _check_every_request_is_allowed(standin: KubeApiStandIn, role: dict) -> None:
    assert standin.requests
    for recorded in standin.requests:
        match = REQUEST.match(recorded.path)
        assert match, recorded.path
        assert match["ns"] == NAMESPACE
        verb = VERBS[recorded.method]
        assert allowed(role, match["group"], match["resource"], verb, match["name"]), \
            f"the chart's Role does not allow {verb} {match['group']}/{match['resource']}/{match['name']}"


@pytest.mark.parametrize("values,kind", [("gpu-pools-values.yaml", "hpa"), ("keda-values.yaml", "keda")])
def test_the_adapter_scales_the_charts_objects_within_the_charts_rbac(api: KubeApiStandIn, values: str, kind: str,
                                                                      tmp_path: Path) -> None:
    objs = render(CHART / "ci" / values, namespace=NAMESPACE)
    budget = env_of(named(objs, "Deployment", "margin-budget"))
    assert budget["MARGIN_AUTOSCALER_TARGET"] == kind
    assert budget["MARGIN_AUTOSCALER_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    targets = json.loads(budget["MARGIN_AUTOSCALER_TARGETS"])
    assert len(targets) == 2
    kind_name, path_of = ("HorizontalPodAutoscaler", hpa_path) if kind == "hpa" else ("ScaledObject", keda_path)
    for name in targets.values():
        api.put_object(path_of(NAMESPACE, name), named(objs, kind_name, name))

    api_client = _client(api)
    scaler = KubeScaler(api_client)
    wanted = {}
    for i, name in enumerate(sorted(targets.values())):
        current = named(objs, kind_name, name)["spec"]
        ceiling = (current["maxReplicas"] if kind == "hpa" else current["maxReplicaCount"]) + 1 + i
        wanted[name] = ceiling
        assert scaler.apply(Target(kind, NAMESPACE, name), ceiling, "serving budget affords more") is True
    elector = LeaseElector(api_client, NAMESPACE, LEASE_NAME, "margin-budget-0")
    assert elector.try_acquire_or_renew() is True   # creates the Lease
    assert elector.try_acquire_or_renew() is True   # renews it (get + update)

    role = named(objs, "Role", "margin-autoscaler")
    _check_every_request_is_allowed(api, role)
    assert {r.method for r in api.requests} == {"GET", "PATCH", "POST", "PUT"}
    binding = named(objs, "RoleBinding", "margin-autoscaler")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "margin-autoscaler", "namespace": NAMESPACE}]
    assert named(objs, "Deployment", "margin-budget")["spec"]["template"]["spec"]["serviceAccountName"] == \
        "margin-autoscaler"

    # the objects after the patches: still valid, with the new ceilings and the reason
    patched = [api.objects[path_of(NAMESPACE, name)] for name in sorted(targets.values())]
    for obj in patched:
        obj = json.loads(json.dumps(obj))
        obj["metadata"].pop("resourceVersion", None)
        name = obj["metadata"]["name"]
        field = "maxReplicas" if kind == "hpa" else "maxReplicaCount"
        assert obj["spec"][field] == wanted[name]
        assert obj["metadata"]["annotations"]["margin.dev/scaling-reason"] == "serving budget affords more"
        if kind == "hpa":
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(obj))
            result = validate_builtin(path)
            assert result.returncode == 0, result.stdout + result.stderr
        else:
            validate_scaled_object(obj)


def test_the_role_grants_nothing_beyond_what_the_adapter_needs() -> None:
    for values in ("gpu-pools-values.yaml", "keda-values.yaml"):
        objs = render(CHART / "ci" / values)
        role = named(objs, "Role", "margin-autoscaler")
        verbs = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
                 for v in rule["verbs"]}
        scaled = ("autoscaling", "horizontalpodautoscalers") if "gpu" in values else ("keda.sh", "scaledobjects")
        assert verbs == {(*scaled, "get"), (*scaled, "patch"), ("coordination.k8s.io", "leases", "get"),
                         ("coordination.k8s.io", "leases", "update"), ("coordination.k8s.io", "leases", "create")}
        pinned = next(rule for rule in role["rules"] if rule["apiGroups"] == [scaled[0]])
        pools = [o["metadata"]["name"] for o in of_kind(objs, "Deployment") if o["metadata"]["name"].startswith(
            "margin-triton-")]
        assert sorted(pinned["resourceNames"]) == sorted(pools)
        assert not of_kind(objs, "ClusterRole") and not of_kind(objs, "ClusterRoleBinding")


def test_a_cluster_without_the_autoscaler_renders_no_rbac_and_a_report_only_budget_service(tmp_path: Path) -> None:
    values = tmp_path / "off.yaml"
    values.write_text(yaml.safe_dump({"autoscaler": {"enabled": False}}))
    objs = render(values)
    assert not of_kind(objs, "Role") and not of_kind(objs, "RoleBinding")
    budget = named(objs, "Deployment", "margin-budget")
    assert env_of(budget)["MARGIN_AUTOSCALER_TARGET"] == "report-only"
    assert budget["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
