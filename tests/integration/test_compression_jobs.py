"""Compression jobs through the real worker on digits: each variant registered as TorchScript and measured
honestly, AutoCompress picking the best variant that meets the floor, bad recipes refused, unattainable floors."""
from __future__ import annotations

import io
import time

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format
from margin.common import protoconv
from margin.common.costs import PriceCatalog
from margin.common.jobs import JobStore
from margin.compression.estimate import HISTORY_PRECISION
from margin.modelzoo.datasets import load_builtin, split
from margin.v1 import common_pb2, compression_pb2, registry_pb2
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from tests.integration.training_stack import TrainingStack, train_digits_mlp, training_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]
State = common_pb2.JobState
SOURCE = common_pb2.VersionRef(model="digits", number=1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> TrainingStack:
    with training_stack(tmp_path_factory.mktemp("compression")) as s:
        train_digits_mlp(s)
        yield s


def finished(stack: TrainingStack, job_id: str) -> compression_pb2.CompressionJob:
    stub, md = stack.compression_stub()
    ended = {State.Value(n) for n in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_BUDGET_EXCEEDED",
                                      "JOB_STATE_CANCELLED")}
    return wait_for(lambda: (j := stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=job_id),
                                                         metadata=md)).state in ended and j, 180)


def recipe(name: str, *steps: dict, **fields) -> compression_pb2.Recipe:
    return json_format.ParseDict({"name": name, "steps": list(steps), **fields}, compression_pb2.Recipe())


def download(stack: TrainingStack, ref: common_pb2.VersionRef) -> bytes:
    return stack.cluster.client().download_bytes(ref)[1]


TECHNIQUES = {
    "structured prune + fine-tune + dynamic int8": [
        {"prune": {"kind": "KIND_STRUCTURED", "amount": 0.5, "finetune_epochs": 3}},
        {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}],
    "unstructured prune + fine-tune + weight-only int8": [
        {"prune": {"kind": "KIND_UNSTRUCTURED", "amount": 0.6, "finetune_epochs": 2}},
        {"quantize": {"scheme": "weight_only_int8"}}],
    "distillation + static int8": [
        {"distill": {"student_family": "mlp", "student_architecture": {"hidden": [32]}, "epochs": 10,
                     "temperature": 4.0, "alpha": 0.7, "learning_rate": 0.003}},
        {"quantize": {"scheme": "static_int8", "calibration_batches": 4}}],
    "sensitivity: static int8 keeping the most sensitive layer in float": [
        {"quantize": {"scheme": "static_int8", "calibration_batches": 4}}],
}


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_technique_registers_a_variant_whose_report_matches_the_artifact(stack, technique):
    stub, md = stack.compression_stub()
    job = stub.SubmitCompression(compression_pb2.SubmitCompressionRequest(
        source=SOURCE, recipe=recipe(technique, *TECHNIQUES[technique],
                                     keep_sensitive_layers=1 if technique.startswith("sensitivity") else 0),
        eval_dataset=common_pb2.DatasetRef(builtin="sklearn:digits")), metadata=md)
    final = finished(stack, job.id)
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED", final.outcome
    assert len(final.variants) == 1 and final.chosen == 0
    v = final.variants[0]
    variant_bytes = download(stack, v.version)
    assert v.size_bytes == len(variant_bytes)
    assert v.compression_ratio == pytest.approx(final.baseline.size_bytes / len(variant_bytes), rel=1e-12)
    assert v.compression_ratio > 1.5
    assert v.quality_delta == pytest.approx(v.quality - final.baseline.quality, abs=1e-12)
    if "unstructured" in technique:
        assert v.sparsity >= 0.55  # 60 % of the Linear weights pruned and kept at zero through fine-tuning
    # quality recomputed from the registered artifact on the same held-out rows
    data = split(*load_builtin("sklearn:digits"), validation_fraction=0.2, seed=0)
    served = torch.jit.load(io.BytesIO(variant_bytes))
    with torch.inference_mode():
        accuracy = (served(torch.from_numpy(data.x_val)).argmax(1).numpy() == data.y_val).mean()
    assert accuracy == pytest.approx(v.quality, abs=1e-9)
    assert v.cost_per_million.micros > 0 and v.run_cost.micros >= 0 and v.latency_p50_ms_batch32 > 0
    client = stack.cluster.client()
    version = client.stub.GetVersion(registry_pb2.GetVersionRequest(version=v.version), metadata=client.metadata)
    assert version.parent.number == 1 and protoconv.from_struct(version.recipe)["job_id"] == job.id
    assert final.cost.total.micros > 0


def test_auto_compress_picks_the_cheapest_variant_meeting_the_floor_among_those_tried(stack):
    stub, md = stack.compression_stub()
    job = stub.AutoCompress(compression_pb2.AutoCompressRequest(
        source=SOURCE, floor=common_pb2.QualityFloor(metric="accuracy", minimum=0.95)), metadata=md)
    final = finished(stack, job.id)
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED", final.outcome
    assert len(final.variants) >= 5 and final.chosen >= 0
    passing = [v for v in final.variants if v.quality >= 0.95]
    assert all(v.meets_floor == (v.quality >= 0.95) for v in final.variants)
    chosen = final.variants[final.chosen]
    assert chosen.meets_floor
    assert chosen.cost_per_million.micros == min(v.cost_per_million.micros for v in passing)
    assert chosen.pareto_optimal and "chose" in final.outcome
    assert len({v.version.number for v in final.variants}) == len(final.variants)


def test_an_unattainable_floor_reports_the_front_and_says_why_none_was_chosen(stack):
    stub, md = stack.compression_stub()
    job = stub.AutoCompress(compression_pb2.AutoCompressRequest(
        source=SOURCE, floor=common_pb2.QualityFloor(metric="accuracy", minimum=0.9999),
        candidates=[recipe("int8", {"quantize": {"scheme": "dynamic_int8"}})]), metadata=md)
    final = finished(stack, job.id)
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED"
    assert final.chosen == -1 and "no variant meets the floor" in final.outcome
    assert len(final.variants) == 1 and not final.variants[0].meets_floor and final.variants[0].pareto_optimal


@pytest.mark.parametrize(("steps", "fragment"), [
    ([{"prune": {"kind": "KIND_UNSTRUCTURED", "amount": 1.5}}], "prune amount must be in (0, 1)"),
    ([{"quantize": {"scheme": "int3_magic"}}], "scheme"),
    ([{"distill": {"student_family": "mlp", "student_architecture": {"input_dim": 32, "hidden": [16]}}}],
     "incompatible with the data"),
    ([{"quantize": {"scheme": "dynamic_int8"}}, {"prune": {"kind": "KIND_STRUCTURED", "amount": 0.5}}], "quantize"),
])
def test_invalid_recipes_are_invalid_argument(stack, steps, fragment):
    stub, md = stack.compression_stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitCompression(compression_pb2.SubmitCompressionRequest(source=SOURCE, recipe=recipe("bad", *steps)),
                               metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()


def test_another_tenants_source_is_not_found(stack):
    stub, md = stack.compression_stub("other")
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitCompression(compression_pb2.SubmitCompressionRequest(
            source=SOURCE, recipe=recipe("int8", {"quantize": {"scheme": "dynamic_int8"}})), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def finetuning(count: int, epochs: int) -> list[compression_pb2.Recipe]:
    """Candidates that each fine-tune for a while: a run long enough to cancel or to run out of budget."""
    return [recipe(f"prune-{i}", {"prune": {"kind": "KIND_STRUCTURED", "amount": 0.3 + 0.05 * i,
                                            "finetune_epochs": epochs}}) for i in range(count)]


def job_variants(stack: TrainingStack, job_id: str) -> list[registry_pb2.ModelVersion]:
    return [v for v in stack.versions("digits") if protoconv.from_struct(v.recipe).get("job_id") == job_id]


def test_the_source_and_its_torchscript_export_carry_the_baseline_serving_figures(stack):
    """Routing compares the original and its variants measured the same way: the job attaches its measurement of
    the source to the source and to its TorchScript export."""
    client = stack.cluster.client()
    scripted = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(64, 10)), scripted)  # the export's bytes do not matter here
    export = client.upload_bytes(scripted.getvalue(), registry_pb2.UploadMetadata(
        model="digits", format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, parent=SOURCE,
        recipe=protoconv.struct({"kind": "export", "to": "torchscript"})))
    stub, md = stack.compression_stub()
    job = stub.SubmitCompression(compression_pb2.SubmitCompressionRequest(
        source=SOURCE, recipe=recipe("int8", {"quantize": {"scheme": "dynamic_int8", "per_channel": True}})),
        metadata=md)
    final = finished(stack, job.id)
    assert final.baseline.compression_ratio == 1.0 and final.baseline.version == SOURCE
    assert final.baseline.size_bytes == pytest.approx(final.variants[0].size_bytes
                                                      * final.variants[0].compression_ratio, abs=1)
    for number in (SOURCE.number, export.number):
        version = client.stub.GetVersion(registry_pb2.GetVersionRequest(
            version=common_pb2.VersionRef(model="digits", number=number)), metadata=client.metadata)
        assert version.metrics["cost_per_million_micros"] == final.baseline.cost_per_million.micros
        assert version.metrics["latency_p50_ms_batch32"] == pytest.approx(final.baseline.latency_p50_ms_batch32)
    assert final.estimate.low.micros <= final.estimate.expected.micros <= final.estimate.high.micros
    assert final.estimate_basis


def test_the_estimate_comes_from_history_after_a_run(stack):
    stub, md = stack.compression_stub()
    job = stub.SubmitCompression(compression_pb2.SubmitCompressionRequest(
        source=SOURCE, recipe=recipe("int8", {"quantize": {"scheme": "weight_only_int8"}})), metadata=md)
    assert job.estimate_basis.startswith("history: ") and "per variant" in job.estimate_basis
    # one plain variant: a few seconds at most, so the high end is well under the first guess's 6 s × 4
    assert job.estimate.high.micros < 24 * 173_750 / 3600
    finished(stack, job.id)


def test_cancel_between_variants_ends_cancelled_keeping_the_variants_made(stack):
    stub, md = stack.compression_stub()
    job = stub.AutoCompress(compression_pb2.AutoCompressRequest(
        source=SOURCE, floor=common_pb2.QualityFloor(metric="accuracy", minimum=0.5),
        candidates=finetuning(6, 30)), metadata=md)
    for event in stub.WatchCompressionJob(compression_pb2.WatchCompressionJobRequest(id=job.id), metadata=md):
        if event.stage == "variant":
            break
    asked = time.monotonic()
    stub.CancelCompressionJob(compression_pb2.CancelCompressionJobRequest(id=job.id, reason="enough"), metadata=md)
    final = finished(stack, job.id)
    assert State.Name(final.state) == "JOB_STATE_CANCELLED", final.outcome
    assert time.monotonic() - asked < 30 and "cancel" in final.outcome
    made = job_variants(stack, job.id)
    assert 1 <= len(made) < 6
    assert final.cost.total.micros > 0 and sum(r.micros for r in stack.ledger(job.id)) == final.cost.total.micros
    with pytest.raises(grpc.RpcError) as err:
        stub.CancelCompressionJob(compression_pb2.CancelCompressionJobRequest(id=job.id), metadata=md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def record_impossibly_fast_history(stack: TrainingStack, family: str, device_class: str) -> None:
    """One compression run in the throughput history at 1e12 sample-parameters/s and 50 ms per variant."""
    engine = create_engine(f"sqlite:///{stack.home / 'margin.db'}")
    store = JobStore(sessionmaker(engine), PriceCatalog.load())
    store.record_throughput(family, device_class, HISTORY_PRECISION, 1, 1e12, 0.05)
    engine.dispose()


def test_a_budget_below_the_estimate_is_refused_and_one_that_runs_out_stops_the_run(stack):
    stub, md = stack.compression_stub()

    def auto(count: int, budget: int = 0) -> compression_pb2.AutoCompressRequest:
        return compression_pb2.AutoCompressRequest(
            source=SOURCE, floor=common_pb2.QualityFloor(metric="accuracy", minimum=0.5),
            candidates=finetuning(count, 40), budget=common_pb2.Money(micros=budget))

    listed = len(stub.ListCompressionJobs(compression_pb2.ListCompressionJobsRequest(page_size=100),
                                          metadata=md).jobs)
    with pytest.raises(grpc.RpcError) as err:
        stub.AutoCompress(auto(6, budget=1), metadata=md)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "estimate" in err.value.details()
    assert len(stub.ListCompressionJobs(compression_pb2.ListCompressionJobsRequest(page_size=100),
                                        metadata=md).jobs) == listed
    # A history that says this machine makes a variant in 50 ms and fine-tunes at 1e12 sample-parameters/s, far
    # faster than any machine does: the estimate's low end (a few dozen µ$) is then a budget the real run cannot stay
    # within, however fast or loaded the machine is (a history from a real short run made this depend on the
    # machine's speed from one run to the next).
    device_class = stub.EstimateCompression(compression_pb2.EstimateCompressionRequest(auto=auto(6)),
                                            metadata=md).device_class
    record_impossibly_fast_history(stack, "mlp", device_class)
    estimate = stub.EstimateCompression(compression_pb2.EstimateCompressionRequest(auto=auto(6)), metadata=md)
    assert estimate.variants == 6 and estimate.basis.startswith("history") and estimate.cost.low.micros > 0
    assert estimate.cost.low.micros < estimate.cost.expected.micros < estimate.cost.high.micros
    job = stub.AutoCompress(auto(6, budget=estimate.cost.low.micros), metadata=md)
    final = finished(stack, job.id)
    assert State.Name(final.state) == "JOB_STATE_BUDGET_EXCEEDED", final.outcome
    assert 0 < final.cost.total.micros <= estimate.cost.low.micros and "budget" in final.outcome
    assert len(job_variants(stack, job.id)) < 6
    assert sum(r.micros for r in stack.ledger(job.id)) == final.cost.total.micros


def test_a_classifier_is_scored_on_the_teams_own_dataset(stack):
    """A built-in MLP scored on an uploaded ``.npz`` (here the last 600 digits, relabelled nowhere: its own rows),
    not the built-in dataset: the worker splits it as a training job would and reports accuracy on its held-out
    rows; a dataset whose features do not fit the model is refused at submit."""
    x, y = load_builtin("sklearn:digits")
    x, y = x[-600:], y[-600:]
    client = stack.cluster.client()
    client.ensure_model("team-digits")
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    data = client.upload_bytes(buffer.getvalue(), registry_pb2.UploadMetadata(
        model="team-digits", format=registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ))
    buffer = io.BytesIO()
    np.savez(buffer, x=x[:, :32], y=y)
    narrow = client.upload_bytes(buffer.getvalue(), registry_pb2.UploadMetadata(
        model="team-digits", format=registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ))
    stub, md = stack.compression_stub()

    def submit(version: registry_pb2.ModelVersion) -> compression_pb2.CompressionJob:
        return stub.SubmitCompression(compression_pb2.SubmitCompressionRequest(
            source=SOURCE, recipe=recipe("int8", {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}),
            eval_dataset=common_pb2.DatasetRef(registry=common_pb2.VersionRef(model=version.model,
                                                                              number=version.number))), metadata=md)

    with pytest.raises(grpc.RpcError) as err:
        submit(narrow)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "64" in err.value.details()
    final = finished(stack, submit(data).id)
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED", final.outcome
    held = split(x, y, validation_fraction=0.2, seed=0)
    served = torch.jit.load(io.BytesIO(download(stack, final.variants[0].version)))
    with torch.inference_mode():
        accuracy = (served(torch.from_numpy(held.x_val)).argmax(1).numpy() == held.y_val).mean()
    assert len(held.y_val) == 120 and final.variants[0].quality == pytest.approx(accuracy, abs=1e-9)
