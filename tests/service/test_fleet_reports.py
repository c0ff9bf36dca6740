"""ReportFleet and what it writes, through the real Budgets server on port 0 over SQLite: the bill and its
allocation to the micro, idempotence (a retry, a second gateway), revenue, the views, the projection from the
current burn, and what a tenant key may and may not do."""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from margin.common import protoconv
from margin.common.costs import PriceCatalog
from margin.common.tenancy import PLATFORM_TENANT
from margin.sdk import connect
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2

PRICE = PriceCatalog.load().device("cpu").micros_per_hour
INTERVAL = 15


@pytest.fixture()
def budgets(cluster):
    conn = connect(cluster.budget.server.address, cluster.admin_key)
    yield budget_pb2_grpc.BudgetsStub(conn.channel), conn.metadata
    conn.close()


def tenant_md(cluster, tenant: str = "acme") -> tuple:
    return (("authorization", f"Bearer {cluster.keys[tenant]}"),)


def boundaries() -> Callable[[int], datetime]:
    """``aligned(n)``: the start of the interval n intervals before the one under way when this was called (one
    reference, so a test's intervals do not shift when a boundary passes while it reports them)."""
    now = int(time.time()) // INTERVAL * INTERVAL

    def aligned(ago_intervals: int) -> datetime:
        return datetime.fromtimestamp(now - ago_intervals * INTERVAL, UTC)
    return aligned



def deployment(tenant: str, name: str, compute_ns: int = 0, requests: int = 0, reserved_us: int = INTERVAL * 10**6,
               **kw) -> budget_pb2.FleetDeployment:
    kw.setdefault("state", "READY")
    kw.setdefault("device_class", "cpu")
    return budget_pb2.FleetDeployment(tenant=tenant, deployment=name, model=name.split("-")[0], version=1,
                                      triton_name=f"t--{tenant}--{name}",
                                      compute_ns=compute_ns, inferences=requests, gateway_requests=requests,
                                      reserved_replica_us=reserved_us, min_replicas=1, max_replicas=2,
                                      capacity_rps=100.0, price_micros_per_hour=PRICE, **kw)


def report(start: datetime, deployments=(), replica_us: int = INTERVAL * 10**6, observer: str = "gw-1",
           jobs=(), kind: str = "serving", pool: str = "triton/default", replica: str = "") \
        -> budget_pb2.ReportFleetRequest:
    pools = [budget_pb2.FleetPool(pool=pool, kind=kind, device_class="cpu", replica=replica, replica_us=replica_us,
                                  replicas=1, deployments=deployments, jobs=jobs)]
    return budget_pb2.ReportFleetRequest(interval_start=protoconv.timestamp(start), observer=observer, pools=pools,
                                         interval_end=protoconv.timestamp(start + timedelta(seconds=INTERVAL)))


def platform_lines(stub, md) -> dict[str, int]:
    entries = stub.ListLedger(budget_pb2.ListLedgerRequest(tenant=PLATFORM_TENANT, page_size=1000), metadata=md).entries
    totals: dict[str, int] = {}
    for e in entries:
        key = budget_pb2.SpendCategory.Name(e.category)
        totals[key] = totals.get(key, 0) + e.amount.micros
    return totals


def serving_of(stub, cluster, tenant: str) -> list[budget_pb2.LedgerEntry]:
    return [e for e in stub.ListLedger(budget_pb2.ListLedgerRequest(
        page_size=1000, category=budget_pb2.SPEND_CATEGORY_SERVING), metadata=tenant_md(cluster, tenant)).entries]


def test_a_pool_interval_is_billed_and_allocated_to_the_micro_once(cluster, budgets):
    stub, md = budgets
    aligned = boundaries()
    start = aligned(3)
    request = report(start, [deployment("acme", "digits-v1", compute_ns=2 * 10**9, requests=300),
                             deployment("other", "bert-v1", compute_ns=10**9, requests=100)])
    reply = stub.ReportFleet(request, metadata=md)
    assert (reply.billed, reply.duplicates) == (1, 0)
    bill = INTERVAL * PRICE // 3600  # 708 µ$ (and a third carried)
    acme, other = serving_of(stub, cluster, "acme"), serving_of(stub, cluster, "other")
    allocated = sum(e.amount.micros for e in acme)
    assert allocated + sum(e.amount.micros for e in other) == bill  # usage: all of it
    assert abs(sum(e.amount.micros for e in acme) - 2 * bill / 3) <= 1 and acme[0].quantity == 300
    assert {a.deployment: a.amount.micros for a in reply.allocations} == {
        "digits-v1": acme[0].amount.micros, "bert-v1": other[0].amount.micros}
    assert platform_lines(stub, md) == {"SPEND_CATEGORY_FLEET": bill}
    # the same observer again (a retry after a lost answer), and a second gateway: nothing billed twice
    assert (stub.ReportFleet(request, metadata=md).billed, stub.ReportFleet(request, metadata=md).duplicates) == (0, 1)
    second = report(start, [deployment("acme", "digits-v1", requests=50)], replica_us=3 * INTERVAL * 10**6,
                    observer="gw-2")
    assert stub.ReportFleet(second, metadata=md).duplicates == 1
    assert platform_lines(stub, md) == {"SPEND_CATEGORY_FLEET": bill}
    acme = serving_of(stub, cluster, "acme")
    assert sum(e.amount.micros for e in acme) == allocated  # no micro more
    assert sum(e.quantity for e in acme) == 350  # but the second gateway's requests are counted
    assert stub.ReportFleet(second, metadata=md).duplicates == 1 and sum(
        e.quantity for e in serving_of(stub, cluster, "acme")) == 350  # once


def test_the_idle_remainder_and_worker_pools_go_to_the_platforms_line(cluster, budgets):
    stub, md = budgets
    aligned = boundaries()
    stub.ReportFleet(report(aligned(4), replica_us=INTERVAL * 10**6), metadata=md)  # nothing deployed: all idle
    stub.ReportFleet(report(aligned(4), kind="worker", pool="worker/train.cpu", replica="w1", jobs=[
        budget_pb2.FleetJob(tenant="acme", job_id="tj-1", kind="training", busy_us=5 * 10**6)]), metadata=md)
    lines = platform_lines(stub, md)
    bill = INTERVAL * PRICE // 3600
    assert lines["SPEND_CATEGORY_FLEET"] == 2 * bill
    assert lines["SPEND_CATEGORY_JOBS"] + lines["SPEND_CATEGORY_IDLE"] == 2 * bill
    assert abs(lines["SPEND_CATEGORY_JOBS"] - bill / 3) <= 1  # 5 of 15 s busy
    fleet = stub.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_FLEET), metadata=md).fleet
    assert fleet.balanced and fleet.bill.micros == 2 * bill and fleet.tenants.micros == 0
    worker = next(p for p in fleet.pools if p.pool == "worker/train.cpu")
    assert abs(worker.utilization - 1 / 3) < 1e-9 and worker.replicas == 1


def test_revenue_follows_the_price_list_and_the_margin_view_is_each_tenants_own(cluster, budgets):
    stub, md = budgets
    aligned = boundaries()
    stub.SetPriceList(budget_pb2.SetPriceListRequest(price_list=budget_pb2.PriceList(tenant="acme", entries=[
        budget_pb2.PriceListEntry(model="digits", per_million=common_pb2.Money(micros=2_500_000))])), metadata=md)
    for i in range(3):  # 333 requests an interval at $2.50 per million: 832.5 µ$ each, the half carried, not dropped
        stub.ReportFleet(report(aligned(5 - i), [deployment("acme", "digits-v1", compute_ns=10**8, requests=333),
                                                 deployment("other", "digits-v1", compute_ns=10**8, requests=10)]),
                         metadata=md)
    mine = stub.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_MARGIN),
                         metadata=tenant_md(cluster)).margin
    assert [(line.tenant, line.model, line.requests) for line in mine.lines] == [("acme", "digits", 999)]
    assert mine.revenue.micros == 2497 and not mine.HasField("platform_idle")  # 999 × 2.5 = 2,497.5: half carried
    assert mine.gross_margin.micros == mine.revenue.micros - mine.cost.micros
    every = stub.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_MARGIN), metadata=md).margin
    assert {line.tenant for line in every.lines} == {"acme", "other"} and every.HasField("platform_idle")
    # revenue is not spend
    spend = stub.GetSpend(budget_pb2.GetSpendRequest(), metadata=tenant_md(cluster))
    assert spend.spent.micros == sum(line.amount.micros for line in spend.by_category) == mine.cost.micros


def test_the_projection_counts_an_idle_deployments_burn(cluster, budgets):
    """An idle deployment at its minimum for the last five minutes: the month ends at spent + its burn for the time
    left (about $0.17 an hour), not at the handful of micros spent so far."""
    stub, md = budgets
    aligned = boundaries()
    for i in range(20, 0, -1):
        stub.ReportFleet(report(aligned(i), [deployment("acme", "idle-v1")]), metadata=md)
    spend = stub.GetSpend(budget_pb2.GetSpendRequest(), metadata=tenant_md(cluster))
    assert abs(spend.burn_per_hour.micros - PRICE) <= PRICE * 0.02, spend.burn_per_hour
    now = datetime.now(UTC)
    month_end = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + timedelta(days=32)).replace(day=1)
    hours_left = (month_end - now).total_seconds() / 3600
    expected = spend.spent.micros + spend.burn_per_hour.micros * hours_left
    assert abs(spend.projected_end_of_period.micros - expected) <= 0.01 * expected + 10


@pytest.mark.parametrize(("change", "fragment"), [
    ({"interval_end": datetime(2020, 1, 1, tzinfo=UTC)}, "after interval_start"),
    ({"device_class": "quantum-9000"}, "unknown device class"),
    ({"tenant": "nobody"}, "unknown tenants"),
    ({"compute_ns": -1}, "never negative"),
    ({"kind": "gpu-farm"}, "kind must be one of"),
    ({"replica_us": 10**15}, "is not possible"),
    ({"state": "DANCING"}, "state must be one of"),
    ({"deployment_class": "quantum-9000"}, "unknown device class"),
])
def test_bad_reports_are_invalid_argument_and_bill_nothing(cluster, budgets, change, fragment):
    stub, md = budgets
    aligned = boundaries()
    request = report(aligned(2), [deployment(change.pop("tenant", "acme"), "digits-v1",
                                             compute_ns=change.pop("compute_ns", 0),
                                             state=change.pop("state", "READY"),
                                             device_class=change.pop("deployment_class", "cpu"))])
    pool = request.pools[0]
    for key in ("device_class", "kind", "replica_us"):
        if key in change:
            setattr(pool, key, change.pop(key))
    if "interval_end" in change:
        request.interval_end.CopyFrom(protoconv.timestamp(change.pop("interval_end")))
    with pytest.raises(grpc.RpcError) as info:
        stub.ReportFleet(request, metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()
    assert platform_lines(stub, md) == {}


def test_a_bad_price_list_is_invalid_argument_and_keeps_the_old_one(cluster, budgets):
    stub, md = budgets
    good = budget_pb2.PriceList(tenant="acme", entries=[budget_pb2.PriceListEntry(
        model="digits", per_million=common_pb2.Money(currency="USD", micros=1_000_000))])
    stub.SetPriceList(budget_pb2.SetPriceListRequest(price_list=good), metadata=md)
    for entry, fragment in ((budget_pb2.PriceListEntry(model="digits", per_million=common_pb2.Money(
            currency="dollars", micros=1)), "ISO 4217"),
            (budget_pb2.PriceListEntry(model="../x", per_request=common_pb2.Money(micros=1)), "not allowed"),
            (budget_pb2.PriceListEntry(model="digits", per_million=common_pb2.Money(micros=-1)), "negative")):
        with pytest.raises(grpc.RpcError) as info:
            stub.SetPriceList(budget_pb2.SetPriceListRequest(price_list=budget_pb2.PriceList(
                tenant="acme", entries=[entry])), metadata=md)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()
    assert stub.GetPriceList(budget_pb2.GetPriceListRequest(tenant="acme"), metadata=md) == good


def test_tenant_keys_never_write_or_read_the_platforms_lines(cluster, budgets):
    stub, md = budgets
    aligned = boundaries()
    mine = tenant_md(cluster)
    for call in (lambda: stub.ReportFleet(report(aligned(2)), metadata=mine),
                 lambda: stub.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_FLEET), metadata=mine),
                 lambda: stub.SetPriceList(budget_pb2.SetPriceListRequest(), metadata=mine),
                 lambda: stub.ListLedger(budget_pb2.ListLedgerRequest(tenant=PLATFORM_TENANT), metadata=mine),
                 lambda: stub.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_MARGIN, tenant="other"),
                                       metadata=mine),
                 lambda: stub.RecordSpend(budget_pb2.RecordSpendRequest(entries=[budget_pb2.LedgerEntry(
                     id="x", category=budget_pb2.SPEND_CATEGORY_SERVING)]), metadata=mine)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
    # not even the services' own credential writes the fleet metering's lines through RecordSpend
    for entry, fragment in ((budget_pb2.LedgerEntry(id="fleet:0123", tenant="acme",
                                                    category=budget_pb2.SPEND_CATEGORY_SERVING),
                             "belong to the fleet metering"),
                            (budget_pb2.LedgerEntry(id="x", tenant="acme", category=budget_pb2.SPEND_CATEGORY_REVENUE),
                             "spend category")):
        with pytest.raises(grpc.RpcError) as info:
            stub.RecordSpend(budget_pb2.RecordSpendRequest(entries=[entry]), metadata=md)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateApiKey(budget_pb2.CreateApiKeyRequest(tenant=PLATFORM_TENANT), metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
