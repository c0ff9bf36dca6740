"""Job admission under a tenant's budget, read from the budget service over gRPC (``GetSpend``), not from its tables:
real redis-server, budget, registry and training servers on port 0, and no worker (an admitted job stays queued).

The figure the job services read (:meth:`BudgetsClient.remaining`) must be the budget service's own
(``BudgetStore.remaining``: the smaller of the total's and the category limit's remainder, None without a budget);
when the budget service cannot be reached, a job is refused UNAVAILABLE and nothing is queued."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from margin.budget.store import BudgetStore
from margin.common import protoconv
from margin.common.service import start_service
from margin.sdk import connect
from margin.sdk.admin import create_tenant_key
from margin.sdk.budgets import BudgetsClient
from margin.training.service import training_builder
from margin.v1 import budget_pb2, common_pb2, training_pb2, training_pb2_grpc

from tests.integration.training_stack import TrainingStack, training_stack
from tests.service.test_budgets import CAT, entry, money, record, set_budget

TOTAL = 10_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[TrainingStack]:
    with training_stack(Path(tmp_path_factory.mktemp("admission")), worker=False) as s:
        yield s


def new_tenant(stack: TrainingStack, name: str) -> str:
    conn = connect(stack.cluster.budget.server.address, stack.cluster.admin_key)
    try:
        stack.cluster.keys[name] = create_tenant_key(conn, name)
    finally:
        conn.close()
    return name


def digits_spec() -> training_pb2.TrainingSpec:
    return training_pb2.TrainingSpec(model="m", family="mlp", epochs=2,
                                     dataset=common_pb2.DatasetRef(builtin="sklearn:digits"),
                                     architecture=protoconv.struct({"hidden": [32]}))


def submit(address: str, key: str) -> training_pb2.TrainingJob:
    conn = connect(address, key)
    try:
        return training_pb2_grpc.TrainingJobsStub(conn.channel).SubmitJob(
            training_pb2.SubmitJobRequest(spec=digits_spec()), metadata=conn.metadata, timeout=30)
    finally:
        conn.close()


def low_estimate(stack: TrainingStack, tenant: str) -> int:
    stub, md = stack.stub(tenant)
    return stub.EstimateCost(training_pb2.EstimateCostRequest(spec=digits_spec()), metadata=md).cost.low.micros


def jobs_of(stack: TrainingStack, tenant: str) -> list[training_pb2.TrainingJob]:
    stub, md = stack.stub(tenant)
    return list(stub.ListJobs(training_pb2.ListJobsRequest(page_size=1000), metadata=md).jobs)


def remaining(stack: TrainingStack, tenant: str, category: str) -> tuple[int | None, int | None]:
    """(what the job services read over gRPC, what the budget service's own store says) for the same tenant."""
    client = BudgetsClient(stack.cluster.budget.server.address, stack.cluster.admin_key)
    try:
        over_grpc = client.remaining(tenant, category)
    finally:
        client.close()
    context = stack.cluster.budget.context
    return over_grpc, BudgetStore(context.sessions).remaining(context.tenants.get_tenant(tenant).id, category)


def test_the_remainder_read_over_grpc_is_the_budget_services_own(stack):
    tenant = new_tenant(stack, "parity")
    assert remaining(stack, tenant, "training") == (None, None)  # no budget: no tenant cap
    set_budget(stack.cluster, TOTAL, tenant=tenant,
               category_limits=[budget_pb2.CategoryLimit(category=CAT.SPEND_CATEGORY_TRAINING, limit=money(3_000))])
    record(stack.cluster, tenant, [entry("t1", CAT.SPEND_CATEGORY_TRAINING, 1_000),
                                   entry("c1", CAT.SPEND_CATEGORY_COMPRESSION, 500)])
    assert remaining(stack, tenant, "training") == (2_000, 2_000)  # the training limit binds: 3,000 - 1,000
    assert remaining(stack, tenant, "compression") == (8_500, 8_500)  # no limit of its own: the total's remainder
    record(stack.cluster, tenant, [entry("c2", CAT.SPEND_CATEGORY_COMPRESSION, 7_000)])
    assert remaining(stack, tenant, "training") == (1_500, 1_500)  # now the total binds: 10,000 - 8,500
    record(stack.cluster, tenant, [entry("c3", CAT.SPEND_CATEGORY_COMPRESSION, 2_000)])
    assert remaining(stack, tenant, "compression") == (-500, -500)  # overspent: negative, as the store says


def test_the_tenants_budget_read_over_grpc_refuses_and_caps_training_jobs(stack):
    tenant = new_tenant(stack, "capped")
    low = low_estimate(stack, tenant)

    def limit_training(micros: int) -> None:
        set_budget(stack.cluster, TOTAL * 1000, tenant=tenant, category_limits=[
            budget_pb2.CategoryLimit(category=CAT.SPEND_CATEGORY_TRAINING, limit=money(micros))])

    limit_training(low - 1)
    with pytest.raises(grpc.RpcError) as refused:
        submit(stack.training.server.address, stack.cluster.keys[tenant])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "left of capped's budget for training" in refused.value.details()
    assert not jobs_of(stack, tenant)
    limit_training(low + 40)
    job = submit(stack.training.server.address, stack.cluster.keys[tenant])
    assert job.budget.micros == low + 40  # no job budget of its own: the tenant's remainder caps it


def test_a_job_is_refused_unavailable_when_the_budget_service_cannot_be_reached(stack):
    tenant = new_tenant(stack, "unchecked")
    with socket.socket() as closed:  # bound, never listening: connections to it are refused, and no one takes it
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
        training = start_service(training_builder(stack.worker_env["MARGIN_REDIS_URL"],
                                                  stack.cluster.registry.server.address, dead, 2, 10.0),
                                 database_url=stack.worker_env["DATABASE_URL"], admin_key=stack.cluster.admin_key,
                                 auth_cache_seconds=0)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                submit(training.server.address, stack.cluster.keys[tenant])
        finally:
            training.stop()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert "cannot read what is left of unchecked's budget for training" in refused.value.details()
    assert not jobs_of(stack, tenant)  # nothing queued, nothing stored
