"""Declarative tenant budgets (MARGIN_BUDGETS_FILE): the real Budgets service on port 0 over SQLite, started with a
budgets file; restarted with the same file it changes nothing; a malformed file stops it from starting."""
from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
from margin.budget.service import build_budget
from margin.budget.store import BudgetRow
from margin.common.config import ConfigError
from margin.common.service import StartedService, start_service
from margin.common.tenancy import PLATFORM_TENANT, TenantRow
from margin.sdk import connect
from margin.v1 import budget_pb2, budget_pb2_grpc
from sqlalchemy import func, select

CAT = budget_pb2.SpendCategory
ADMIN_KEY = "adm_" + secrets.token_urlsafe(24)

SEED = """\
# rendered by the Helm chart from its `tenants` values
- name: acme
  period: monthly
  currency: USD
  total: "3000"
  limits: {training: "1000", compression: "200", serving: "1500.25"}
  policy: degrade
  thresholds: [0.5, 0.8, 1.0]
- name: globex
  period: daily
  total: 12.345678          # a YAML number: read as a decimal, exactly 12,345,678 micros
  thresholds: [0.9, 0.25]
"""


@contextmanager
def budget_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None) -> Iterator[StartedService]:
    """The Budgets service over ``tmp_path``'s database, started with ``text`` as its budgets file."""
    if text is not None:
        path = tmp_path / "budgets.yaml"
        path.write_text(text)
        monkeypatch.setenv("MARGIN_BUDGETS_FILE", str(path))
    else:
        monkeypatch.delenv("MARGIN_BUDGETS_FILE", raising=False)
    monkeypatch.setenv("MARGIN_BUDGET_ALERT_INTERVAL_SECONDS", "3600")
    monkeypatch.setenv("MARGIN_AUTOSCALER_INTERVAL_SECONDS", "0")
    service = start_service(build_budget, database_url=f"sqlite:///{tmp_path / 'margin.db'}", admin_key=ADMIN_KEY)
    try:
        yield service
    finally:
        service.stop()


def spend(service: StartedService, tenant: str) -> budget_pb2.SpendReport:
    conn = connect(service.server.address, ADMIN_KEY)
    try:
        return budget_pb2_grpc.BudgetsStub(conn.channel).GetSpend(budget_pb2.GetSpendRequest(tenant=tenant),
                                                                  metadata=conn.metadata, timeout=10)
    finally:
        conn.close()


def rows(service: StartedService) -> tuple[dict[str, int], dict[int, datetime]]:
    """(tenant name -> id, tenant id -> its budget row's updated_at), read straight from the database."""
    with service.context.sessions() as s:
        tenants = {r.name: r.id for r in s.scalars(select(TenantRow)) if r.name != PLATFORM_TENANT}
        updated = {r.tenant_id: r.updated_at for r in s.scalars(select(BudgetRow))}
    return tenants, updated


def test_the_file_creates_tenants_and_sets_their_budgets_exactly(tmp_path, monkeypatch):
    with budget_service(tmp_path, monkeypatch, SEED) as service:
        acme = spend(service, "acme").budget
        assert acme.tenant == "acme" and acme.period == budget_pb2.BUDGET_PERIOD_MONTHLY
        assert (acme.total.micros, acme.total.currency) == (3_000_000_000, "USD")
        assert {CAT.Name(c.category): c.limit.micros for c in acme.category_limits} == {
            "SPEND_CATEGORY_TRAINING": 1_000_000_000, "SPEND_CATEGORY_COMPRESSION": 200_000_000,
            "SPEND_CATEGORY_SERVING": 1_500_250_000}
        assert acme.exhausted_policy == budget_pb2.EXHAUSTED_POLICY_DEGRADE
        assert list(acme.alert_thresholds) == [0.5, 0.8, 1.0]
        globex = spend(service, "globex")
        assert globex.budget.period == budget_pb2.BUDGET_PERIOD_DAILY
        assert globex.budget.total.micros == 12_345_678 == globex.remaining.micros  # no float on the way
        assert globex.budget.exhausted_policy == budget_pb2.EXHAUSTED_POLICY_REJECT  # SetBudget's default
        assert list(globex.budget.alert_thresholds) == [0.25, 0.9]
        assert not globex.budget.category_limits
        # the tenants are ordinary tenants: the admin can give them keys
        conn = connect(service.server.address, ADMIN_KEY)
        key = budget_pb2_grpc.BudgetsStub(conn.channel).CreateApiKey(
            budget_pb2.CreateApiKeyRequest(tenant="acme"), metadata=conn.metadata).key
        conn.close()
        own = connect(service.server.address, key)
        assert budget_pb2_grpc.BudgetsStub(own.channel).GetSpend(
            budget_pb2.GetSpendRequest(), metadata=own.metadata).budget.total.micros == 3_000_000_000
        own.close()


def test_restarting_with_the_same_file_changes_nothing(tmp_path, monkeypatch):
    with budget_service(tmp_path, monkeypatch, SEED) as service:
        first = {t: spend(service, t).budget for t in ("acme", "globex")}
        tenants, updated = rows(service)
        assert set(tenants) == {"acme", "globex"} and set(updated) == set(tenants.values())
        applied = service.spec.extra["budgets_file"]
        assert (sorted(applied.created), sorted(applied.updated), applied.unchanged) == (
            ["acme", "globex"], ["acme", "globex"], ())
    with budget_service(tmp_path, monkeypatch, SEED) as service:
        assert rows(service) == (tenants, updated)  # same tenants, no budget row rewritten (updated_at as before)
        assert {t: spend(service, t).budget for t in ("acme", "globex")} == first
        applied = service.spec.extra["budgets_file"]
        assert (applied.created, applied.updated, sorted(applied.unchanged)) == ((), (), ["acme", "globex"])
        with service.context.sessions() as s:
            assert s.scalar(select(func.count()).select_from(TenantRow).where(TenantRow.name != PLATFORM_TENANT)) == 2


def test_the_file_owns_its_fields_and_keeps_existing_tenants_and_webhooks(tmp_path, monkeypatch):
    with budget_service(tmp_path, monkeypatch, None) as service:  # no file: a tenant made the ordinary way
        conn = connect(service.server.address, ADMIN_KEY)
        stub = budget_pb2_grpc.BudgetsStub(conn.channel)
        stub.CreateTenant(budget_pb2.CreateTenantRequest(name="acme"), metadata=conn.metadata)
        stub.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
            tenant="acme", period=budget_pb2.BUDGET_PERIOD_DAILY, total={"micros": 5, "currency": "USD"},
            webhook_url="https://hooks.example/acme"), webhook_secret="s3cret"), metadata=conn.metadata)
        conn.close()
        tenant_id = rows(service)[0]["acme"]
    with budget_service(tmp_path, monkeypatch, SEED) as service:
        tenants, _ = rows(service)
        assert tenants["acme"] == tenant_id  # not created again
        acme = spend(service, "acme").budget
        assert acme.total.micros == 3_000_000_000 and acme.period == budget_pb2.BUDGET_PERIOD_MONTHLY
        assert acme.webhook_url == "https://hooks.example/acme"  # the file has no webhook fields: kept
        assert service.spec.extra["budgets"].get_budget(tenant_id).webhook_secret == "s3cret"
    changed = SEED.replace('total: "3000"', 'total: "2500.5"').replace("policy: degrade", "policy: throttle")
    with budget_service(tmp_path, monkeypatch, changed) as service:
        acme = spend(service, "acme").budget
        assert acme.total.micros == 2_500_500_000 and acme.exhausted_policy == budget_pb2.EXHAUSTED_POLICY_THROTTLE
        assert service.spec.extra["budgets_file"].updated == ("acme",)


GOOD = "- {name: fine, period: daily, total: 10}\n"


@pytest.mark.parametrize(("text", "fragments"), [
    ("name: acme\nperiod: daily\ntotal: 1\n", ["expected a YAML list of tenants", "a dict"]),
    ("", ["expected a YAML list of tenants", "empty"]),
    ("- name: acme\n  period: daily\n  total: [1\n", ["not valid YAML"]),
    (GOOD + "- {name: acme, period: daily, total: 1, webhook_url: 'http://x'}\n",
     ["entry 2 (line 2, tenant 'acme')", "unknown key(s) ['webhook_url']"]),
    (GOOD + "- {name: acme, period: weekly, total: 1}\n", ["entry 2 (line 2, tenant 'acme')", "period"]),
    (GOOD + "- {name: acme, period: daily, total: 1, policy: panic}\n", ["entry 2", "exhausted_policy"]),
    (GOOD + "- {name: acme, period: daily, total: '-3'}\n", ["entry 2", "positive"]),
    (GOOD + "- {name: acme, period: daily, total: 5, limits: {serving: -1}}\n", ["entry 2", "serving limit"]),
    (GOOD + "- {name: acme, period: daily, total: 5, limits: {gpu: 1}}\n", ["entry 2", "unknown spend category"]),
    (GOOD + "- {name: acme, period: daily, total: 5, thresholds: [0.5, 0.5]}\n", ["entry 2", "distinct"]),
    (GOOD + "- {name: acme, period: daily, total: 5, currency: dollars}\n", ["entry 2", "ISO 4217"]),
    (GOOD + "- {name: acme, period: daily, total: 0.0000001}\n", ["entry 2", "more than 6 decimal places"]),
    (GOOD + "- {name: acme, period: daily, total: ten}\n", ["entry 2", "decimal amount"]),
    (GOOD + "- {name: acme, period: daily}\n", ["entry 2", "missing ['total']"]),
    (GOOD + "- {name: ../etc, period: daily, total: 1}\n", ["entry 2", "tenant name '../etc' is not allowed"]),
    (GOOD + "- {name: fine, period: monthly, total: 20}\n",
     ["entry 2 (line 2, tenant 'fine')", "listed twice (first at line 1)"]),
    ("- name: acme\n  period: daily\n  total: 1\n  total: 2\n", ["duplicate key 'total'"]),
    (GOOD + "- just-a-name\n", ["entry 2 (line 2)", "must be a mapping"]),
])
def test_a_malformed_file_stops_the_service_from_starting_and_writes_nothing(tmp_path, monkeypatch, text,
                                                                             fragments):
    path = tmp_path / "budgets.yaml"
    with pytest.raises(ConfigError) as err, budget_service(tmp_path, monkeypatch, text):
        pytest.fail("the service started with a malformed budgets file")
    message = str(err.value)
    assert str(path) in message and all(f in message for f in fragments), message
    with budget_service(tmp_path, monkeypatch, None) as service:  # the good entry before the bad one: not applied
        assert rows(service) == ({}, {})


def test_a_missing_file_stops_the_service(tmp_path, monkeypatch):
    monkeypatch.setenv("MARGIN_BUDGETS_FILE", str(tmp_path / "nowhere.yaml"))
    with pytest.raises(ConfigError, match=r"budgets file .*nowhere\.yaml: cannot read it"):
        start_service(build_budget, database_url=f"sqlite:///{tmp_path / 'margin.db'}", admin_key=ADMIN_KEY)
