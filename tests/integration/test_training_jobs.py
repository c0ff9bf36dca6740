"""Training jobs end to end: a real redis-server, the real registry and training services, and a real Celery
worker process that trains on CPU, checkpoints, bills, and registers versions."""
from __future__ import annotations

import io
import os
import signal
import time
from itertools import pairwise
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from margin.common import protoconv
from margin.modelzoo.datasets import load_builtin
from margin.sdk import connect
from margin.sdk.pages import all_pages
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2, registry_pb2, training_pb2
from safetensors.torch import load

from tests.integration.training_stack import TrainingStack, training_stack, wait_for

pytestmark = pytest.mark.slow

DIGITS = common_pb2.DatasetRef(builtin="sklearn:digits")
State = common_pb2.JobState


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> TrainingStack:
    with training_stack(tmp_path_factory.mktemp("training"), max_world_size=2, lease_seconds=10) as s:
        yield s


def spec(model: str = "digits", family: str = "mlp", epochs: int = 3, **fields) -> training_pb2.TrainingSpec:
    arch = fields.pop("architecture", {"hidden": [32]} if family == "mlp" else {"channels": [8, 16]})
    return training_pb2.TrainingSpec(model=model, family=family, epochs=epochs, dataset=fields.pop("dataset", DIGITS),
                                     architecture=protoconv.struct(arch), **fields)


def submit(stack: TrainingStack, s: training_pb2.TrainingSpec, tenant: str = "acme", budget: int = 0,
           key: str = "") -> training_pb2.TrainingJob:
    stub, md = stack.stub(tenant)
    return stub.SubmitJob(training_pb2.SubmitJobRequest(spec=s, budget=common_pb2.Money(currency="USD", micros=budget),
                                                        idempotency_key=key), metadata=md)


def get(stack: TrainingStack, job_id: str, tenant: str = "acme") -> training_pb2.TrainingJob:
    stub, md = stack.stub(tenant)
    return stub.GetJob(training_pb2.GetJobRequest(id=job_id), metadata=md)


def watch(stack: TrainingStack, job_id: str, tenant: str = "acme") -> list[training_pb2.JobEvent]:
    stub, md = stack.stub(tenant)
    return list(stub.WatchJob(training_pb2.WatchJobRequest(id=job_id), metadata=md, timeout=180))


def wait_state(stack: TrainingStack, job_id: str, *states: int, timeout: float = 120,
               tenant: str = "acme") -> training_pb2.TrainingJob:
    return wait_for(lambda: (j := get(stack, job_id, tenant)).state in states and j, timeout)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_submit_watch_succeeds_and_registers_a_version_with_lineage_recipe_metrics_and_cost(stack):
    job = submit(stack, spec("watched", "cnn", epochs=3))
    assert job.state == State.Value("JOB_STATE_QUEUED") and job.estimate.cost.expected.micros > 0
    events = watch(stack, job.id)
    states = [State.Name(e.state) for e in events]
    assert states[0] in ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING") and states[-1] == "JOB_STATE_SUCCEEDED"
    assert "JOB_STATE_RUNNING" in states
    epochs = [e.epoch for e in events if e.state == State.Value("JOB_STATE_RUNNING") and e.epoch]
    assert epochs == sorted(epochs) and max(epochs) == 3
    costs = [e.cost_so_far.micros for e in events]
    assert costs[-1] > 0 and all(b >= a for a, b in pairwise(costs))

    final = get(stack, job.id)
    assert final.state == State.Value("JOB_STATE_SUCCEEDED") and final.attempts == 1
    assert final.result_version.model == "watched" and final.result_version.number == 1
    assert final.metrics["val_accuracy"] > 0.5 and final.distributed_efficiency == 1.0
    assert final.cost.total.micros == events[-1].cost_so_far.micros == sum(a.total.micros for a in final.attempt_costs)
    assert final.cost.total.micros == final.cost.compute.micros + final.cost.energy.micros

    version = stack.cluster.client().stub.GetVersion(registry_pb2.GetVersionRequest(
        version=common_pb2.VersionRef(model="watched", number=1)), metadata=stack.cluster.client().metadata)
    assert version.format == registry_pb2.ARTIFACT_FORMAT_SAFETENSORS
    assert protoconv.from_struct(version.recipe)["job_id"] == job.id
    assert protoconv.from_struct(version.architecture)["family"] == "cnn"
    assert version.metrics["val_accuracy"] == pytest.approx(final.metrics["val_accuracy"])
    assert 0 < version.cost.total.micros <= final.cost.total.micros

    rows = stack.ledger(job.id)
    assert [r.category for r in rows] == ["training"] and sum(r.micros for r in rows) == final.cost.total.micros

    late = watch(stack, job.id)  # a late subscriber gets the current (terminal) state, and the stream ends
    assert [State.Name(e.state) for e in late] == ["JOB_STATE_SUCCEEDED"]


def test_the_worker_bills_its_own_time_and_the_jobs_that_ran_on_it(stack):
    """The Celery worker reports itself every metering interval: its up-time is its pool's bill, the time its jobs'
    attempts ran is allocated to them (tenants pay it through the jobs' entries), the rest is the platform's idle."""
    admin = connect(stack.cluster.budget.server.address, stack.cluster.admin_key)
    budgets = budget_pb2_grpc.BudgetsStub(admin.channel)
    stub, md = stack.stub()
    job = stub.SubmitJob(training_pb2.SubmitJobRequest(spec=training_pb2.TrainingSpec(
        model="fleet", family="mlp", epochs=8, architecture=protoconv.struct({"hidden": [32]}),
        dataset=common_pb2.DatasetRef(builtin="sklearn:digits"))), metadata=md)
    wait_for(lambda: stub.GetJob(training_pb2.GetJobRequest(id=job.id), metadata=md).state
             == common_pb2.JOB_STATE_SUCCEEDED, 120)
    done = stub.GetJob(training_pb2.GetJobRequest(id=job.id), metadata=md)

    def job_lines() -> list:
        return [e for e in budgets.ListLedger(budget_pb2.ListLedgerRequest(
            tenant="_platform", category=budget_pb2.SPEND_CATEGORY_JOBS, page_size=1000),
            metadata=admin.metadata).entries if e.job_id == job.id]

    wall_s = (done.end_time.ToDatetime() - done.start_time.ToDatetime()).total_seconds()
    # the interval the job ended in is reported when it ends (every second here)
    lines = wait_for(lambda: (found := job_lines()) and sum(e.quantity for e in found) >= 0.5e6 * wall_s and found,
                     30)
    busy_s = sum(e.quantity for e in lines) / 1e6
    assert sum(e.amount.micros for e in lines) > 0 and busy_s <= wall_s + 2.5, (busy_s, wall_s)
    fleet = budgets.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_FLEET),
                             metadata=admin.metadata).fleet
    worker = next(p for p in fleet.pools if p.pool == "worker/train.cpu")
    assert worker.kind == "worker" and worker.bill.micros == worker.allocated.micros + worker.idle.micros
    assert worker.allocated.micros >= sum(e.amount.micros for e in lines) and fleet.balanced
    admin.close()


def test_cancel_mid_run_ends_cancelled_within_seconds_with_a_checkpoint(stack):
    job = submit(stack, spec("cancelled", epochs=2000))
    wait_for(lambda: get(stack, job.id).epoch >= 1, 60)
    stub, md = stack.stub()
    start = time.monotonic()
    stub.CancelJob(training_pb2.CancelJobRequest(id=job.id, reason="changed my mind"), metadata=md)
    final = wait_state(stack, job.id, State.Value("JOB_STATE_CANCELLED"), timeout=10)
    assert time.monotonic() - start < 5
    assert "changed my mind" in final.message and "checkpoint" in final.message
    assert final.checkpoint.epoch >= 1 and final.checkpoint.size_bytes > 0
    assert (stack.home / "checkpoints" / final.checkpoint.key).exists()
    assert not final.HasField("result_version") and stack.versions("cancelled") == []
    assert sum(r.micros for r in stack.ledger(job.id)) == final.cost.total.micros > 0
    assert code_of(lambda: stub.CancelJob(training_pb2.CancelJobRequest(id=job.id), metadata=md))[0] == \
        grpc.StatusCode.FAILED_PRECONDITION


def test_a_budget_below_the_estimate_is_refused_at_submit_with_the_estimate(stack):
    stub, md = stack.stub()
    before = len(stub.ListJobs(training_pb2.ListJobsRequest(page_size=1000), metadata=md).jobs)
    code, message = code_of(lambda: submit(stack, spec("tiny", epochs=50), budget=1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "estimate" in message and "budget $0.000001" in message
    assert len(stub.ListJobs(training_pb2.ListJobsRequest(page_size=1000), metadata=md).jobs) == before


def test_a_budget_that_runs_out_mid_run_stops_the_job_with_spend_within_the_budget(stack):
    s = spec("budgeted", epochs=3000, precision=training_pb2.PRECISION_BF16)
    stub, md = stack.stub()
    estimate = stub.EstimateCost(training_pb2.EstimateCostRequest(spec=s), metadata=md)
    budget = estimate.cost.low.micros + 40
    assert budget < estimate.cost.expected.micros
    job = submit(stack, s, budget=budget)
    final = wait_state(stack, job.id, State.Value("JOB_STATE_BUDGET_EXCEEDED"), State.Value("JOB_STATE_SUCCEEDED"),
                       timeout=120)
    assert State.Name(final.state) == "JOB_STATE_BUDGET_EXCEEDED", final.message
    assert 0 < final.cost.total.micros <= budget
    assert final.checkpoint.step > 0 and "budget" in final.message
    assert sum(r.micros for r in stack.ledger(job.id)) == final.cost.total.micros


def test_sigkill_of_the_worker_mid_epoch_resumes_from_the_checkpoint_one_version_cost_per_attempt(stack):
    job = submit(stack, spec("resumed", epochs=60, architecture={"hidden": [512, 512]}))
    wait_for(lambda: get(stack, job.id).checkpoint.epoch >= 2, 90)
    children = stack.worker_children(stack.workers[0])
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)  # the pool process that is training, mid-epoch
    killed_at = get(stack, job.id)
    final = wait_state(stack, job.id, State.Value("JOB_STATE_SUCCEEDED"), State.Value("JOB_STATE_FAILED"),
                       timeout=180)
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED", final.message
    assert final.attempts == 2 and len(final.attempt_costs) == 2
    assert all(a.total.micros > 0 for a in final.attempt_costs)
    assert final.cost.total.micros == sum(a.total.micros for a in final.attempt_costs)
    assert [v.number for v in stack.versions("resumed")] == [1]
    rows = stack.ledger(job.id)
    assert sorted(r.id.rsplit(":", 1)[0] for r in rows) == [f"training:{job.id}:1", f"training:{job.id}:2"]
    assert sum(r.micros for r in rows) == final.cost.total.micros
    events = watch(stack, job.id)
    assert events[-1].state == State.Value("JOB_STATE_SUCCEEDED")
    # attempt 2 resumed from the last checkpoint, not from step 0
    resumed_steps = [e.step for e in events if e.attempt == 2 and e.step > 0]
    assert resumed_steps and min(resumed_steps) > killed_at.checkpoint.step > 0


def test_the_same_idempotency_key_returns_the_same_job(stack):
    first = submit(stack, spec("idem", epochs=1), key="nightly-2026-11-22")
    again = submit(stack, spec("idem", epochs=1), key="nightly-2026-11-22")
    other_tenant = submit(stack, spec("idem", epochs=1), key="nightly-2026-11-22", tenant="other")
    assert again.id == first.id and other_tenant.id != first.id
    wait_state(stack, first.id, State.Value("JOB_STATE_SUCCEEDED"))
    wait_state(stack, other_tenant.id, State.Value("JOB_STATE_SUCCEEDED"), tenant="other")
    assert len(stack.versions("idem")) == 1


def test_another_tenants_job_is_not_found(stack):
    job = submit(stack, spec("private", epochs=1))
    stub, md = stack.stub("other")
    for call in (lambda: stub.GetJob(training_pb2.GetJobRequest(id=job.id), metadata=md),
                 lambda: stub.CancelJob(training_pb2.CancelJobRequest(id=job.id), metadata=md),
                 lambda: list(stub.WatchJob(training_pb2.WatchJobRequest(id=job.id), metadata=md))):
        assert code_of(call)[0] == grpc.StatusCode.NOT_FOUND
    assert job.id not in [j.id for j in stub.ListJobs(training_pb2.ListJobsRequest(), metadata=md).jobs]
    wait_state(stack, job.id, State.Value("JOB_STATE_SUCCEEDED"))


def _upload_digits_npz(stack: TrainingStack, model: str) -> int:
    x, y = load_builtin("sklearn:digits")
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    client = stack.cluster.client()
    client.create_model(model)
    return client.upload_bytes(buf.getvalue(), registry_pb2.UploadMetadata(
        model=model, format=registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ)).number


def test_registry_dataset_then_fine_tune_with_frozen_layers_keeps_them_and_records_lineage(stack):
    number = _upload_digits_npz(stack, "digits-data")
    data = common_pb2.DatasetRef(registry=common_pb2.VersionRef(model="digits-data", number=number))
    base_job = submit(stack, spec("tuned", epochs=3, dataset=data, architecture={"input_dim": 64, "hidden": [32],
                                                                                 "num_classes": 10}))
    base = wait_state(stack, base_job.id, State.Value("JOB_STATE_SUCCEEDED"), State.Value("JOB_STATE_FAILED"))
    assert State.Name(base.state) == "JOB_STATE_SUCCEEDED", base.message
    tuned_spec = training_pb2.TrainingSpec(model="tuned", epochs=2, dataset=DIGITS, freeze_layers=["0."],
                                           base_version=common_pb2.VersionRef(model="tuned", number=1))
    tuned = wait_state(stack, submit(stack, tuned_spec).id, State.Value("JOB_STATE_SUCCEEDED"),
                       State.Value("JOB_STATE_FAILED"))
    assert State.Name(tuned.state) == "JOB_STATE_SUCCEEDED", tuned.message
    assert tuned.result_version.number == 2 and tuned.spec.family == "mlp"
    client = stack.cluster.client()
    v2, weights2 = client.download_bytes(common_pb2.VersionRef(model="tuned", number=2))
    _, weights1 = client.download_bytes(common_pb2.VersionRef(model="tuned", number=1))
    w1, w2 = load(weights1), load(weights2)
    assert torch.equal(w1["0.weight"], w2["0.weight"]) and torch.equal(w1["0.bias"], w2["0.bias"])  # frozen
    assert not torch.equal(w1["2.weight"], w2["2.weight"])  # trained
    assert v2.parent.number == 1
    lineage = client.stub.GetLineage(registry_pb2.GetLineageRequest(
        version=common_pb2.VersionRef(model="tuned", number=2)), metadata=client.metadata)
    assert [v.number for v in lineage.chain] == [2, 1]
    assert lineage.total_cost.micros == sum(v.cost.total.micros for v in lineage.chain) > 0


def test_ddp_world_size_two_trains_with_gloo_and_stores_eta(stack):
    job = submit(stack, spec("ddp", epochs=2, world_size=2))
    final = wait_state(stack, job.id, State.Value("JOB_STATE_SUCCEEDED"), State.Value("JOB_STATE_FAILED"),
                       timeout=180)
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED", final.message
    assert final.distributed_efficiency > 0
    assert final.scaling_efficiency == pytest.approx(final.distributed_efficiency / 2)
    assert final.cost.device_hours > 0 and final.metrics["val_accuracy"] > 0.3


@pytest.mark.parametrize(("fields", "code", "fragment"), [
    ({"family": "transformer"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown model family"),
    ({"epochs": -1}, grpc.StatusCode.INVALID_ARGUMENT, "epochs"),
    ({"world_size": 3}, grpc.StatusCode.INVALID_ARGUMENT, "configured maximum 2"),
    ({"dataset": common_pb2.DatasetRef(registry=common_pb2.VersionRef(model="no-such-data", number=1))},
     grpc.StatusCode.NOT_FOUND, "no-such-data"),
    ({"dataset": common_pb2.DatasetRef(builtin="imagenet")}, grpc.StatusCode.INVALID_ARGUMENT, "unknown built-in"),
    ({"base_version": common_pb2.VersionRef(model="theirs", number=1)}, grpc.StatusCode.NOT_FOUND, "theirs"),
    ({"precision": training_pb2.PRECISION_FP16}, grpc.StatusCode.INVALID_ARGUMENT, "fp16 needs a CUDA"),
    ({"device_class": "tpu-v9"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown device class"),
    ({"learning_rate": -0.1}, grpc.StatusCode.INVALID_ARGUMENT, "learning_rate"),
    ({"freeze_layers": ["nope."]}, grpc.StatusCode.INVALID_ARGUMENT, "matches no parameter"),
    ({"model": "a/b"}, grpc.StatusCode.INVALID_ARGUMENT, "spec.model"),
])
def test_bad_specs_get_a_clear_status_and_create_no_job(stack, fields, code, fragment):
    if "base_version" in fields and not stack.versions("theirs", tenant="other"):
        other = submit(stack, spec("theirs", epochs=1), tenant="other")
        wait_state(stack, other.id, State.Value("JOB_STATE_SUCCEEDED"), tenant="other")
    stub, md = stack.stub()
    before = len(stub.ListJobs(training_pb2.ListJobsRequest(page_size=1000), metadata=md).jobs)
    s = spec(**{"model": "bad", **{k: v for k, v in fields.items() if k in ("family", "epochs", "model")}})
    for key, value in fields.items():
        if key not in ("family", "epochs", "model"):
            field = getattr(s, key)
            if hasattr(field, "CopyFrom"):
                field.CopyFrom(value)
            elif isinstance(value, list):
                field.extend(value)
            else:
                setattr(s, key, value)
    got, message = code_of(lambda: submit(stack, s))
    assert got == code and fragment in message, message
    assert len(stub.ListJobs(training_pb2.ListJobsRequest(page_size=1000), metadata=md).jobs) == before


def test_list_jobs_pages_and_filters_by_state(stack):
    stub, md = stack.stub()
    every = all_pages(lambda r: stub.ListJobs(r, metadata=md), training_pb2.ListJobsRequest(page_size=2), "jobs")
    assert len(every) == len({j.id for j in every}) >= 5
    assert [j.create_time.ToDatetime() for j in every] == sorted((j.create_time.ToDatetime() for j in every),
                                                                 reverse=True)
    succeeded = stub.ListJobs(training_pb2.ListJobsRequest(state=State.Value("JOB_STATE_SUCCEEDED"), page_size=1000),
                              metadata=md).jobs
    assert succeeded and all(j.state == State.Value("JOB_STATE_SUCCEEDED") for j in succeeded)


def test_checkpoints_are_read_back_without_unpickling(stack):
    path = next(Path(stack.home / "checkpoints").glob("*.pt"))
    state = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "torch_rng", "epoch", "step"} <= set(state)


def test_when_the_whole_worker_dies_the_lapsed_lease_is_requeued_and_another_worker_finishes(stack):
    job = submit(stack, spec("orphaned", epochs=40, architecture={"hidden": [512, 512]}))
    wait_for(lambda: get(stack, job.id).checkpoint.epoch >= 1, 90)
    dead = stack.workers.pop(0)
    for pid in [*stack.worker_children(dead), dead.proc.pid]:  # the node is gone: main process and pool alike
        os.kill(pid, signal.SIGKILL)
    dead.proc.wait()
    replacement = stack.start_worker("worker-cpu-2")
    final = wait_state(stack, job.id, State.Value("JOB_STATE_SUCCEEDED"), State.Value("JOB_STATE_FAILED"),
                       timeout=120)
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED", final.message
    assert final.attempts == 2 and [v.number for v in stack.versions("orphaned")] == [1]
    assert sum(r.micros for r in stack.ledger(job.id)) == final.cost.total.micros
    assert replacement.proc.poll() is None


def test_bf16_autocast_trains_on_cpu(stack):
    job = submit(stack, spec("bf16", "cnn", epochs=2, precision=training_pb2.PRECISION_BF16))
    final = wait_state(stack, job.id, State.Value("JOB_STATE_SUCCEEDED"), State.Value("JOB_STATE_FAILED"))
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED", final.message
    assert final.spec.precision == training_pb2.PRECISION_BF16 and final.metrics["val_accuracy"] > 0.2


def test_the_tenants_training_budget_refuses_jobs_beyond_it_and_caps_the_ones_it_admits(stack):
    admin = connect(stack.cluster.budget.server.address, stack.cluster.admin_key)
    budgets = budget_pb2_grpc.BudgetsStub(admin.channel)
    budgets.CreateTenant(budget_pb2.CreateTenantRequest(name="capped"), metadata=admin.metadata)
    stack.cluster.keys["capped"] = stack.cluster.new_key("capped")
    s = spec("capped", epochs=3000, precision=training_pb2.PRECISION_BF16)
    stub, md = stack.stub("capped")
    low = stub.EstimateCost(training_pb2.EstimateCostRequest(spec=s), metadata=md).cost.low.micros

    def limit_training(micros: int) -> None:
        budgets.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
            tenant="capped", period=budget_pb2.BUDGET_PERIOD_DAILY, total=common_pb2.Money(micros=10_000_000),
            category_limits=[budget_pb2.CategoryLimit(category=budget_pb2.SPEND_CATEGORY_TRAINING,
                                                      limit=common_pb2.Money(micros=micros))])),
            metadata=admin.metadata)

    limit_training(low - 1)
    code, details = code_of(lambda: submit(stack, s, tenant="capped"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "left of capped's budget for training" in details
    assert not stub.ListJobs(training_pb2.ListJobsRequest(), metadata=md).jobs
    limit_training(low + 40)
    job = submit(stack, s, tenant="capped")  # no job budget of its own: the tenant's remainder caps it
    assert job.budget.micros == low + 40
    final = wait_state(stack, job.id, State.Value("JOB_STATE_BUDGET_EXCEEDED"), State.Value("JOB_STATE_SUCCEEDED"),
                       tenant="capped")
    assert State.Name(final.state) == "JOB_STATE_BUDGET_EXCEEDED" and 0 < final.cost.total.micros <= low + 40
    report = budgets.GetSpend(budget_pb2.GetSpendRequest(tenant="capped"), metadata=admin.metadata)
    assert {line.key: line.amount.micros for line in report.by_category} == {"training": final.cost.total.micros}
    admin.close()
