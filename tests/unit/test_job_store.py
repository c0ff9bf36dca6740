"""The job store's leases and fencing tokens, attempts and billing, on a real SQLite database."""
from __future__ import annotations

import pytest
from margin.common.costs import PriceCatalog
from margin.common.db import make_engine, make_sessionmaker
from margin.common.jobs import FAILED, RUNNING, SUCCEEDED, JobStore, Lease, LeaseLost, NewJob, Refusal
from margin.common.ledger import LedgerRow
from margin.common.tenancy import TenantStore
from sqlalchemy import select


@pytest.fixture()
def store(tmp_path):
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'jobs.db'}"))
    tenant = TenantStore(sessions).create_tenant("acme")
    store = JobStore(sessions, PriceCatalog.load())
    store.tenant_id = tenant.id
    store.sessions = sessions
    return store


def new_job(store: JobStore, key: str = "") -> str:
    job, created = store.create(NewJob(kind="training", tenant_id=store.tenant_id, tenant="acme",
                                       spec={"model": "m"}, device_class="cpu", idempotency_key=key))
    assert created or key
    return job.id


def dead(_owner: str) -> bool:
    """The lease holder is known to be dead (its worker process is gone)."""
    return True


def attempt_of(entry_id: str) -> str:
    """``<kind>:<job>:<attempt>`` of a job attempt's entry id (the keyed digest after it left off)."""
    return entry_id.rsplit(":", 1)[0]


def ledger(store: JobStore) -> list[LedgerRow]:
    with store.sessions() as s:
        return list(s.scalars(select(LedgerRow).order_by(LedgerRow.id)))


def test_a_newer_attempt_fences_out_the_older_one_which_can_neither_write_nor_finish(store):
    job_id = new_job(store)
    first = store.acquire(job_id, "task-1", lease_seconds=30, max_attempts=3)
    assert isinstance(first, Lease) and first.fence == 1
    # a live lease is not taken over unless its holder is known to be dead ...
    assert isinstance(store.acquire(job_id, "task-1-again", lease_seconds=30, max_attempts=3), Refusal)
    # ... then the new attempt takes it at once, and the old holder is fenced out
    second = store.acquire(job_id, "task-1-again", lease_seconds=30, max_attempts=3,
                           holder_gone=lambda owner: owner == "task-1")
    assert isinstance(second, Lease) and second.fence == 2
    with pytest.raises(LeaseLost):
        store.heartbeat(first, 30, device_seconds=5.0)
    with pytest.raises(LeaseLost):
        store.finish(first, SUCCEEDED, device_seconds=5.0, result={"model": "m", "number": 1})
    done = store.finish(second, SUCCEEDED, device_seconds=7.2, result={"model": "m", "number": 1})
    assert done.state == SUCCEEDED and done.attempts == 2


def test_another_task_cannot_take_a_live_lease_but_can_take_an_expired_one(store):
    job_id = new_job(store)
    assert isinstance(store.acquire(job_id, "task-1", lease_seconds=30, max_attempts=3), Lease)
    refused = store.acquire(job_id, "task-2", lease_seconds=30, max_attempts=3)
    assert isinstance(refused, Refusal) and "held by task-1" in refused.reason
    job_id2 = new_job(store)
    assert isinstance(store.acquire(job_id2, "task-1", lease_seconds=-1, max_attempts=3), Lease)  # already lapsed
    assert [j.id for j in store.expired_leases()] == [job_id2]
    taken = store.acquire(job_id2, "task-2", lease_seconds=30, max_attempts=3)
    assert isinstance(taken, Lease) and taken.fence == 2


def test_each_attempt_is_billed_exactly_once_and_the_job_cost_is_their_sum(store):
    job_id = new_job(store)
    a1 = store.acquire(job_id, "t", 30, 3)
    store.heartbeat(a1, 30, device_seconds=3600.0)  # an hour of cpu, then the worker dies
    a2 = store.acquire(job_id, "t2", 30, 3, holder_gone=dead)
    assert a2.prior_micros == 170_000 + 3_750  # $0.17/h + 25 W x 1 h x $0.15/kWh
    store.heartbeat(a2, 30, device_seconds=1800.0)
    job = store.finish(a2, SUCCEEDED, device_seconds=1800.0)
    rows = ledger(store)
    assert [attempt_of(r.id) for r in rows] == [f"training:{job_id}:1", f"training:{job_id}:2"]
    assert sum(r.micros for r in rows) == job.cost_micros == 173_750 + 86_875
    assert [a.outcome for a in job.attempt_costs] == ["worker lost", SUCCEEDED]


def test_a_job_that_keeps_losing_its_worker_ends_failed_after_max_attempts(store):
    job_id = new_job(store)
    for _ in range(2):
        lease = store.acquire(job_id, "t", 30, max_attempts=2, holder_gone=dead)
        store.heartbeat(lease, 30, device_seconds=60.0)
    refused = store.acquire(job_id, "t", 30, max_attempts=2, holder_gone=dead)
    assert isinstance(refused, Refusal) and "gave up after 2 attempts" in refused.reason
    job = store.get(None, job_id)
    assert job.state == FAILED and job.terminal
    assert isinstance(store.acquire(job_id, "t", 30, max_attempts=5), Refusal)  # ended stays ended
    assert [attempt_of(r.id) for r in ledger(store)] == [f"training:{job_id}:1", f"training:{job_id}:2"]  # billed
    assert sum(r.micros for r in ledger(store)) == job.cost_micros > 0


def test_cancel_of_a_queued_job_ends_it_and_a_running_one_is_asked_to_stop(store):
    queued = new_job(store)
    assert store.request_cancel(store.tenant_id, queued, "not needed").state == "CANCELLED"
    assert isinstance(store.acquire(queued, "t", 30, 3), Refusal)
    running = new_job(store)
    lease = store.acquire(running, "t", 30, 3)
    assert store.request_cancel(store.tenant_id, running, "stop").state == RUNNING
    _, cancel = store.heartbeat(lease, 30, device_seconds=1.0)
    assert cancel


def test_the_same_idempotency_key_gives_the_same_job(store):
    first = new_job(store, key="k1")
    assert new_job(store, key="k1") == first
    assert new_job(store, key="k2") != first


def test_a_lease_holder_is_gone_only_when_its_process_on_this_node_no_longer_exists():
    import os
    import subprocess

    from margin.worker.runner import holder_gone, lease_owner

    assert not holder_gone(lease_owner("t1"))  # this very process
    child = subprocess.Popen(["true"])
    child.wait()
    host = lease_owner("x").split("/")[0]
    assert holder_gone(f"{host}/{child.pid}/t1")
    assert not holder_gone(f"another-node/{child.pid}/t1")  # cannot see another node's processes: wait for expiry
    assert not holder_gone(f"{host}/not-a-pid/t1") and os.getpid() > 0


def test_a_job_is_never_billed_past_its_budget_and_says_what_was_absorbed(store):
    job, _ = store.create(NewJob(kind="compression", tenant_id=store.tenant_id, tenant="acme", spec={"model": "m"},
                                 device_class="cpu", budget_micros=200_000))
    a1 = store.acquire(job.id, "t", 30, 3)
    store.heartbeat(a1, 30, device_seconds=3600.0)  # 173,750 micros, then the worker dies
    a2 = store.acquire(job.id, "t2", 30, 3, holder_gone=dead)
    # the last step overshoots: half an hour more would be 86,875 micros, 60,625 past the budget
    done = store.finish(a2, "BUDGET_EXCEEDED", device_seconds=1800.0, message="stopped before epoch 3")
    rows = ledger(store)
    assert [r.micros for r in rows] == [173_750, 26_250]
    assert done.cost_micros == sum(r.micros for r in rows) == 200_000
    assert done.message == "stopped before epoch 3 (the last step overshot the budget by 60625 micros: not billed)"
    within, _ = store.create(NewJob(kind="compression", tenant_id=store.tenant_id, tenant="acme",
                                    spec={"model": "m"}, device_class="cpu", budget_micros=200_000))
    lease = store.acquire(within.id, "t", 30, 3)
    assert store.finish(lease, SUCCEEDED, device_seconds=1800.0).cost_micros == 86_875  # under it: billed as run
