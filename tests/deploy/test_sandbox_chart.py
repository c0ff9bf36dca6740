"""The chart's side of the tenant code sandbox (helm/margin/README.md, "Tenant code sandbox"): worker pods, and only
they, get the sandbox's settings from `sandbox`, a node-local scratch volume, root with the few capabilities bwrap and
setpriv need (no API token), and a NetworkPolicy that admits no ingress and egress only to DNS, the registry, the
budget service, Redis and the database; the registry gets the package size limit; the worker images install bwrap."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from chart import CHART, REPO, env_of, helm_template, matches, merged_values, of_kind, render
from test_dockerfiles import stages

GPU_POOLS = CHART / "ci" / "gpu-pools-values.yaml"
SANDBOX_ENV = {"memoryMB": "MARGIN_SANDBOX_MEMORY_MB", "processes": "MARGIN_SANDBOX_PROCESSES",
               "fileMB": "MARGIN_SANDBOX_FILE_MB", "maxSeconds": "MARGIN_SANDBOX_MAX_SECONDS",
               "silenceSeconds": "MARGIN_SANDBOX_SILENCE_SECONDS", "uidBase": "MARGIN_SANDBOX_UID_BASE"}
# What the in-pod sandbox needs (values.yaml says why each): namespaces + mounts, the sandbox's loopback, the drop to
# its own uid, handing it its private directory and reading / removing what it wrote there.
SANDBOX_CAPABILITIES = {"SYS_ADMIN", "NET_ADMIN", "SETUID", "SETGID", "CHOWN", "DAC_OVERRIDE"}
SERVICES = ("registry", "training", "compression", "inference", "budget")


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return of_kind(objs, "Deployment") + of_kind(objs, "StatefulSet")


def is_worker(workload: dict[str, Any]) -> bool:
    return workload["metadata"]["labels"].get("margin.dev/role") == "worker"


def pod_of(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def labels_of(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def component(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [w for w in workloads(objs) if labels_of(w).get("app.kubernetes.io/component") == name]
    assert len(found) == 1, f"component {name}: {len(found)} workloads"
    return found[0]


def values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_every_worker_pool_gets_the_sandbox_settings_and_scratch_volume_from_values(tmp_path: Path) -> None:
    custom = values_file(tmp_path, {"sandbox": {"memoryMB": 4096, "processes": 256, "fileMB": 1024,
                                                "maxSeconds": 7200, "silenceSeconds": 120, "uidBase": 300000,
                                                "scratchSize": "50Gi"}})
    for files in ((GPU_POOLS,), (GPU_POOLS, custom)):
        settings = merged_values(*files)
        sandbox = settings["sandbox"]
        want = {var: str(sandbox[key]) for key, var in SANDBOX_ENV.items()}
        workers = [w for w in workloads(render(*files)) if is_worker(w)]
        assert len(workers) == len(settings["workers"]["pools"]) == 3
        for worker in workers:
            env = env_of(worker)
            assert {var: env.get(var) for var in want} == want, worker["metadata"]["name"]
            pod = pod_of(worker)
            volume = next(v for v in pod["volumes"] if v["name"] == "sandbox")
            assert volume == {"name": "sandbox", "emptyDir": {"sizeLimit": sandbox["scratchSize"]}}  # node-local
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert env["MARGIN_SANDBOX_DIR"] == mounts["sandbox"]
            # its own volume, not inside the shared artifacts PVC nor the small /tmp
            assert not any(mounts["sandbox"].startswith(mounts[other]) for other in ("artifacts", "tmp"))
    assert merged_values(GPU_POOLS)["sandbox"]["uidBase"] == 200000  # the two renderings did differ


def test_worker_pods_run_as_root_with_only_the_sandbox_capabilities_and_no_api_token() -> None:
    objs = render(GPU_POOLS)
    for worker in (w for w in workloads(objs) if is_worker(w)):
        name, pod = worker["metadata"]["name"], pod_of(worker)
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsUser"] == 0 and pod["securityContext"]["runAsNonRoot"] is False
        assert not {"hostPID", "hostIPC", "hostNetwork"} & set(pod), name
        assert not [v for v in pod["volumes"] if {"hostPath", "secret", "projected"} & set(v)], name
        [container] = pod["containers"]
        sc = container["securityContext"]
        added = sc["capabilities"]["add"]
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert set(added) == SANDBOX_CAPABILITIES and len(added) == len(set(added))
        # the API server refuses allowPrivilegeEscalation false next to an added "CAP_SYS_ADMIN"
        assert sc["allowPrivilegeEscalation"] is False and "CAP_SYS_ADMIN" not in sc["capabilities"]["add"]
        assert sc["privileged"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["seccompProfile"] == {"type": "Unconfined"}  # RuntimeDefault refuses pivot_root
        assert sc["appArmorProfile"] == {"type": "Unconfined"}  # the runtime's AppArmor profile denies mount
        # the Secrets a worker reads are the two it always read, as environment variables
        secrets = {k for k, v in env_of(worker).items() if isinstance(v, dict) and "secretKeyRef" in v}
        assert secrets == {"DATABASE_URL", "MARGIN_ADMIN_KEY"}, name


def test_a_localhost_seccomp_profile_replaces_unconfined(tmp_path: Path) -> None:
    profile = {"type": "Localhost", "localhostProfile": "profiles/margin-sandbox.json"}
    objs = render(GPU_POOLS, values_file(tmp_path, {"sandbox": {"podSecurity": {"container": {
        "seccompProfile": profile}}}}))
    for worker in (w for w in workloads(objs) if is_worker(w)):
        sc = pod_of(worker)["containers"][0]["securityContext"]
        assert sc["seccompProfile"] == profile
        assert set(sc["capabilities"]["add"]) == SANDBOX_CAPABILITIES  # the rest of the defaults stays


def test_no_other_pod_gets_the_sandbox_settings_or_an_added_capability(tmp_path: Path) -> None:
    objs = render(GPU_POOLS, values_file(tmp_path, {"services": {"registry": {"replicas": 2,
                                                                              "maxPackageBytes": 2097152}}}))
    others = [w for w in workloads(objs) if not is_worker(w)]
    assert {labels_of(w)["app.kubernetes.io/component"] for w in others} >= {*SERVICES, "triton-cpu", "triton-l4"}
    for w in others:
        pod = pod_of(w)
        assert pod["securityContext"]["runAsNonRoot"] is True, w["metadata"]["name"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, (w["metadata"]["name"], c["name"])
            assert "seccompProfile" not in c["securityContext"]  # the pod's RuntimeDefault applies
        env = env_of(w)
        assert not [k for k in env if k.startswith("MARGIN_SANDBOX")], w["metadata"]["name"]
        assert not [v for v in pod["volumes"] if v["name"] == "sandbox"], w["metadata"]["name"]
        want = "2097152" if w["metadata"]["name"] == "margin-registry" else None
        assert env.get("MARGIN_MAX_PACKAGE_BYTES") == want, w["metadata"]["name"]
    assert env_of(component(render(GPU_POOLS), "registry"))["MARGIN_MAX_PACKAGE_BYTES"] == "1048576"


def egress_peers(policy: dict[str, Any], objs: list[dict[str, Any]]) -> set[tuple[str, int, str]]:
    """(what a peer is, port, protocol) for every egress peer × port: a component of the release by the workload its
    podSelector selects, 'dns' for the configured cluster DNS, else the peer itself as YAML."""
    dns = merged_values()["networkPolicy"]["dns"]
    found = set()
    for rule in policy["spec"]["egress"]:
        assert rule.get("ports") and rule.get("to"), rule  # never every port, never every destination
        for peer in rule["to"]:
            if peer in dns:
                what = "dns"
            elif set(peer) == {"podSelector"}:  # this namespace: the release's own pods
                selected = [labels_of(w)["app.kubernetes.io/component"] for w in workloads(objs)
                            if matches(peer["podSelector"], labels_of(w))]
                assert len(selected) == 1, (peer, selected)
                what = selected[0]
            else:
                what = yaml.safe_dump(peer)
            found |= {(what, port["port"], port["protocol"]) for port in rule["ports"]}
    return found


def worker_policy(objs: list[dict[str, Any]], worker: dict[str, Any]) -> dict[str, Any]:
    """The one NetworkPolicy that selects this worker's pods (policies add up, so no other may select them)."""
    selecting = [p for p in of_kind(objs, "NetworkPolicy") if matches(p["spec"]["podSelector"], labels_of(worker))]
    assert len(selecting) == 1, [p["metadata"]["name"] for p in selecting]
    return selecting[0]


@pytest.mark.parametrize("values", ["minimal", "gpu-pools"])
def test_worker_pods_admit_no_ingress_and_reach_only_dns_the_registry_budget_redis_and_the_database(
        values: str) -> None:
    objs = render(CHART / "ci" / f"{values}-values.yaml")
    workers = [w for w in workloads(objs) if is_worker(w)]
    assert workers
    want = {("dns", 53, "UDP"), ("dns", 53, "TCP"), ("registry", 50051, "TCP"), ("budget", 50051, "TCP"),
            ("redis", 6379, "TCP"), ("postgresql", 5432, "TCP")}
    for worker in workers:
        policy = worker_policy(objs, worker)
        assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
        assert not policy["spec"].get("ingress"), policy["metadata"]["name"]  # Ingress with no rule: none
        assert egress_peers(policy, objs) == want, policy["metadata"]["name"]


def test_an_external_database_and_redis_are_reached_through_worker_egress_only(tmp_path: Path) -> None:
    external = CHART / "ci" / "external-postgres-values.yaml"
    objs = render(external)
    extra = merged_values(external)["networkPolicy"]["workerEgress"]
    assert extra
    [worker] = [w for w in workloads(objs) if is_worker(w)]
    policy = worker_policy(objs, worker)
    assert all(rule in policy["spec"]["egress"] for rule in extra)
    found = {what for what, _, _ in egress_peers(policy, objs)}
    assert "redis" not in found and "postgresql" not in found  # no such pods in this release
    assert {"dns", "registry", "budget"} <= found
    # without a rule for them the workers could not reach the database: the chart says so instead of rendering
    result = helm_template(external, values_file(tmp_path, {"networkPolicy": {"workerEgress": []}}), check=False)
    assert result.returncode != 0 and "networkPolicy.workerEgress" in result.stderr, result.stderr


BAD_SANDBOX_VALUES = {
    "no memory": ({"sandbox": {"memoryMB": 0}}, "/sandbox/memoryMB"),
    "a fractional process count": ({"sandbox": {"processes": 1.5}}, "/sandbox/processes"),
    "sandboxes as root's uid": ({"sandbox": {"uidBase": 0}}, "/sandbox/uidBase"),
    "an unreadable scratch size": ({"sandbox": {"scratchSize": "lots"}}, "/sandbox/scratchSize"),
    "a typo under sandbox": ({"sandbox": {"memoryMb": 4096}}, "additional properties 'memoryMb' not allowed"),
    "a package limit of 0": ({"services": {"registry": {"replicas": 1, "maxPackageBytes": 0}}},
                             "/services/registry/maxPackageBytes"),
}


@pytest.mark.parametrize("case", list(BAD_SANDBOX_VALUES), ids=list(BAD_SANDBOX_VALUES))
def test_bad_sandbox_values_fail_with_the_schemas_message(case: str, tmp_path: Path) -> None:
    values, message = BAD_SANDBOX_VALUES[case]
    result = helm_template(values_file(tmp_path, values), check=False)
    assert result.returncode != 0, f"{case}: rendered although it should not"
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("image", ["service", "gpu-worker"])
def test_worker_images_install_bubblewrap_before_dropping_root(image: str) -> None:
    final = stages(REPO / "docker" / f"{image}.Dockerfile")[-1]
    words = [w for w, _ in final]
    user_at = words.index("USER")
    runs = [rest for w, rest in final[:user_at] if w == "RUN"]
    assert any("apt-get install" in r and "bubblewrap" in r and "setpriv --version" in r for r in runs), runs
