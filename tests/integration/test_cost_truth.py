"""The ledger equals the bill, against a real tritonserver, redis-server, registry, budget and inference service.

Every metering interval (1 s here) the gateway reports its Triton pool's live replica time and Triton's own per-model
statistics; the budget service bills replica-seconds × price and allocates all of it. These tests read the ledger
back and check it against figures the platform did not make: the tritonserver process's up-time from /proc, and
Triton's statistics read directly.
"""
from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from fractions import Fraction

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from margin.budget.fleet.tables import FleetIntervalRow
from margin.budget.store import AlertRow
from margin.common import protoconv
from margin.common.costs import PriceCatalog
from margin.common.ledger import LedgerRow
from margin.common.tenancy import PLATFORM_TENANT, TenantRow
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2, inference_pb2
from sqlalchemy import func, select

from tests.integration.inference_stack import (
    FLEET_INTERVAL_S,
    billed_through,
    code_of,
    deploy,
    inference_stack,
    predict,
    scripted_mlp,
    upload_model,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]
PRICE = PriceCatalog.load().device("cpu").micros_per_hour  # the local Triton's replicas are priced as cpu
POOL = "triton/default"
X = np.zeros((1, 64), np.float32)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with inference_stack(tmp_path_factory.mktemp("cost-truth")) as s:
        yield s


def next_boundary(after: float | None = None) -> float:
    """The start of the next metering interval after ``after`` (now)."""
    after = time.time() if after is None else after
    return (int(after / FLEET_INTERVAL_S) + 1) * FLEET_INTERVAL_S


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def intervals(stack, since: float, until: float) -> list[FleetIntervalRow]:
    """The pool's billed intervals lying within [since, until]."""
    with stack.inference.context.sessions() as s:
        return list(s.scalars(select(FleetIntervalRow).where(
            FleetIntervalRow.pool == POOL, FleetIntervalRow.start_us >= int(since * 1e6),
            FleetIntervalRow.end_us <= int(until * 1e6)).order_by(FleetIntervalRow.start_us)))


def lines_of(stack, interval: FleetIntervalRow) -> dict[str, int]:
    """The ledger lines dated at the interval's end: the bill, each tenant deployment's allocation, the idle line."""
    with stack.inference.context.sessions() as s:
        rows = s.execute(select(LedgerRow.category, LedgerRow.id, LedgerRow.deployment, LedgerRow.micros,
                                TenantRow.name).join(TenantRow, TenantRow.id == LedgerRow.tenant_id)
                         .where(LedgerRow.created_at == interval.ended_at)).all()
    lines: dict[str, int] = {}
    for category, entry_id, deployment, micros, tenant in rows:
        if category == "serving" and entry_id.startswith("alloc:"):
            lines[f"{tenant}/{deployment}"] = micros
        elif category in ("fleet", "idle") and tenant == PLATFORM_TENANT:
            lines[category] = micros
    return lines


def process_up_seconds(pid: int, since: float, until: float) -> float:
    """How long process ``pid`` was up within [since, until], from the kernel's start time in /proc (not from
    anything Margin measured)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start_ticks = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
    boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
    started = boot + start_ticks / ticks
    return max(0.0, min(until, time.time()) - max(since, started))


def steady_traffic(stack, number: int, rate: float, count: int) -> int:
    """``count`` requests to digits v``number`` at ``rate`` per second, paced; returns how many were served."""
    served = 0
    start = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        served += predict(stack, X, number=number).served_version.number == number
    return served


def test_the_pools_bill_is_allocated_to_the_micro_under_each_idle_policy(stack):
    """Two deployments on one pool; traffic to one for a while, then none. Under each policy, every interval's
    allocations plus the platform's idle line are its bill exactly, the bill is the replica-seconds × price, and the
    whole ledger total is within 2 % of the tritonserver process's own up-time × price."""
    fleet = stack.cluster.budget.spec.extra["fleet"]
    for n in (1, 2):
        deploy(stack, n)
    window_start = next_boundary(time.time() + 1)
    sleep_until(window_start)
    for policy in ("usage", "reservation", "platform"):
        fleet.policy = policy
        start = next_boundary()
        sleep_until(start)
        busy_until = start + 3 * FLEET_INTERVAL_S
        while time.time() < busy_until:
            predict(stack, X, number=1)
        end = next_boundary(busy_until + 2.5 * FLEET_INTERVAL_S)
        sleep_until(end)
        billed_through(stack, end)
        billed = [i for i in intervals(stack, start, end) if i.policy == policy]
        assert len(billed) >= 4, f"{policy}: {len(billed)} intervals billed"
        busy = idle = 0
        for interval in billed:
            lines = lines_of(stack, interval)
            tenants = {k: v for k, v in lines.items() if "/" in k}
            assert sum(tenants.values()) + lines.get("idle", 0) == lines["fleet"] == interval.bill_micros, \
                (policy, lines)
            exact = Fraction(interval.replica_us * PRICE, 3_600_000_000)
            assert abs(interval.bill_micros - exact) < 1
            v1, v2 = tenants.get("acme/digits-v1", 0), tenants.get("acme/digits-v2", 0)
            if interval.used_ns and policy == "usage":      # all of it split by compute time: only v1 computed
                busy += 1
                assert v1 == interval.bill_micros and v2 == 0 and lines.get("idle", 0) == 0
            elif policy in ("usage", "reservation"):        # by reserved replicas: alike, nothing idle
                idle += 1
                assert abs(v1 - v2) <= 1 and lines.get("idle", 0) == 0
            elif policy == "platform":                      # usage share only; the rest is the platform's
                share = Fraction(interval.bill_micros * interval.used_ns, interval.replica_us * 1000)
                assert abs(v1 + v2 - share) < 2 and lines.get("idle", 0) >= interval.bill_micros - share - 2
        if policy == "usage":
            assert busy >= 2 and idle >= 1, (busy, idle)
    window_end = end
    every = intervals(stack, window_start, window_end)
    total = sum(i.bill_micros for i in every)
    up = process_up_seconds(stack.triton.proc.pid, window_start, window_end)
    independent = up * PRICE / 3600
    assert abs(total - independent) <= 0.02 * independent, (total, independent, up)
    fleet.policy = "usage"


def test_steady_requests_are_billed_their_exact_usage_share_and_calibration_is_the_deployers(stack):
    """1,000 requests at a low steady rate: the deployment's entries sum to its usage share computed from Triton's
    own statistics (read here, not by the gateway) within a micro — never 0; the calibration Deploy sends straight
    to Triton is allocated to the tenant that deployed."""
    fleet = stack.cluster.budget.spec.extra["fleet"]
    fleet.policy = "platform"  # the usage share is then compute time × price, whatever else the pool does
    triton = triton_grpc.InferenceServerClient(stack.triton.spec.address)
    try:
        before_deploy = time.time()
        deploy(stack, 3)
        after_deploy = next_boundary()
        billed_through(stack, after_deploy)
        with stack.inference.context.sessions() as s:
            calibration = s.execute(select(func.sum(LedgerRow.micros), func.sum(LedgerRow.quantity), TenantRow.name)
                                    .join(TenantRow, TenantRow.id == LedgerRow.tenant_id)
                                    .where(LedgerRow.deployment == "digits-v3", LedgerRow.id.like("alloc:%"),
                                           LedgerRow.created_at > datetime.fromtimestamp(before_deploy, UTC))
                                    .group_by(TenantRow.name)).all()
        assert [(tenant, requests) for _, requests, tenant in calibration] == [("acme", 0)]
        assert calibration[0][0] > 0, "Deploy's calibration traffic used the replica: acme pays for it"

        def compute_ns() -> int:
            stats = triton.get_inference_statistics("t{}--digits-v3".format(tenant_id(stack, "acme")),
                                                    as_json=True)["model_stats"]
            return sum(int(b.get(k, {}).get("ns", 0)) for m in stats for b in m.get("batch_stats", [])
                       for k in ("compute_input", "compute_infer", "compute_output"))

        start = next_boundary()
        billed_through(stack, start)  # the interval ending at start is read and billed before the traffic
        used_before = compute_ns()
        assert steady_traffic(stack, 3, rate=50.0, count=1000) == 1000
        end = next_boundary()
        billed_through(stack, end)
        used = compute_ns() - used_before
        window = intervals(stack, start, end)
        # the gateway read exactly what Triton says this deployment computed (the others were idle)
        assert sum(i.used_ns for i in window) == used > 0 and all(i.policy == "platform" for i in window)
        share = sum((Fraction(i.bill_micros * i.used_ns, i.replica_us * 1000) for i in window), Fraction(0))
        with stack.inference.context.sessions() as s:
            micros, requests = s.execute(select(func.sum(LedgerRow.micros), func.sum(LedgerRow.quantity)).where(
                LedgerRow.deployment == "digits-v3", LedgerRow.id.like("alloc:%"),
                LedgerRow.created_at > datetime.fromtimestamp(start, UTC))).one()
        assert requests == 1000
        assert micros > 0 and abs(micros - share) <= 1, (micros, float(share))
        # and the usage share is the compute time × the price, to within the bill's own rounding
        assert abs(share - Fraction(used * PRICE, 3_600_000_000_000)) < 1
    finally:
        triton.close()
        fleet.policy = "usage"


def tenant_id(stack, name: str) -> int:
    with stack.inference.context.sessions() as s:
        return s.scalar(select(TenantRow.id).where(TenantRow.name == name))


def test_an_idle_deployment_scales_to_zero_and_a_request_brings_it_back(stack):
    """min_replicas 0 and 3 s of idleness allowed: direct traffic to Triton keeps it loaded (it used the replica),
    then it is unloaded; the next Predict waits for the cold start and is served, and GetDeployment says so."""
    stub, md = stack.stub(), stack.md()
    deployed = stub.Deploy(inference_pb2.DeployRequest(
        version=common_pb2.VersionRef(model="digits", number=2), min_replicas=0, max_replicas=2,
        scale_to_zero_after_seconds=3, batching=inference_pb2.BatchingConfig(max_batch_size=16)), metadata=md)
    assert deployed.min_replicas == 0 and deployed.scale_to_zero_after_seconds == 3
    triton = triton_grpc.InferenceServerClient(stack.triton.spec.address)
    name = f"t{tenant_id(stack, 'acme')}--digits-v2"
    direct = triton_grpc.InferInput("input", [1, 64], "FP32")
    direct.set_data_from_numpy(X)
    until = time.time() + 5
    while time.time() < until:  # traffic that bypasses the gateway still counts as use
        triton.infer(name, [direct])
        time.sleep(0.3)
    get = lambda: stub.GetDeployment(inference_pb2.GetDeploymentRequest(name="digits-v2"), metadata=md)  # noqa: E731
    assert get().state == inference_pb2.DEPLOYMENT_STATE_READY
    wait_for(lambda: get().state == inference_pb2.DEPLOYMENT_STATE_SCALED_TO_ZERO, 20, "it never scaled to zero")
    assert not triton.is_model_ready(name) and "idle" in get().message
    reply = predict(stack, X, number=2)
    assert reply.served_version.number == 2
    again = get()
    assert again.state == inference_pb2.DEPLOYMENT_STATE_READY and again.last_cold_start_ms > 0
    assert again.HasField("last_cold_start_time")
    triton.close()
    deploy(stack, 2)  # back to min 1 for the others


def test_an_idle_deployment_under_a_small_budget_alerts_scales_to_zero_and_stops_spending(stack):
    """'other' deploys at min 1 and sends nothing, under a small daily serving budget and the reject policy. Its
    share of the idle pool is billed every interval until the 50/80/100 % alerts have fired; once what is left cannot
    pay for its minimum it is scaled to zero and its spend stops within one metering interval of the budget. A
    Predict then is refused by the policy; with the budget raised it waits for a cold start and is served — or, past
    the cold-start timeout, answers UNAVAILABLE with a retry hint and is served when retried. Nothing is lost."""
    cluster = stack.cluster
    client = cluster.client("other")
    client.create_model("lean")
    upload_model(cluster, "lean", scripted_mlp(7), stack.home / "lean.pt", {}, tenant="other")
    stub, md = stack.stub("other"), stack.md("other")
    stub.Deploy(inference_pb2.DeployRequest(version=common_pb2.VersionRef(model="lean", number=1),
                                            batching=inference_pb2.BatchingConfig(max_batch_size=16)), metadata=md)
    budgets = budget_pb2_grpc.BudgetsStub(grpc.insecure_channel(cluster.budget.server.address))
    limit = 400  # µ$ more than spent: a share of a $0.17/h replica (47 µ$ a second) runs through it in seconds

    def set_budget(total: int) -> None:  # all of 'other''s spend is serving
        budgets.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
            period=budget_pb2.BUDGET_PERIOD_DAILY, total=common_pb2.Money(micros=total),
            exhausted_policy=budget_pb2.EXHAUSTED_POLICY_REJECT, alert_thresholds=[0.5, 0.8, 1.0])), metadata=md)

    def serving_spent() -> int:
        report = budgets.GetSpend(budget_pb2.GetSpendRequest(), metadata=md)
        return next((line.amount.micros for line in report.by_category if line.key == "serving"), 0)

    spent_before = serving_spent()  # the deploy's calibration and the intervals since
    budget = spent_before + limit
    set_budget(budget)
    get = lambda: stub.GetDeployment(inference_pb2.GetDeploymentRequest(name="lean-v1"), metadata=md)  # noqa: E731
    alerts = cluster.budget.spec.extra["alerts"]

    def scaled_to_zero() -> bool:
        alerts.check_once()  # the watcher does this every few seconds; here at every look, so no threshold is late
        return get().state == inference_pb2.DEPLOYMENT_STATE_SCALED_TO_ZERO

    wait_for(scaled_to_zero, 90, "the deployment was never scaled to zero")
    assert "budget" in get().message
    end = next_boundary(time.time() + 3 * FLEET_INTERVAL_S)
    sleep_until(end)
    billed_through(stack, end)
    alerts.check_once()
    with stack.inference.context.sessions() as s:
        fired = sorted(s.scalars(select(AlertRow.threshold).where(AlertRow.tenant_id == tenant_id(stack, "other"))))
    assert fired == [0.5, 0.8, 1.0]
    spent = serving_spent()
    interval_bill = -(-PRICE * int(FLEET_INTERVAL_S * 1000) // 3_600_000)  # the pool's bill for one interval
    assert abs(spent - budget) <= interval_bill, (spent, budget, interval_bill)
    time.sleep(3 * FLEET_INTERVAL_S)
    billed_through(stack)
    assert serving_spent() == spent, "a deployment scaled to zero is not billed"

    x = np.zeros((1, 64), np.float32)
    code, details = code_of(lambda: predict(stack, x, number=1, tenant="other", model="lean"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "serving budget" in details  # the reject policy
    set_budget(spent + 1_000_000)
    scaler = stack.inference.spec.extra["scaler"]
    settings = scaler.settings
    scaler.settings = type(settings)(settings.interval_s, settings.scale_to_zero_after_s, 0.001)
    try:
        with pytest.raises(grpc.RpcError) as info:  # the load takes longer than this request may wait
            predict(stack, x, number=1, tenant="other", model="lean")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in info.value.details()
        hint = dict(info.value.trailing_metadata())["retry-after-ms"]
        assert int(hint) > 0
    finally:
        scaler.settings = settings
    wait_for(lambda: get().state == inference_pb2.DEPLOYMENT_STATE_READY, 60, "the cold start never finished")
    assert predict(stack, x, number=1, tenant="other", model="lean").served_version.model == "lean"
    assert get().last_cold_start_ms > 0


def test_two_observers_of_one_pool_bill_each_interval_once(stack):
    """A retried report, or a second gateway reporting the same pool and interval, bills nothing twice."""
    observer = stack.inference.spec.extra["observer"]
    end = next_boundary()
    billed_through(stack, end)
    last = intervals(stack, end - 5 * FLEET_INTERVAL_S, end)[-1]
    lines = lines_of(stack, last)
    budgets = budget_pb2_grpc.BudgetsStub(grpc.insecure_channel(stack.cluster.budget.server.address))
    again = budget_pb2.ReportFleetRequest(
        interval_start=protoconv.timestamp(datetime.fromtimestamp(last.start_us / 1e6, UTC)),
        interval_end=protoconv.timestamp(datetime.fromtimestamp(last.end_us / 1e6, UTC)),
        pools=[budget_pb2.FleetPool(pool=POOL, kind="serving", device_class="cpu", replica_us=last.replica_us * 3,
                                    replicas=3)], observer="another-gateway")
    reply = budgets.ReportFleet(again, metadata=(("authorization", f"Bearer {stack.cluster.admin_key}"),))
    assert (reply.billed, reply.duplicates) == (0, 1)
    assert lines_of(stack, last) == lines and observer.name != "another-gateway"
    code, _ = code_of(lambda: budgets.ReportFleet(again, metadata=stack.md()))
    assert code == grpc.StatusCode.PERMISSION_DENIED  # a tenant key never writes the bill

