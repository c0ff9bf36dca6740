"""The Budgets service on port 0 over SQLite: budgets, the idempotent ledger, spend reports, alerts."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import grpc
import pytest
from google.protobuf import timestamp_pb2
from margin.budget.alerts import SIGNATURE_HEADER
from margin.budget.periods import bounds, projected_micros
from margin.sdk import connect
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2

from tests.conftest import running_cluster

CAT = budget_pb2.SpendCategory


def stub(cluster, tenant: str = "acme") -> tuple[budget_pb2_grpc.BudgetsStub, tuple]:
    key = cluster.admin_key if tenant == "admin" else cluster.keys[tenant]
    conn = connect(cluster.budget.server.address, key)
    return budget_pb2_grpc.BudgetsStub(conn.channel), conn.metadata


def money(micros: int) -> common_pb2.Money:
    return common_pb2.Money(micros=micros, currency="USD")


def stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def entry(i: str, category: int, micros: int, **fields) -> budget_pb2.LedgerEntry:
    return budget_pb2.LedgerEntry(id=i, category=category, amount=money(micros), **fields)


def record(cluster, tenant: str, entries: list[budget_pb2.LedgerEntry]) -> budget_pb2.RecordSpendResponse:
    """RecordSpend as Margin's services call it: with the admin key, each entry naming its tenant."""
    admin, amd = stub(cluster, "admin")
    for e in entries:
        e.tenant = tenant
    return admin.RecordSpend(budget_pb2.RecordSpendRequest(entries=entries), metadata=amd)


def set_budget(cluster, total: int, tenant: str = "acme", **fields) -> budget_pb2.Budget:
    s, md = stub(cluster, tenant)
    secret = fields.pop("webhook_secret", "")
    return s.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
        period=budget_pb2.BUDGET_PERIOD_MONTHLY, total=money(total), **fields), webhook_secret=secret), metadata=md)


def test_spend_by_category_model_and_deployment_sums_exactly_to_the_ledger(cluster):
    budget = set_budget(cluster, 1_000_000, category_limits=[
        budget_pb2.CategoryLimit(category=CAT.Value("SPEND_CATEGORY_SERVING"), limit=money(300_000))])
    assert budget.period_start.seconds and budget.period_end.seconds > budget.period_start.seconds
    s, md = stub(cluster)
    entries = [entry("t1", CAT.Value("SPEND_CATEGORY_TRAINING"), 123_457, model="digits", job_id="job-1"),
               entry("c1", CAT.Value("SPEND_CATEGORY_COMPRESSION"), 20_001, model="digits"),
               *[entry(f"s{i}", CAT.Value("SPEND_CATEGORY_SERVING"), 7 + i, model="digits",
                       deployment="digits-v2", quantity=32) for i in range(100)]]
    reply = record(cluster, "acme", entries)
    assert (reply.recorded, reply.duplicates) == (102, 0)
    report = s.GetSpend(budget_pb2.GetSpendRequest(), metadata=md)
    ledger_total = 123_457 + 20_001 + sum(7 + i for i in range(100))
    assert report.spent.micros == ledger_total == sum(line.amount.micros for line in report.by_category)
    assert {line.key: line.amount.micros for line in report.by_category} == {
        "training": 123_457, "compression": 20_001, "serving": sum(7 + i for i in range(100))}
    assert report.remaining.micros == 1_000_000 - ledger_total
    serving = next(line for line in report.by_category if line.key == "serving")
    assert serving.limit.micros == 300_000 and serving.entries == 100
    assert [(d.key, d.amount.micros) for d in report.by_deployment] == [("digits-v2", serving.amount.micros)]
    assert sum(line.amount.micros for line in report.by_model) == ledger_total
    assert report.projected_end_of_period.micros >= ledger_total


def test_the_same_entry_ids_never_bill_twice_even_from_concurrent_writers(cluster):
    set_budget(cluster, 10_000_000, tenant="other")
    ids = [f"serving:batch-{i}" for i in range(60)]

    def write(offset: int) -> tuple[int, int]:
        batch = [entry(i, CAT.Value("SPEND_CATEGORY_SERVING"), 3) for i in ids[offset:] + ids[:offset]]
        reply = record(cluster, "other", batch)
        return reply.recorded, reply.duplicates

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(write, range(0, 80, 10)))
    assert sum(r for r, _ in results) == 60
    assert all(r + d == 60 for r, d in results)
    s, md = stub(cluster, "other")
    assert s.GetSpend(budget_pb2.GetSpendRequest(), metadata=md).spent.micros == 180


def test_the_ledger_pages_in_order_without_gaps_and_is_private(cluster):
    s, md = stub(cluster)
    record(cluster, "acme", [entry(f"page-{i:02d}", CAT.Value("SPEND_CATEGORY_TRAINING"), i + 1) for i in range(10)])
    seen, token = [], ""
    while True:
        page = s.ListLedger(budget_pb2.ListLedgerRequest(page_size=3, page_token=token,
                                                         category=CAT.Value("SPEND_CATEGORY_TRAINING")),
                            metadata=md)
        assert len(page.entries) <= 3
        seen += [e.id for e in page.entries]
        if not (token := page.next_page_token):
            break
    assert len(seen) == len(set(seen)) and {f"page-{i:02d}" for i in range(10)} <= set(seen)
    other, omd = stub(cluster, "other")
    assert not {e.id for e in other.ListLedger(budget_pb2.ListLedgerRequest(page_size=1000),
                                               metadata=omd).entries} & set(seen)
    hour = timedelta(hours=1)
    window = {name: s.ListLedger(budget_pb2.ListLedgerRequest(page_size=1000, **{name: ts}), metadata=md).entries
              for name, ts in (("since", stamp(datetime.now(UTC) + hour)), ("until", stamp(datetime.now(UTC) - hour)))}
    assert window == {"since": [], "until": []}
    assert {e.id for e in s.ListLedger(budget_pb2.ListLedgerRequest(
        page_size=1000, since=stamp(datetime.now(UTC) - hour), until=stamp(datetime.now(UTC) + hour)),
        metadata=md).entries} >= set(seen)
    with pytest.raises(grpc.RpcError) as err:
        s.ListLedger(budget_pb2.ListLedgerRequest(page_token="bogus"), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"total": money(-5)}, "positive"),
    ({"period": budget_pb2.BUDGET_PERIOD_UNSPECIFIED}, "period"),
    ({"alert_thresholds": [0.5, 0.5]}, "distinct"),
    ({"alert_thresholds": [-1.0]}, "fractions"),
    ({"webhook_url": "ftp://example"}, "http"),
    ({"webhook_url": "http://127.0.0.1:9/hook"}, "webhook_secret"),
    ({"category_limits": [budget_pb2.CategoryLimit(category=0, limit=money(1))]}, "category"),
])
def test_bad_budgets_are_invalid_argument_and_change_nothing(cluster, fields, fragment):
    s, md = stub(cluster)
    before = s.GetSpend(budget_pb2.GetSpendRequest(), metadata=md).budget
    budget = budget_pb2.Budget(period=budget_pb2.BUDGET_PERIOD_DAILY, total=money(100))
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(budget, key).extend(value)
        elif isinstance(value, common_pb2.Money):
            getattr(budget, key).CopyFrom(value)
        else:
            setattr(budget, key, value)
    with pytest.raises(grpc.RpcError) as err:
        s.SetBudget(budget_pb2.SetBudgetRequest(budget=budget), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()
    assert s.GetSpend(budget_pb2.GetSpendRequest(), metadata=md).budget == before


def test_tenant_keys_act_on_their_own_tenant_and_the_admin_names_one(cluster):
    s, md = stub(cluster)
    with pytest.raises(grpc.RpcError) as err:
        s.GetSpend(budget_pb2.GetSpendRequest(tenant="other"), metadata=md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        s.RecordSpend(budget_pb2.RecordSpendRequest(entries=[
            entry("x", CAT.Value("SPEND_CATEGORY_TRAINING"), 1, tenant="other")]), metadata=md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin, amd = stub(cluster, "admin")
    admin.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
        tenant="acme", period=budget_pb2.BUDGET_PERIOD_DAILY, total=money(500))), metadata=amd)
    report = s.GetSpend(budget_pb2.GetSpendRequest(), metadata=md)  # acme sees what the admin set for it
    assert report.budget.tenant == "acme" and report.budget.total.micros == 500 == report.remaining.micros
    with pytest.raises(grpc.RpcError) as err:
        admin.GetSpend(budget_pb2.GetSpendRequest(), metadata=amd)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name the tenant" in err.value.details()
    for bad in ([entry("", CAT.Value("SPEND_CATEGORY_TRAINING"), 1, tenant="acme")],
                [entry("neg", CAT.Value("SPEND_CATEGORY_TRAINING"), -1, tenant="acme")],
                [entry("nocat", 0, 1, tenant="acme")]):
        with pytest.raises(grpc.RpcError) as err:
            admin.RecordSpend(budget_pb2.RecordSpendRequest(entries=bad), metadata=amd)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append((json.loads(body), self.headers[SIGNATURE_HEADER], body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def quiet_cluster(tmp_path, monkeypatch):
    """A cluster whose background alert watcher waits an hour: the test drives ``check_once`` itself. Its webhook
    receiver listens on loopback, which the operator's allow-list admits here."""
    monkeypatch.setenv("MARGIN_BUDGET_ALERT_INTERVAL_SECONDS", "3600")
    monkeypatch.setenv("MARGIN_WEBHOOK_ALLOW", "127.0.0.1")
    with running_cluster(f"sqlite:///{tmp_path / 'margin.db'}", tmp_path / "artifacts") as c:
        yield c


def test_each_threshold_fires_once_with_a_signed_webhook(quiet_cluster):
    cluster = quiet_cluster
    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        admin, amd = stub(cluster, "admin")
        admin.CreateTenant(budget_pb2.CreateTenantRequest(name="alerted"), metadata=amd)
        s, md = stub(cluster, "admin")
        s.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
            tenant="alerted", period=budget_pb2.BUDGET_PERIOD_DAILY, total=money(1_000),
            webhook_url=f"http://127.0.0.1:{server.server_port}/hook"), webhook_secret="s3cret"), metadata=md)
        watcher = cluster.budget.spec.extra["alerts"]

        def spend(i: str, micros: int) -> list[float]:
            s.RecordSpend(budget_pb2.RecordSpendRequest(entries=[
                entry(i, CAT.Value("SPEND_CATEGORY_SERVING"), micros, tenant="alerted")]), metadata=md)
            return [a.threshold for a in watcher.check_once() if a.tenant == "alerted"]

        assert spend("a", 499) == []
        assert spend("b", 1) == [0.5]            # exactly half: integer micros, no float drift
        assert spend("c", 100) == []
        assert spend("d", 400) == [0.8, 1.0]     # 1000 of 1000
        assert spend("e", 1) == [] and [a for a in watcher.check_once() if a.tenant == "alerted"] == []
        assert [p["threshold"] for p, _, _ in Hook.received] == [0.5, 0.8, 1.0]
        for payload, signature, body in Hook.received:
            expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(signature, expected) and payload["tenant"] == "alerted"
    finally:
        server.shutdown()


def test_periods_and_the_projection_are_exact():
    assert bounds("monthly", datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    start, end = bounds("daily", datetime(2026, 11, 22, 6, tzinfo=UTC))
    assert end - start == timedelta(days=1)
    assert projected_micros(250, start, end, start + timedelta(hours=6)) == 1000
    assert projected_micros(1, start, end, start + timedelta(hours=7)) == 3  # rounded down, never a float
    assert projected_micros(0, start, end, start) == 0
