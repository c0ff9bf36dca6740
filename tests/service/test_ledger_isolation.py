"""Only Margin's own services write the ledger, and one tenant's ids neither collide with nor reveal another's:
the three attacks the hardening probe made with a tenant key (issue 14), each refused, and billing still right.

Real Budgets server on port 0 over SQLite; the job is run through the job store the workers use, over the same
database, keyed as a worker keys it (from the admin key)."""
from __future__ import annotations

import hashlib

import grpc
import pytest
from margin.budget.fleet.metering import micros_of
from margin.common import config
from margin.common.costs import PriceCatalog
from margin.common.jobs import SUCCEEDED, JobStore, Lease, NewJob
from margin.common.ledger import EntryIds
from margin.sdk import connect
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2

from tests.service.test_fleet_reports import INTERVAL, PRICE, boundaries, deployment, report, serving_of, tenant_md

TRAINING = budget_pb2.SPEND_CATEGORY_TRAINING


@pytest.fixture()
def budgets(cluster):
    conn = connect(cluster.budget.server.address, cluster.admin_key)
    yield budget_pb2_grpc.BudgetsStub(conn.channel), conn.metadata
    conn.close()


def entry(entry_id: str, tenant: str = "", micros: int = 0, category: int = TRAINING) -> budget_pb2.LedgerEntry:
    return budget_pb2.LedgerEntry(id=entry_id, tenant=tenant, category=category,
                                  amount=common_pb2.Money(micros=micros, currency="USD"))


def record_as_tenant(stub, cluster, tenant: str, *entries: budget_pb2.LedgerEntry) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        stub.RecordSpend(budget_pb2.RecordSpendRequest(entries=list(entries)), metadata=tenant_md(cluster, tenant))
    return info.value.code()


def ledger_ids(stub, md, tenant: str) -> list[str]:
    return [e.id for e in stub.ListLedger(budget_pb2.ListLedgerRequest(tenant=tenant, page_size=1000),
                                          metadata=md).entries]


def test_a_tenant_cannot_learn_whether_another_tenants_entry_id_exists(cluster, budgets):
    stub, md = budgets
    reply = stub.RecordSpend(budget_pb2.RecordSpendRequest(entries=[entry("training:job-secret:1", "other", 500)]),
                             metadata=md)
    assert (reply.recorded, reply.duplicates) == (1, 0)
    # (a) the probe: acme records other's id and reads `duplicates`. A tenant key cannot call RecordSpend at all,
    # naming its own tenant or none ...
    assert record_as_tenant(stub, cluster, "acme", entry("training:job-secret:1", "acme")) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert record_as_tenant(stub, cluster, "acme", entry("training:job-secret:1")) == grpc.StatusCode.PERMISSION_DENIED
    # ... and even the services' own key, writing that id for acme, writes a new entry of acme's: ids are per tenant
    reply = stub.RecordSpend(budget_pb2.RecordSpendRequest(entries=[entry("training:job-secret:1", "acme", 7)]),
                             metadata=md)
    assert (reply.recorded, reply.duplicates) == (1, 0)
    again = stub.RecordSpend(budget_pb2.RecordSpendRequest(entries=[entry("training:job-secret:1", "acme", 7),
                                                                    entry("training:job-secret:1", "other", 500)]),
                             metadata=md)
    assert (again.recorded, again.duplicates) == (0, 2)  # a retry is still a duplicate, in each tenant's own ledger
    assert ledger_ids(stub, md, "acme") == ["training:job-secret:1"] == ledger_ids(stub, md, "other")
    spent = {t: stub.GetSpend(budget_pb2.GetSpendRequest(tenant=t), metadata=md).spent.micros
             for t in ("acme", "other")}
    assert spent == {"acme": 7, "other": 500}


def test_a_tenant_cannot_pre_record_its_own_job_attempt_at_zero(cluster, budgets):
    stub, md = budgets
    sessions = cluster.budget.context.sessions
    acme = cluster.budget.context.tenants.get_tenant("acme")
    # the job store as a worker holds it: its ledger ids keyed from the deployment's admin key
    store = JobStore(sessions, PriceCatalog.load(), ledger_key=config.ledger_id_key(cluster.admin_key))
    job, _ = store.create(NewJob(kind="training", tenant_id=acme.id, tenant="acme", spec={"model": "m"},
                                 device_class="cpu"))
    # (b) the probe: acme pre-records `training:<job>:1` at 0 micros so that the attempt's real entry is skipped
    predicted = entry(f"training:{job.id}:1", "acme", 0)
    assert record_as_tenant(stub, cluster, "acme", predicted) == grpc.StatusCode.PERMISSION_DENIED
    # the old id cannot be taken in advance either: written (by the services' key) it is just another entry
    assert stub.RecordSpend(budget_pb2.RecordSpendRequest(entries=[predicted]), metadata=md).recorded == 1
    lease = store.acquire(job.id, "worker-1/1", lease_seconds=30, max_attempts=3)
    assert isinstance(lease, Lease)
    done = store.finish(lease, SUCCEEDED, device_seconds=3600.0)  # an hour of cpu
    assert done.cost_micros == 170_000 + 3_750 > 0  # $0.17/h + 25 W x 1 h x $0.15/kWh
    rows = stub.ListLedger(budget_pb2.ListLedgerRequest(tenant="acme", category=TRAINING, page_size=100),
                           metadata=md).entries
    billed = [e for e in rows if e.job_id == job.id]
    assert len(billed) == 1 and billed[0].amount.micros == done.cost_micros
    assert billed[0].id.startswith(f"training:{job.id}:1:") and billed[0].id != predicted.id
    assert stub.GetSpend(budget_pb2.GetSpendRequest(tenant="acme"), metadata=md).spent.micros == done.cost_micros
    # the id is the same in every process of the deployment (a retry bills once), and no other key makes it
    assert EntryIds(config.ledger_id_key(cluster.admin_key)).job_attempt("training", acme.id, job.id, 1) \
        == billed[0].id != EntryIds(config.ledger_id_key("x" * 24)).job_attempt("training", acme.id, job.id, 1)


def old_fleet_id(prefix: str, pool_key: str, start_us: int, party: str = "") -> str:
    """The id the fleet metering used to give its entries: anyone could compute it."""
    return f"{prefix}:{hashlib.sha256(f'{pool_key}|{start_us}|{party}'.encode()).hexdigest()[:40]}"


def test_a_tenant_cannot_pre_claim_the_next_fleet_reports_ids_of_another_tenants_deployment(cluster, budgets):
    stub, md = budgets
    start = boundaries()(2)
    acme_id = cluster.budget.context.tenants.get_tenant("acme").id
    party = f"{acme_id}/digits-v1"
    predicted = [old_fleet_id("alloc", "triton/default", micros_of(start), party),
                 old_fleet_id("revenue", "triton/default", micros_of(start), f"revenue/{party}")]
    # (c) the probe: "other" takes the ids of the gateway's next report for acme's deployment, at 0 micros
    for entry_id in predicted:
        for tenant in ("acme", ""):
            assert record_as_tenant(stub, cluster, "other", entry(entry_id, tenant, 0,
                                                                  budget_pb2.SPEND_CATEGORY_SERVING)) \
                == grpc.StatusCode.PERMISSION_DENIED
    reply = stub.ReportFleet(report(start, [deployment("acme", "digits-v1", compute_ns=10**9, requests=40)]),
                             metadata=md)
    assert reply.billed == 1
    bill = INTERVAL * PRICE // 3600
    acme = serving_of(stub, cluster, "acme")
    assert sum(e.amount.micros for e in acme) == bill and sum(e.quantity for e in acme) == 40
    assert not {e.id for e in acme} & set(predicted)  # the ids were not the ones anyone could compute
    # a retried report still bills once: the ids are deterministic for the deployment's key
    assert stub.ReportFleet(report(start, [deployment("acme", "digits-v1", compute_ns=10**9, requests=40)]),
                            metadata=md).duplicates == 1
    assert sum(e.amount.micros for e in serving_of(stub, cluster, "acme")) == sum(e.amount.micros for e in acme)
