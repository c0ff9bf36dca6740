"""The Helm chart, checked with the real tools: helm lint --strict, helm template, the Kubernetes 1.35 schemas
(kubernetes-validate --strict; KEDA's ScaledObject against a schema written from its documented spec), checkov,
the budget formula of the serving pools' ceilings, and bad values failing with the schema's message."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from chart import (
    CHART,
    CHECKOV,
    CI_VALUES,
    HELM,
    env_of,
    expected_max_replicas,
    helm_template,
    matches,
    merged_values,
    named,
    objects,
    of_kind,
    render,
    run,
    tool,
    validate_builtin,
    validate_scaled_object,
)

IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]


def test_there_is_a_ci_values_file_for_each_install_shape() -> None:
    assert set(IDS) >= {"minimal", "gpu-pools", "keda", "external-postgres"}


@pytest.mark.parametrize("values", CI_VALUES, ids=IDS)
def test_helm_lint_strict_passes(values: Path) -> None:
    result = run([tool(HELM), "lint", "--strict", str(CHART), "-f", str(values)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=IDS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(values: Path, tmp_path: Path) -> None:
    manifest = helm_template(values).stdout
    path = tmp_path / "rendered.yaml"
    path.write_text(manifest)
    result = validate_builtin(path)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    assert result.returncode == 0 and not errors, "\n".join(errors or lines)
    # the one kind the Kubernetes schemas do not know is KEDA's; it gets its own schema
    unknown = [line for line in lines if "Couldn't find schema" in line]
    assert all("ScaledObject" in line for line in unknown), unknown
    scaled = of_kind(objects(manifest), "ScaledObject")
    assert bool(unknown) == bool(scaled)
    for obj in scaled:
        validate_scaled_object(obj)
        trigger = obj["spec"]["triggers"][0]
        assert trigger["type"] == "prometheus"
        assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])


def test_the_scaled_object_schema_rejects_what_keda_rejects() -> None:
    obj = of_kind(render(CHART / "ci" / "keda-values.yaml"), "ScaledObject")[0]
    for broken in ({**obj, "spec": {**obj["spec"], "maxReplicas": 3}},          # the HPA's field name, not KEDA's
                   {**obj, "spec": {**obj["spec"], "maxReplicaCount": "3"}},    # a string
                   {**obj, "spec": {k: v for k, v in obj["spec"].items() if k != "triggers"}}):
        with pytest.raises(jsonschema.ValidationError):
            validate_scaled_object(broken)


@pytest.mark.parametrize("values", CI_VALUES, ids=IDS)
def test_checkov_finds_nothing_that_is_not_skipped_with_a_reason(values: Path, tmp_path: Path) -> None:
    (tmp_path / "rendered.yaml").write_text(helm_template(values).stdout)
    result = run([tool(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "-o", "json"])
    report = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert not failed, failed
    assert report["summary"]["passed"] > 100
    for check in report["results"]["skipped_checks"]:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason) > 20 and "No comment provided" not in reason, (check["check_id"], check["resource"])


@pytest.mark.parametrize("values", CI_VALUES, ids=IDS)
def test_each_serving_pool_ceiling_is_the_budget_formula(values: Path) -> None:
    objs = render(values)
    settings = merged_values(values)
    prices = settings["prices"]["devices"]
    for pool in settings["triton"]["pools"]:
        budget = pool["autoscaling"]["budget"]
        want = expected_max_replicas(budget["amount"], budget["period"], prices[pool["deviceClass"]]["usd_per_hour"])
        name = f"margin-triton-{pool['name']}"
        if pool["autoscaling"]["engine"] == "hpa":
            got = named(objs, "HorizontalPodAutoscaler", name)["spec"]
            assert (got["maxReplicas"], got["minReplicas"]) == (want, pool["autoscaling"]["minReplicas"])
        else:
            got = named(objs, "ScaledObject", name)["spec"]
            assert (got["maxReplicaCount"], got["minReplicaCount"]) == (want, pool["autoscaling"]["minReplicas"])
        assert got["scaleTargetRef"]["name"] == name
        assert named(objs, "Deployment", name)  # the object it scales exists


def test_the_formula_for_sample_values_by_hand(tmp_path: Path) -> None:
    # 500 per month over 730 h = 0.6849/h; a cpu replica costs 0.17/h -> 4. 120 per day = 5/h; an L4 0.8048/h -> 6.
    assert expected_max_replicas(500, "monthly", "0.17") == 4
    assert expected_max_replicas(120, "daily", "0.8048") == 6
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"triton": {"pools": [
        {"name": "cpu", "deviceClass": "cpu", "autoscaling": {"engine": "hpa", "minReplicas": 1,
                                                                "budget": {"amount": 500, "period": "monthly"}}},
        {"name": "l4", "deviceClass": "nvidia-l4", "gpus": 1,
         "autoscaling": {"engine": "hpa", "minReplicas": 2, "budget": {"amount": "120", "period": "daily"}}}]}}))
    objs = render(values)
    assert named(objs, "HorizontalPodAutoscaler", "margin-triton-cpu")["spec"]["maxReplicas"] == 4
    assert named(objs, "HorizontalPodAutoscaler", "margin-triton-l4")["spec"]["maxReplicas"] == 6
    gpu = named(objs, "Deployment", "margin-triton-l4")["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    targets = json.loads(env_of(named(objs, "Deployment", "margin-budget"))["MARGIN_AUTOSCALER_TARGETS"])
    assert targets == {"cpu": "margin-triton-cpu", "nvidia-l4": "margin-triton-l4"}
    urls = json.loads(env_of(named(objs, "Deployment", "margin-inference"))["MARGIN_TRITON_URLS"])
    # each pool's headless Service: the gateway resolves it to every ready replica
    assert urls == {"cpu": "dns:///margin-triton-cpu-replicas:8001", "nvidia-l4": "dns:///margin-triton-l4-replicas:8001"}
    for pool in ("cpu", "l4"):
        headless = named(objs, "Service", f"margin-triton-{pool}-replicas")["spec"]
        # every replica, starting ones included: the gateway bills each one the Service lists, routes to ready ones
        assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
        assert headless["selector"] == named(objs, "Deployment", f"margin-triton-{pool}")["spec"]["selector"][
            "matchLabels"]


def _pool(**autoscaling: object) -> dict:
    return {"triton": {"pools": [{"name": "cpu", "deviceClass": "cpu", "autoscaling": {
        "engine": "hpa", "minReplicas": 1, "budget": {"amount": 500, "period": "monthly"}, **autoscaling}}]}}


BAD_VALUES = {
    "negative budget": (_pool(budget={"amount": -5, "period": "monthly"}),
                        "/triton/pools/0/autoscaling/budget/amount"),
    "unknown engine": (_pool(engine="vpa"), "value must be one of 'hpa', 'keda'"),
    "unknown period": (_pool(budget={"amount": 5, "period": "weekly"}), "/triton/pools/0/autoscaling/budget/period"),
    "budget below the minimum": (_pool(minReplicas=5),
                                 "pays for 4 replicas of cpu at 0.17/h, fewer than minReplicas 5"),
    "short admin key": ({"adminKey": {"value": "short"}}, "/adminKey/value"),
    "negative tenant budget": ({"tenants": [{"name": "acme", "period": "monthly", "total": -1}]}, "/tenants/0/total"),
    "unknown policy": ({"tenants": [{"name": "a", "period": "daily", "total": 1, "policy": "pray"}]},
                       "/tenants/0/policy"),
    "a typo in a key": ({"servicez": {}}, "additional properties 'servicez' not allowed"),
    "unpriced device class": ({"triton": {"pools": [{"name": "x", "deviceClass": "tpu-v5", "autoscaling": {
        "engine": "hpa", "minReplicas": 1, "budget": {"amount": 5, "period": "daily"}}}]}},
        'no price for device class "tpu-v5"'),
    "unknown idle policy": ({"metering": {"idlePolicy": "tenants"}},
                            "value must be one of 'usage', 'reservation', 'platform'"),
    "a metering interval of 0": ({"metering": {"intervalSeconds": 0}}, "/metering/intervalSeconds"),
    "a fractional metering interval": ({"metering": {"intervalSeconds": 7.5}}, "/metering/intervalSeconds"),
    "scale to zero after 0 s": ({"serving": {"scaleToZeroAfterSeconds": 0}}, "/serving/scaleToZeroAfterSeconds"),
    "a negative cold-start wait": ({"serving": {"coldStartTimeoutSeconds": -1}}, "/serving/coldStartTimeoutSeconds"),
    "a typo under serving": ({"serving": {"scaleToZeroAfter": 60}},
                             "additional properties 'scaleToZeroAfter' not allowed"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES), ids=list(BAD_VALUES))
def test_bad_values_fail_helm_template_with_a_clear_message(case: str, tmp_path: Path) -> None:
    values, message = BAD_VALUES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm_template(path, check=False)
    assert result.returncode != 0, f"{case}: rendered although it should not"
    assert message in result.stderr, result.stderr


def test_pods_are_hardened_and_probed() -> None:
    objs = render(CHART / "ci" / "gpu-pools-values.yaml")
    workloads = of_kind(objs, "Deployment") + of_kind(objs, "StatefulSet")
    assert len(workloads) >= 10
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        if w["metadata"]["labels"].get("margin.dev/role") != "worker":  # workers: root + sandbox caps, see
            assert pod["securityContext"]["runAsNonRoot"] is True  # test_sandbox_chart.py
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "readinessProbe" in c and "livenessProbe" in c, (w["metadata"]["name"], c["name"])
            assert c["resources"]["limits"] and c["resources"]["requests"]
    for name in ("registry", "training", "compression", "inference", "budget"):
        c = named(objs, "Deployment", f"margin-{name}")["spec"]["template"]["spec"]["containers"][0]
        assert c["readinessProbe"]["grpc"] == {"port": 50051}  # native gRPC probes
        assert {"name": "grpc", "containerPort": 50051, "protocol": "TCP"} in c["ports"]
    tokens = {w["metadata"]["name"]: w["spec"]["template"]["spec"]["automountServiceAccountToken"] for w in workloads}
    assert [n for n, t in tokens.items() if t] == ["margin-budget"]  # only the autoscaler talks to the API server


def test_gpu_workers_consume_their_device_class_queue_on_their_nodes() -> None:
    objs = render(CHART / "ci" / "gpu-pools-values.yaml")
    a100 = named(objs, "Deployment", "margin-worker-a100")
    pod = a100["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[command.index("-Q") + 1] == "train.nvidia-a100"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert {t["key"] for t in pod["tolerations"]} == {"dedicated", "nvidia.com/gpu"}
    assert pod["containers"][0]["image"].startswith("ghcr.io/margin/margin-gpu-worker:")
    cpu = named(objs, "Deployment", "margin-worker-cpu")["spec"]["template"]["spec"]
    assert "tolerations" not in cpu and cpu["containers"][0]["image"].startswith("ghcr.io/margin/margin-service:")


def test_network_policies_admit_only_known_callers() -> None:
    objs = render(CHART / "ci" / "minimal-values.yaml")
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objs, "NetworkPolicy")}
    triton = policies["margin-triton-cpu"]["ingress"]
    callers = [peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in triton[0]["from"]]
    assert sorted(callers) == ["inference"]  # every Triton port: see test_only_the_gateway_controls_triton
    redis_from = policies["margin-redis"]["ingress"][0]["from"]
    assert redis_from == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "margin",
                                                           "margin.dev/caller": "true"}}}]
    # only Margin's services and workers carry the caller label, never Triton
    callers = {w["metadata"]["name"] for w in of_kind(objs, "Deployment")
               if w["spec"]["template"]["metadata"]["labels"].get("margin.dev/caller") == "true"}
    assert callers == {f"margin-{n}" for n in ("registry", "training", "compression", "inference", "budget",
                                                "worker-cpu")}
    covered = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in policies.values()}
    workloads = {w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                 for w in of_kind(objs, "Deployment") + of_kind(objs, "StatefulSet")}
    assert workloads <= covered


def _admitted(policy: dict) -> dict[int, list[dict]]:
    """Who an ingress policy admits, by port: the peers of every rule naming it."""
    by_port: dict[int, list[dict]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    return by_port


def test_only_the_gateway_controls_triton() -> None:
    """Every Triton port admits the inference gateway, and grpc/http nothing else (metrics: also the budget
    service's autoscaler and the monitoring namespace, read-only); model control needs a key that only the gateway
    and Triton read, with the same flags the local cluster starts Triton with."""
    from margin.inference.triton_process import restricted_flags

    objs = render(CHART / "ci" / "gpu-pools-values.yaml")
    inference = named(objs, "Deployment", "margin-inference")
    gateway_labels = inference["spec"]["template"]["metadata"]["labels"]
    budget_labels = named(objs, "Deployment", "margin-budget")["spec"]["template"]["metadata"]["labels"]
    tritons = [w for w in of_kind(objs, "Deployment") if w["metadata"]["labels"].get("margin.dev/role") == "triton"]
    assert len(tritons) == len(merged_values(CHART / "ci" / "gpu-pools-values.yaml")["triton"]["pools"]) > 1
    key_ref = {"secretKeyRef": {"name": "margin-triton-control", "key": "triton-control-key"}}
    for triton in tritons:
        name = triton["metadata"]["name"]
        policy = named(objs, "NetworkPolicy", name)["spec"]
        assert matches(policy["podSelector"], triton["spec"]["template"]["metadata"]["labels"])
        container = triton["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        admitted = _admitted(policy)
        assert set(admitted) == set(ports.values()), name  # every port has a rule (the rest is closed anyway)
        for port in (ports["grpc"], ports["http"]):
            peers = admitted[port]
            assert len(peers) == 1 and "namespaceSelector" not in peers[0], (name, port)
            assert matches(peers[0]["podSelector"], gateway_labels) and not matches(peers[0]["podSelector"],
                                                                                     budget_labels)
        metrics = admitted[ports["metrics"]]
        assert any("podSelector" in p and matches(p["podSelector"], budget_labels) for p in metrics)
        budget_or_monitoring = [set(p) == {"namespaceSelector"}  # the monitoring namespace
                                or (set(p) == {"podSelector"} and matches(p["podSelector"], budget_labels))
                                for p in metrics]
        assert all(budget_or_monitoring), metrics
        assert set(restricted_flags("$(MARGIN_TRITON_CONTROL_KEY)")) <= set(container["args"]), name
        assert env_of(triton)["MARGIN_TRITON_CONTROL_KEY"] == key_ref
    assert env_of(inference)["MARGIN_TRITON_CONTROL_KEY"] == key_ref
    readers = {w["metadata"]["name"] for w in of_kind(objs, "Deployment") + of_kind(objs, "StatefulSet")
               if "margin-triton-control" in json.dumps(w["spec"]["template"])}
    assert readers == {"margin-inference"} | {t["metadata"]["name"] for t in tritons}
    secret = named(objs, "Secret", "margin-triton-control")
    assert len(secret["data"]["triton-control-key"]) >= 48


def test_an_existing_triton_control_secret_and_the_webhook_allow_list_are_rendered(tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({
        "triton": {"controlKey": {"existingSecret": "triton-key", "key": "k"}},
        "services": {"budget": {"replicas": 1, "webhookAllow": ["hooks.corp.example", "10.20.0.0/16"]}}}))
    objs = render(CHART / "ci" / "minimal-values.yaml", values)
    assert "margin-triton-control" not in {o["metadata"]["name"] for o in of_kind(objs, "Secret")}
    ref = {"secretKeyRef": {"name": "triton-key", "key": "k"}}
    assert env_of(named(objs, "Deployment", "margin-inference"))["MARGIN_TRITON_CONTROL_KEY"] == ref
    assert env_of(named(objs, "Deployment", "margin-triton-cpu"))["MARGIN_TRITON_CONTROL_KEY"] == ref
    allow = env_of(named(objs, "Deployment", "margin-budget"))["MARGIN_WEBHOOK_ALLOW"]
    assert allow == "hooks.corp.example,10.20.0.0/16"
    default = render(CHART / "ci" / "minimal-values.yaml")
    assert env_of(named(default, "Deployment", "margin-budget"))["MARGIN_WEBHOOK_ALLOW"] == ""


def test_the_gateway_and_every_worker_reach_the_budget_services_grpc_port() -> None:
    # ReportFleet: the inference gateway and each worker report the replicas they see to the budget service
    objs = render(CHART / "ci" / "gpu-pools-values.yaml")
    policy = named(objs, "NetworkPolicy", "margin-budget")["spec"]
    budget = named(objs, "Deployment", "margin-budget")
    assert matches(policy["podSelector"], budget["spec"]["template"]["metadata"]["labels"])
    assert policy["policyTypes"] == ["Ingress"]
    grpc_rules = [rule for rule in policy["ingress"] if {"port": 50051, "protocol": "TCP"} in rule["ports"]]
    callers = [w for w in of_kind(objs, "Deployment") if w["metadata"]["name"] == "margin-inference"
               or w["metadata"]["labels"].get("margin.dev/role") == "worker"]
    # only the workers' egress is limited, and it admits the budget service (test_sandbox_chart.py)
    egress = {p["metadata"]["name"] for p in of_kind(objs, "NetworkPolicy") if "Egress" in p["spec"]["policyTypes"]}
    assert egress == {w["metadata"]["name"] for w in callers if w["metadata"]["name"] != "margin-inference"}
    assert len(callers) == 1 + len(merged_values(CHART / "ci" / "gpu-pools-values.yaml")["workers"]["pools"])
    for caller in callers:
        labels = caller["spec"]["template"]["metadata"]["labels"]
        assert any(matches(peer["podSelector"], labels) and "namespaceSelector" not in peer
                   for rule in grpc_rules for peer in rule["from"]), caller["metadata"]["name"]
        env = env_of(caller)
        assert env["MARGIN_BUDGET_ADDR"] == "margin-budget:50051"


def test_metering_and_scale_to_zero_settings_reach_every_margin_process(tmp_path: Path) -> None:
    defaults = {"MARGIN_FLEET_INTERVAL_SECONDS": "15", "MARGIN_IDLE_POLICY": "usage",
                "MARGIN_SCALE_TO_ZERO_AFTER_SECONDS": "900", "MARGIN_COLD_START_TIMEOUT_SECONDS": "30"}
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"metering": {"intervalSeconds": 60, "idlePolicy": "platform"},
                                      "serving": {"scaleToZeroAfterSeconds": 120, "coldStartTimeoutSeconds": 45}}))
    set_ = {"MARGIN_FLEET_INTERVAL_SECONDS": "60", "MARGIN_IDLE_POLICY": "platform",
            "MARGIN_SCALE_TO_ZERO_AFTER_SECONDS": "120", "MARGIN_COLD_START_TIMEOUT_SECONDS": "45"}
    for rendered, want in ((render(CHART / "ci" / "gpu-pools-values.yaml"), defaults), (render(values), set_)):
        processes = [w for w in of_kind(rendered, "Deployment")
                     if w["spec"]["template"]["metadata"]["labels"].get("margin.dev/caller") == "true"]
        names = {w["metadata"]["name"] for w in processes}
        assert {"margin-inference", "margin-budget"} <= names and any(n.startswith("margin-worker-") for n in names)
        for w in processes:
            env = env_of(w)
            assert {k: env.get(k) for k in want} == want, w["metadata"]["name"]
        for w in of_kind(rendered, "Deployment"):  # Triton is not a Margin process
            if w["metadata"]["name"].startswith("margin-triton-"):
                assert not set(want) & set(env_of(w))


def test_external_postgres_renders_no_database_and_reads_the_url_from_the_named_secret() -> None:
    objs = render(CHART / "ci" / "external-postgres-values.yaml")
    assert not of_kind(objs, "StatefulSet")
    assert "margin-redis" not in {o["metadata"]["name"] for o in objs}
    env = env_of(named(objs, "Deployment", "margin-registry"))
    assert env["DATABASE_URL"] == {"secretKeyRef": {"name": "margin-database", "key": "url"}}
    assert env["MARGIN_REDIS_URL"] == "redis://redis-master.data.svc:6379/0"


def test_tenant_budgets_and_prices_reach_the_services_as_files() -> None:
    objs = render(CHART / "ci" / "gpu-pools-values.yaml")
    data = named(objs, "ConfigMap", "margin-config")["data"]
    tenants = yaml.safe_load(data["budgets.yaml"])
    assert [t["name"] for t in tenants] == ["acme", "globex"]
    assert tenants[0]["limits"]["serving"] == "2000"
    prices = yaml.safe_load(data["prices.yaml"])
    default = yaml.safe_load((CHART.parents[1] / "services" / "margin" / "common" / "prices.yaml").read_text())
    assert prices["devices"] == default["devices"], "values.yaml's prices drifted from the built-in catalog"
    env = env_of(named(objs, "Deployment", "margin-budget"))
    assert env["MARGIN_BUDGETS_FILE"] == "/etc/margin/budgets.yaml"
    assert env["MARGIN_PRICE_CATALOG"] == "/etc/margin/prices.yaml"
