"""The Inference gateway against a real tritonserver, a real redis-server and the real registry."""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from margin.cluster.processes import ManagedProcess
from margin.common.ledger import LedgerRow
from margin.inference.metering import REQUESTS
from margin.inference.ratelimit import Limits
from margin.inference.triton_process import triton_spec
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2, inference_pb2
from sqlalchemy import func, select

from tests.integration.inference_stack import (
    Stack,
    another_service,
    billed_through,
    code_of,
    deploy,
    health,
    inference_stack,
    outputs,
    predict,
    tensor,
    upload_model,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with inference_stack(tmp_path_factory.mktemp("inference")) as s:
        yield s


def test_deploy_predict_matches_torchscript_then_undeploy(stack):
    d = deploy(stack, 1)
    assert d.state == inference_pb2.DEPLOYMENT_STATE_READY and d.name == "digits-v1"
    assert d.capacity_rps > 0 and d.cost_per_million.micros > 0 and d.price_per_hour.micros > 0
    assert deploy(stack, 1).name == "digits-v1"  # idempotent
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    resp = predict(stack, x)
    expected = stack.scripted[1](torch.from_numpy(x)).detach().numpy()
    assert np.allclose(outputs(resp), expected, atol=1e-5)
    assert (resp.served_version.model, resp.served_version.number, resp.deployment) == ("digits", 1, "digits-v1")
    assert resp.usage.compute_microseconds > 0 and resp.usage.cost_micros > 0

    listed = stack.stub().ListDeployments(inference_pb2.ListDeploymentsRequest(), metadata=stack.md())
    assert "digits-v1" in [x.name for x in listed.deployments]
    gone = stack.stub().Undeploy(inference_pb2.UndeployRequest(name="digits-v1"), metadata=stack.md())
    assert gone.state == inference_pb2.DEPLOYMENT_STATE_UNLOADED
    code, _ = code_of(lambda: predict(stack, x))
    assert code == grpc.StatusCode.NOT_FOUND


BAD = {
    "wrong dtype": dict(t=tensor(np.zeros((1, 64), np.float64), dtype=common_pb2.DTYPE_FP64)),
    "wrong shape": dict(t=tensor(np.zeros((1, 63), np.float32))),
    "wrong rank": dict(t=tensor(np.zeros((64,), np.float32))),
    "wrong input name": dict(t=tensor(np.zeros((1, 64), np.float32), name="pixels")),
    "oversize batch": dict(t=tensor(np.zeros((17, 64), np.float32))),
    "undefined dtype number": dict(t=common_pb2.Tensor(name="input", dtype=99, shape=[1, 64], raw=b"\0" * 256)),
    "bytes do not match shape": dict(t=common_pb2.Tensor(name="input", dtype=common_pb2.DTYPE_FP32, shape=[1, 64],
                                                         raw=b"\0" * 10)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_invalid_argument_with_the_signature(stack, case):
    deploy(stack, 2)
    code, details = code_of(lambda: predict(stack, None, number=2, **BAD[case]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert any(f in details for f in ("input: FP32[-1, 64]", "max_batch_size 16", "not a margin.v1.DType")), details


def test_another_tenants_deployment_is_not_found(stack):
    deploy(stack, 2)
    code, _ = code_of(lambda: stack.stub("other").GetDeployment(
        inference_pb2.GetDeploymentRequest(name="digits-v2"), metadata=stack.md("other")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(lambda: predict(stack, np.zeros((1, 64), np.float32), number=2, tenant="other"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(lambda: deploy(stack, 2, tenant="other"))  # the registry says NOT_FOUND for them too
    assert code == grpc.StatusCode.NOT_FOUND


def test_routing_picks_the_cheapest_variant_that_meets_the_floor(stack):
    for n in (1, 2, 3):
        deploy(stack, n)
    x = np.zeros((1, 64), np.float32)

    def routed(minimum: float) -> inference_pb2.PredictResponse:
        return stack.stub().Predict(inference_pb2.PredictRequest(
            version=common_pb2.VersionRef(model="digits"), inputs=[tensor(x)],
            routing=inference_pb2.RoutingPolicy(floor=common_pb2.QualityFloor(metric="accuracy", minimum=minimum))),
            metadata=stack.md())

    # routing compares the cost as served through Triton, not the worker's bare-model figure in the metrics
    expected = cheapest_as_served(stack, [1, 2])  # v1 and v2 meet 0.95
    assert routed(0.95).served_version.number == expected
    expected = cheapest_as_served(stack, [1, 2, 3])  # all three meet 0.80
    assert routed(0.80).served_version.number == expected
    code, details = code_of(lambda: routed(0.99))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "digits-v1" in details and "accuracy=0.97" in details  # names the best available


def cheapest_as_served(stack, numbers: list[int]) -> int:
    """The version routing should pick among ``numbers``: by each deployment's served cost per million (the live
    allocated figure when all have one, else every Deploy figure), then the higher accuracy, then the newer."""
    billed_through(stack)  # what Triton did so far is in the live figures: they move only when a deployment serves
    found = {n: stack.stub().GetDeployment(inference_pb2.GetDeploymentRequest(name=f"digits-v{n}"),
                                           metadata=stack.md()) for n in numbers}
    live = all(d.served_cost_source == "triton" for d in found.values())
    accuracy = {1: 0.97, 2: 0.96, 3: 0.90}
    return min(numbers, key=lambda n: ((found[n].served_cost_per_million if live else found[n].cost_per_million).micros,
                                       -accuracy[n], -n))


def test_thousand_requests_from_eight_clients_lose_none_and_meter_exactly(stack):
    deploy(stack, 2)
    billed_through(stack)
    sessions = stack.inference.context.sessions
    with sessions() as s:
        before = s.scalar(select(func.coalesce(func.sum(LedgerRow.quantity), 0))
                          .where(LedgerRow.deployment == "digits-v2"))
    counted_before = REQUESTS.labels("acme", "digits")._value.get()
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    expected = stack.scripted[2](torch.from_numpy(x)).detach().numpy()

    def client(_: int) -> int:
        ok = 0
        for _ in range(125):
            ok += np.allclose(outputs(predict(stack, x, number=2)), expected, atol=1e-5)
        return ok

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client, range(8))) == 1000
    billed_through(stack)
    with sessions() as s:
        after = s.scalar(select(func.coalesce(func.sum(LedgerRow.quantity), 0))
                         .where(LedgerRow.deployment == "digits-v2"))
    assert after - before == 1000
    assert REQUESTS.labels("acme", "digits")._value.get() - counted_before == 1000


def test_rate_limit_is_resource_exhausted_with_a_retry_hint(stack):
    deploy(stack, 2)
    limiter = stack.inference.spec.extra["limiter"]
    tenant_id = stack.inference.context.tenants.authenticate(stack.cluster.keys["other"]).tenant_id
    # 'other' gets its own copy of the model so it has something to call
    stack.cluster.client("other").create_model("digits")
    upload_model(_as(stack, "other"),
                 "digits", stack.scripted[2], stack.home / "other.pt", {})
    deploy(stack, 1, tenant="other")
    limiter.set_limits(tenant_id, Limits(requests_per_second=0.5, burst=2))
    x = np.zeros((1, 64), np.float32)
    predict(stack, x, tenant="other")
    predict(stack, x, tenant="other")
    with pytest.raises(grpc.RpcError) as info:
        predict(stack, x, tenant="other")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in info.value.details()
    trailers = dict(info.value.trailing_metadata())
    assert 0 < int(trailers["retry-after-ms"]) <= 2000
    predict(stack, x)  # other tenants are unaffected


def _as(stack: Stack, tenant: str):
    """The conftest cluster, seen as another tenant (its client() uses that tenant's key)."""
    class View:
        def client(self, _tenant: str = tenant):
            return stack.cluster.client(tenant)
    return View()


def test_triton_down_is_unavailable_fast_then_recovers(stack):
    deploy(stack, 2)
    x = np.zeros((1, 64), np.float32)
    predict(stack, x, number=2)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(stack.inference.server.address))
    os.kill(stack.triton.proc.pid, signal.SIGKILL)
    stack.triton.proc.wait()
    start = time.monotonic()
    code, _ = code_of(lambda: predict(stack, x, number=2))
    assert code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 1.0
    deadline = time.monotonic() + 5
    while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never turned NOT_SERVING"
        time.sleep(0.05)

    stack.triton.start()
    stack.triton.wait_healthy(60)
    deadline = time.monotonic() + 60
    while True:  # recovers by itself: the watcher reloads the deployments, health returns to SERVING
        try:
            if health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
                predict(stack, x, number=2)
                break
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "the gateway did not recover after Triton came back"
        time.sleep(0.2)


def test_predict_stream_answers_each_request_in_order(stack):
    deploy(stack, 2)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((i + 1, 64)).astype(np.float32) for i in range(5)]
    requests = (inference_pb2.PredictRequest(version=common_pb2.VersionRef(model="digits", number=2),
                                             inputs=[tensor(x)], request_id=f"r{i}") for i, x in enumerate(xs))
    replies = list(stack.stub().PredictStream(requests, metadata=stack.md()))
    assert [r.request_id for r in replies] == [f"r{i}" for i in range(5)]
    for x, reply in zip(xs, replies, strict=True):
        assert np.allclose(outputs(reply), stack.scripted[2](torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    bad = iter([inference_pb2.PredictRequest(version=common_pb2.VersionRef(model="digits", number=2),
                                             inputs=[tensor(np.zeros((1, 3), np.float32))], request_id="bad")])
    [reply] = list(stack.stub().PredictStream(bad, metadata=stack.md()))  # answered, not the end of the stream
    assert reply.request_id == "bad" and reply.error.code == "INVALID_ARGUMENT"
    assert "input: FP32[-1, 64]" in reply.error.message


@pytest.mark.parametrize("request_fields, fragment", [
    (dict(device_class="tpu-v9"), "known classes"),
    (dict(batching=inference_pb2.BatchingConfig(max_batch_size=16, preferred_batch_sizes=[64])), "preferred"),
    (dict(instances=-1), "instances"),
    (dict(min_replicas=3, max_replicas=2), "replicas"),
])
def test_bad_deploy_requests_are_invalid_argument_and_leave_no_deployment(stack, request_fields, fragment):
    before = stack.stub().ListDeployments(inference_pb2.ListDeploymentsRequest(), metadata=stack.md()).deployments
    code, details = code_of(lambda: stack.stub().Deploy(inference_pb2.DeployRequest(
        version=common_pb2.VersionRef(model="digits", number=3), **request_fields), metadata=stack.md()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in details, details
    after = stack.stub().ListDeployments(inference_pb2.ListDeploymentsRequest(), metadata=stack.md()).deployments
    assert [(d.name, d.state) for d in after] == [(d.name, d.state) for d in before]


@dataclass
class Pooled:
    """A second inference service whose device classes have Tritons of their own, "cpu" and "nvidia-t4" (models
    still run KIND_CPU), each on its class's directory of the service's model repository (``<repo>/<class>``).
    It shares the stack's database, registry and Redis, and serves the model "pooled" (versions 1-3)."""

    view: Stack  # the stack as seen through this service
    tritons: dict[str, ManagedProcess]  # device class -> its Triton
    tenant_id: int

    def loaded(self, number: int) -> dict[str, bool]:
        """Whether each Triton (by device class) has pooled-v<number> ready, asking Triton itself."""
        name = f"t{self.tenant_id}--pooled-v{number}"
        ready = {}
        for device_class, triton in self.tritons.items():
            client = triton_grpc.InferenceServerClient(triton.spec.address)
            try:
                ready[device_class] = bool(client.is_model_ready(name))
            finally:
                client.close()
        return ready

    def health(self) -> int:
        return health(self.view)


@pytest.fixture(scope="module")
def pooled(stack):
    repository = stack.home / "pooled-repo"
    tritons = {}
    for device_class in ("cpu", "nvidia-t4"):
        (repository / device_class).mkdir(parents=True)
        spec = triton_spec(stack.home, repository / device_class)
        tritons[device_class] = ManagedProcess(dataclasses.replace(spec, name=f"triton-{device_class}"), stack.home)
        tritons[device_class].start()
    try:
        for triton in tritons.values():
            triton.wait_healthy(60)
        settings = dataclasses.replace(stack.settings, triton_url="127.0.0.1:1",  # unused: each class has a pool
                                       repository=repository,
                                       triton_urls={c: t.spec.address for c, t in tritons.items()})
        with another_service(stack, settings, "pooled", (11, 12, 13), "pooled") as (view, tenant_id):
            yield Pooled(view, tritons, tenant_id)
    finally:
        for triton in tritons.values():
            triton.stop()


def test_each_device_class_is_deployed_and_served_on_its_own_triton_pool(pooled):
    view = pooled.view
    assert deploy(view, 1, model="pooled", device_class="cpu").state == inference_pb2.DEPLOYMENT_STATE_READY
    d2 = deploy(view, 2, model="pooled", device_class="nvidia-t4")
    assert d2.state == inference_pb2.DEPLOYMENT_STATE_READY and d2.device_class == "nvidia-t4"
    assert d2.capacity_rps > 0  # calibrated on its own pool
    assert pooled.loaded(1) == {"cpu": True, "nvidia-t4": False}
    assert pooled.loaded(2) == {"cpu": False, "nvidia-t4": True}
    # each model sits in its class's directory: the repository a pool's new replica loads with --load-model=*
    repository = view.home / "pooled-repo"
    assert f"t{pooled.tenant_id}--pooled-v1" in {p.name for p in (repository / "cpu").iterdir()}
    assert f"t{pooled.tenant_id}--pooled-v2" in {p.name for p in (repository / "nvidia-t4").iterdir()}
    assert f"t{pooled.tenant_id}--pooled-v1" not in {p.name for p in (repository / "nvidia-t4").iterdir()}
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    for n in (1, 2):
        resp = predict(view, x, number=n, model="pooled")
        assert resp.deployment == f"pooled-v{n}"
        assert np.allclose(outputs(resp), view.scripted[n](torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_deploying_on_a_class_no_pool_serves_is_failed_precondition_and_leaves_nothing(pooled):
    view = pooled.view
    repository = view.home / "pooled-repo"
    before = [(d.name, d.state, d.device_class) for d in view.stub().ListDeployments(
        inference_pb2.ListDeploymentsRequest(model="pooled"), metadata=view.md()).deployments]
    files_before = sorted(repository.rglob("*"))
    code, details = code_of(lambda: deploy(view, 3, model="pooled", device_class="nvidia-l4"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "'nvidia-l4'" in details and "cpu, nvidia-t4" in details, details
    after = [(d.name, d.state, d.device_class) for d in view.stub().ListDeployments(
        inference_pb2.ListDeploymentsRequest(model="pooled"), metadata=view.md()).deployments]
    assert after == before and "pooled-v3" not in [name for name, _, _ in after]
    assert sorted(repository.rglob("*")) == files_before
    assert pooled.loaded(3) == {"cpu": False, "nvidia-t4": False}


def test_a_pool_down_is_not_serving_and_its_deployments_come_back_with_it(pooled):
    view = pooled.view
    deploy(view, 1, model="pooled", device_class="cpu")
    deploy(view, 2, model="pooled", device_class="nvidia-t4")
    x = np.zeros((1, 64), np.float32)
    t4 = pooled.tritons["nvidia-t4"]
    os.kill(t4.proc.pid, signal.SIGKILL)
    t4.proc.wait()
    wait_for(lambda: pooled.health() == health_pb2.HealthCheckResponse.NOT_SERVING, 5,
             "health never turned NOT_SERVING with the nvidia-t4 pool down")
    assert predict(view, x, number=1, model="pooled").deployment == "pooled-v1"  # the cpu pool still serves
    code, _ = code_of(lambda: predict(view, x, number=2, model="pooled"))
    assert code == grpc.StatusCode.UNAVAILABLE

    t4.start()
    t4.wait_healthy(60)
    wait_for(lambda: pooled.health() == health_pb2.HealthCheckResponse.SERVING, 60,
             "health did not return to SERVING after the nvidia-t4 pool came back")
    assert pooled.loaded(2) == {"cpu": False, "nvidia-t4": True}  # reloaded on its own pool only
    assert predict(view, x, number=2, model="pooled").deployment == "pooled-v2"


def test_redeploying_on_another_class_moves_the_deployment_between_pools(pooled):
    view = pooled.view
    deploy(view, 1, model="pooled", device_class="cpu")
    assert deploy(view, 1, model="pooled", device_class="nvidia-t4").device_class == "nvidia-t4"
    assert pooled.loaded(1) == {"cpu": False, "nvidia-t4": True}
    x = np.ones((2, 64), np.float32)
    assert np.allclose(outputs(predict(view, x, number=1, model="pooled")),
                       view.scripted[1](torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_a_spent_serving_budget_rejects_degrades_or_throttles_by_the_tenants_policy(stack):
    """Runs last: it spends acme's serving budget (a ledger entry written through RecordSpend, with the services'
    admin key) and sets its policy."""
    for n in (1, 2, 3):
        deploy(stack, n)
    budgets = budget_pb2_grpc.BudgetsStub(grpc.insecure_channel(stack.cluster.budget.server.address))
    budgets.RecordSpend(budget_pb2.RecordSpendRequest(entries=[budget_pb2.LedgerEntry(
        id="serving:test-spent", tenant="acme", category=budget_pb2.SPEND_CATEGORY_SERVING,
        amount=common_pb2.Money(micros=50), deployment="digits-v1", model="digits")]),
        metadata=(("authorization", f"Bearer {stack.cluster.admin_key}"),))

    def policy(name: int) -> None:
        budgets.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
            period=budget_pb2.BUDGET_PERIOD_DAILY, total=common_pb2.Money(micros=10_000_000), exhausted_policy=name,
            category_limits=[budget_pb2.CategoryLimit(category=budget_pb2.SPEND_CATEGORY_SERVING,
                                                      limit=common_pb2.Money(micros=50))])), metadata=stack.md())

    x = np.zeros((16, 64), np.float32)
    policy(budget_pb2.EXHAUSTED_POLICY_REJECT)
    code, details = code_of(lambda: predict(stack, x, number=1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "serving budget" in details and "$0.00005" in details
    policy(budget_pb2.EXHAUSTED_POLICY_DEGRADE)
    for _ in range(3):  # a metering pass between reading the figures and routing may reorder them: read again
        expected = cheapest_as_served(stack, [1, 2, 3])
        served = predict(stack, x, number=1).served_version.number
        if served == expected:
            break
    assert served == expected
    policy(budget_pb2.EXHAUSTED_POLICY_THROTTLE)
    time.sleep(2.5)  # a full bucket: 2,000 tokens
    served = refused = 0
    for _ in range(30):  # 16 rows × 10 tokens each: the bucket holds about 12 such requests, not 125
        try:
            served += predict(stack, x, number=1).served_version.number == 1
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused += 1
    assert refused > 0 and served <= 20, (served, refused)
    budgets.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
        period=budget_pb2.BUDGET_PERIOD_DAILY, total=common_pb2.Money(micros=10_000_000))), metadata=stack.md())
    time.sleep(2.5)
    assert all(predict(stack, x, number=1).served_version.number == 1 for _ in range(30))  # unthrottled again
