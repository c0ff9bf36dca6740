"""Integration tests of the supervised local cluster (``margin up`` / ``margin down``).

Real processes only: ``local.up()`` spawns the detached supervisor, which runs a real redis-server and the
budget, registry and inference services and tritonserver. The module shares one cluster in its own temporary
MARGIN_HOME; the tests run in file order (start, use, crash a child, stop)."""
from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from margin import demo
from margin.cluster import local, state
from margin.cluster.processes import LOCAL_FLEET_INTERVAL_S
from margin.sdk import RegistryClient, connect
from margin.sdk.tensors import to_tensor
from margin.v1 import (
    budget_pb2,
    budget_pb2_grpc,
    common_pb2,
    compression_pb2,
    compression_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from rich.console import Console

pytestmark = pytest.mark.slow

# Settings that would point the cluster (or the CLI) somewhere other than the temporary MARGIN_HOME.
_ISOLATED_ENV = ("MARGIN_HOME", "MARGIN_ADMIN_KEY", "MARGIN_API_KEY", "MARGIN_REGISTRY_ADDR", "MARGIN_BUDGET_ADDR",
                 "DATABASE_URL", "MARGIN_ARTIFACT_DIR", "MARGIN_GRPC_PORT", "MARGIN_METRICS_PORT")


@dataclass
class LocalCluster:
    home: Path
    state: dict
    seen_pids: set[int] = field(default_factory=set)

    def refresh(self) -> dict:
        self.state = state.read_state()
        self.record_pids(self.state)
        return self.state

    def record_pids(self, current: dict) -> None:
        for pid in [current.get("supervisor_pid"), *(s.get("pid") for s in current.get("services", {}).values())]:
            if pid:
                self.seen_pids.add(pid)

    def address(self, name: str) -> str:
        return self.state["services"][name]["address"]

    def demo_key(self) -> str:
        return state.demo_key_path().read_text().strip()


def _health_status(address: str, timeout: float = 3.0) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def _list_models(address: str, key: str) -> list[registry_pb2.Model]:
    conn = connect(address, key)
    try:
        stub = registry_pb2_grpc.ModelRegistryStub(conn.channel)
        return list(stub.ListModels(registry_pb2.ListModelsRequest(), metadata=conn.metadata, timeout=10).models)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    home = tmp_path_factory.mktemp("margin_home_cluster")
    saved = {name: os.environ.get(name) for name in _ISOLATED_ENV}
    for name in _ISOLATED_ENV:
        os.environ.pop(name, None)
    os.environ["MARGIN_HOME"] = str(home)
    cluster = None
    try:
        current = local.up()
        cluster = LocalCluster(home, current)
        cluster.record_pids(current)
        yield cluster
    finally:
        try:
            local.down()
            final = state.read_state()
            pids = set(cluster.seen_pids) if cluster else set()
            if final:
                pids.add(final.get("supervisor_pid"))
                pids.update(s.get("pid") for s in final.get("services", {}).values())
            still_alive = sorted(p for p in pids if p and state.pid_alive(p))
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        assert not still_alive, f"processes of the local cluster still alive after down(): {still_alive}"


def test_up_reports_ready_with_every_part_healthy(local_cluster: LocalCluster) -> None:
    current = local_cluster.refresh()
    assert current["status"] == "ready", current
    assert current["home"] == str(local_cluster.home)
    assert state.pid_alive(current["supervisor_pid"])
    assert set(current["services"]) == {"redis", "triton", "budget", "registry", "training", "compression",
                                        "inference", "worker-cpu"}
    for name, svc in current["services"].items():
        assert svc["up"] is True, (name, svc)
        assert state.pid_alive(svc["pid"]), (name, svc)
        assert svc["restarts"] == 0, (name, svc)
        assert Path(svc["log"]).is_file(), (name, svc)
    for name in ("budget", "registry", "training", "compression", "inference"):
        assert _health_status(local_cluster.address(name)) == health_pb2.HealthCheckResponse.SERVING, name
    assert current["redis_url"] == f"redis://{local_cluster.address('redis')}/0"
    client = redis.Redis.from_url(current["redis_url"], socket_timeout=3)
    try:
        assert client.ping() is True
    finally:
        client.close()
    # the files a user is told about exist, and the secret ones are private
    assert state.demo_key_path().read_text().strip()
    assert (local_cluster.home / "admin.key").stat().st_mode & 0o077 == 0
    assert state.demo_key_path().stat().st_mode & 0o077 == 0


def test_registry_reflection_lists_its_services(local_cluster: LocalCluster) -> None:
    with grpc.insecure_channel(local_cluster.address("registry")) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"margin.v1.ModelRegistry", "grpc.health.v1.Health"} <= services, services


def test_metrics_endpoints_count_grpc_requests(local_cluster: LocalCluster) -> None:
    _list_models(local_cluster.address("registry"), local_cluster.demo_key())
    bodies = {}
    for name in ("budget", "registry"):
        port = local_cluster.state["services"][name]["metrics_port"]
        assert port, (name, local_cluster.state["services"][name])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200
            bodies[name] = reply.read().decode()
        assert "margin_grpc_requests_total" in bodies[name], name
    # the counters are real samples, labelled by method and code
    assert 'method="/margin.v1.ModelRegistry/ListModels"' in bodies["registry"]
    assert 'method="/margin.v1.Budgets/CreateApiKey"' in bodies["budget"]  # the demo key made by up()


def test_demo_key_works_and_second_up_is_idempotent(local_cluster: LocalCluster) -> None:
    before = local_cluster.refresh()
    key = local_cluster.demo_key()
    assert key.startswith("mk_"), key
    assert _list_models(local_cluster.address("registry"), key) == []

    again = local.up(timeout=30)
    assert again["supervisor_pid"] == before["supervisor_pid"]
    assert {n: s["address"] for n, s in again["services"].items()} == \
           {n: s["address"] for n, s in before["services"].items()}
    assert {n: s["pid"] for n, s in again["services"].items()} == {n: s["pid"] for n, s in before["services"].items()}
    assert {n: s["metrics_port"] for n, s in again["services"].items()} == \
           {n: s["metrics_port"] for n, s in before["services"].items()}
    assert again["status"] == "ready"
    assert local_cluster.demo_key() == key, "a second up() replaced a demo key that still worked"
    assert _list_models(local_cluster.address("registry"), key) == []


def test_supervisor_restarts_a_killed_registry_on_the_same_address(local_cluster: LocalCluster) -> None:
    address = local_cluster.address("registry")
    key = local_cluster.demo_key()
    conn = connect(address, key)
    try:
        registry_pb2_grpc.ModelRegistryStub(conn.channel).CreateModel(
            registry_pb2.CreateModelRequest(name="survivor", labels={"kept": "yes"}), metadata=conn.metadata,
            timeout=10)
    finally:
        conn.close()

    old_pid = local_cluster.refresh()["services"]["registry"]["pid"]
    os.kill(old_pid, signal.SIGKILL)

    deadline = time.monotonic() + 15
    current = local_cluster.refresh()
    while time.monotonic() < deadline:
        current = local_cluster.refresh()
        svc = current["services"]["registry"]
        if svc["pid"] != old_pid and svc["up"]:
            try:
                if _health_status(svc["address"], timeout=1) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    else:
        pytest.fail(f"registry not restarted and healthy within 15 s: {current['services']['registry']}")

    svc = current["services"]["registry"]
    assert not state.pid_alive(old_pid)
    assert svc["pid"] != old_pid and state.pid_alive(svc["pid"])
    assert svc["restarts"] >= 1
    assert svc["address"] == address
    assert current["status"] == "ready"
    # the other parts were left alone
    assert current["services"]["budget"]["restarts"] == 0
    assert current["services"]["redis"]["restarts"] == 0
    # the model made before the crash survived (SQLite file on disk)
    models = _list_models(address, key)
    assert [m.name for m in models] == ["survivor"]
    assert dict(models[0].labels) == {"kept": "yes"}


def test_the_demo_compresses_and_every_variant_deploys_with_routing_by_measured_cost(
        local_cluster: LocalCluster) -> None:
    """``make demo``'s job on this cluster: train, AutoCompress, deploy the chosen variant next to the original,
    route, and reconcile the fleet's bill to the micro. Then every variant of the search deploys through Deploy, and
    routing by the quality floor serves the one whose cost *as served* is lowest among those meeting it."""
    console = Console(record=True, width=240)
    demo.run(console, epochs=40)
    out = console.export_text()
    job_id = re.search(r"AutoCompress job (cj-[0-9a-f]+)", out)[1]
    key = local_cluster.demo_key()
    compression, inference = (connect(local_cluster.address(n), key) for n in ("compression", "inference"))
    registry = RegistryClient(connect(local_cluster.address("registry"), key))
    try:
        job = compression_pb2_grpc.CompressionStub(compression.channel).GetCompressionJob(
            compression_pb2.GetCompressionJobRequest(id=job_id), metadata=compression.metadata)
        pinned = int(re.search(r"pinned to digits@production: served by digits:(\d+)", out)[1])
        routed = int(re.search(r"routed by the policy val_accuracy ≥ [0-9.]+: served by digits:(\d+), the", out)[1])
        assert job.chosen >= 0 and routed in (pinned, job.variants[job.chosen].version.number)
        assert re.search(r"fleet \$[0-9.,]+ \(replica-seconds × price\) = tenants \$[0-9.,]+ .*\+ platform idle "
                         r"\$[0-9.,]+ — equal to the micro", out), out[-3000:]
        stub = inference_pb2_grpc.InferenceStub(inference.channel)
        for v in job.variants:
            d = stub.Deploy(inference_pb2.DeployRequest(version=v.version), metadata=inference.metadata)
            assert d.state == inference_pb2.DEPLOYMENT_STATE_READY and d.cost_per_million.micros > 0, d
        floor = job.auto.floor.minimum
        deployed = {d.version.number for d in stub.ListDeployments(
            inference_pb2.ListDeploymentsRequest(model="digits"), metadata=inference.metadata).deployments}
        figures = {n: registry.stub.GetVersion(registry_pb2.GetVersionRequest(
            version=common_pb2.VersionRef(model="digits", number=n)), metadata=registry.metadata).metrics
            for n in deployed}
        meeting = {n for n, m in figures.items() if m["val_accuracy"] >= floor}
        time.sleep(LOCAL_FLEET_INTERVAL_S + 2)  # the deploys' calibration is in the live figures (they move with use)
        found = {d.version.number: d for d in stub.ListDeployments(
            inference_pb2.ListDeploymentsRequest(model="digits"), metadata=inference.metadata).deployments
            if d.version.number in meeting}
        live = all(d.served_cost_source == "triton" for d in found.values())  # routing compares like with like
        served = {n: (d.served_cost_per_million if live else d.cost_per_million).micros for n, d in found.items()}
        reply = stub.Predict(inference_pb2.PredictRequest(
            version=common_pb2.VersionRef(model="digits"), inputs=[to_tensor("input", np.zeros((4, 64), "float32"))],
            routing=inference_pb2.RoutingPolicy(floor=common_pb2.QualityFloor(metric="val_accuracy",
                                                                              minimum=floor))),
            metadata=inference.metadata)
        assert served[reply.served_version.number] == min(served.values()), (reply.served_version, served)
        # the autoscaler's plan reads Triton's real counters: traffic between two plans shows as requests/s
        budgets = budget_pb2_grpc.BudgetsStub(connect(local_cluster.address("budget"), key).channel)
        md = (("authorization", f"Bearer {key}"),)
        name = f"digits-v{reply.served_version.number}"
        budgets.GetScalingPlan(budget_pb2.GetScalingPlanRequest(deployment=name), metadata=md)
        for _ in range(40):
            stub.Predict(inference_pb2.PredictRequest(version=reply.served_version, inputs=[
                to_tensor("input", np.zeros((4, 64), "float32"))]), metadata=inference.metadata)
        plan = budgets.GetScalingPlan(budget_pb2.GetScalingPlanRequest(deployment=name), metadata=md)
        assert plan.observed_rps > 0 and plan.capacity_rps_per_replica > 0 and plan.target_kind == "report-only"
        # every variant is deployed now: the others' burn until the month ends may leave this one nothing
        assert plan.affordable_replicas >= 0 and not plan.applied and plan.reason, plan
        assert plan.chosen_replicas == min(max(plan.demand_replicas, plan.min_replicas), plan.affordable_replicas)
        assert plan.remaining_serving_budget.micros > 0
    finally:
        for conn in (compression, inference):
            conn.close()


def test_down_stops_everything_and_second_down_is_a_no_op(local_cluster: LocalCluster) -> None:
    before = local_cluster.refresh()
    pids = [before["supervisor_pid"], *(s["pid"] for s in before["services"].values())]
    assert all(state.pid_alive(p) for p in pids), before

    assert local.down() is True
    after = state.read_state()
    assert after["status"] == "stopped", after
    alive = [p for p in pids if state.pid_alive(p)]
    assert not alive, f"still alive after down(): {alive}"
    assert all(not s["up"] for s in after["services"].values()), after["services"]
    assert local.running_state() is None
    with pytest.raises(grpc.RpcError):
        _health_status(before["services"]["registry"]["address"], timeout=1)

    assert local.down() is False


def test_up_after_down_keeps_the_data_and_the_demo_key(local_cluster: LocalCluster) -> None:
    key = local_cluster.demo_key()
    assert local.running_state() is None
    current = local.up()
    local_cluster.record_pids(current)
    local_cluster.state = current
    assert current["status"] == "ready"
    assert all(s["restarts"] == 0 and s["up"] for s in current["services"].values()), current["services"]
    assert local_cluster.demo_key() == key, "the demo key was replaced although it still works"
    assert sorted(m.name for m in _list_models(local_cluster.address("registry"), key)) == ["digits", "survivor"]
    # the module fixture's teardown stops this second cluster and checks every pid


def test_children_do_not_outlive_a_killed_supervisor(tmp_path_factory: pytest.TempPathFactory) -> None:
    previous_home = os.environ["MARGIN_HOME"]
    os.environ["MARGIN_HOME"] = str(tmp_path_factory.mktemp("margin_home_orphans"))
    children: list[int] = []
    try:
        current = local.up()
        supervisor = current["supervisor_pid"]
        children = [s["pid"] for s in current["services"].values()]
        os.kill(supervisor, signal.SIGKILL)
        os.waitpid(supervisor, 0)  # local.up() started it, so it is this process's child
        local.down()  # what a user runs next; the supervisor is gone, so this is where cleanup could happen
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(state.pid_alive(p) for p in children):
            time.sleep(0.1)
        orphans = [p for p in children if state.pid_alive(p)]
        assert not orphans, f"children still running after their supervisor was killed: {orphans}"
    finally:
        # clean up what this test started, by pid
        for pid in children:
            if state.pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(state.pid_alive(p) for p in children):
            time.sleep(0.1)
        for pid in children:
            if state.pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        os.environ["MARGIN_HOME"] = previous_home
