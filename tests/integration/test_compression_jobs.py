"""Compression jobs through the real worker on digits: each variant registered as TorchScript and measured
honestly, AutoCompress picking the best variant that meets the floor, bad recipes refused, unattainable floors."""
from __future__ import annotations

import io

import grpc
import pytest
import torch
from google.protobuf import json_format
from margin.common import protoconv
from margin.modelzoo.datasets import load_builtin, split
from margin.v1 import common_pb2, compression_pb2, registry_pb2, training_pb2

from tests.integration.training_stack import TrainingStack, training_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]
State = common_pb2.JobState
SOURCE = common_pb2.VersionRef(model="digits", number=1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> TrainingStack:
    with training_stack(tmp_path_factory.mktemp("compression")) as s:
        stub, md = s.stub()
        spec = training_pb2.TrainingSpec(model="digits", family="mlp", epochs=30, learning_rate=0.003,
                                         architecture=protoconv.struct({"hidden": [128]}),
                                         dataset=common_pb2.DatasetRef(builtin="sklearn:digits"))
        job = stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec), metadata=md)
        wait_for(lambda: stub.GetJob(training_pb2.GetJobRequest(id=job.id), metadata=md).state
                 == State.Value("JOB_STATE_SUCCEEDED"), 120)
        yield s


def finished(stack: TrainingStack, job_id: str) -> compression_pb2.CompressionJob:
    stub, md = stack.compression_stub()
    ended = {State.Value(n) for n in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_BUDGET_EXCEEDED")}
    return wait_for(lambda: (j := stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=job_id),
                                                         metadata=md)).state in ended and j, 180)


def recipe(name: str, *steps: dict) -> compression_pb2.Recipe:
    return json_format.ParseDict({"name": name, "steps": list(steps)}, compression_pb2.Recipe())


def download(stack: TrainingStack, ref: common_pb2.VersionRef) -> bytes:
    return stack.cluster.client().download_bytes(ref)[1]


def test_an_explicit_recipe_registers_a_variant_whose_report_matches_the_artifact(stack):
    stub, md = stack.compression_stub()
    job = stub.SubmitCompression(compression_pb2.SubmitCompressionRequest(
        source=SOURCE, recipe=recipe("prune+int8", {"prune": {"kind": "KIND_STRUCTURED", "amount": 0.5,
                                                              "finetune_epochs": 3}},
                                     {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}),
        eval_dataset=common_pb2.DatasetRef(builtin="sklearn:digits")), metadata=md)
    final = finished(stack, job.id)
    assert State.Name(final.state) == "JOB_STATE_SUCCEEDED", final.outcome
    assert len(final.variants) == 1 and final.chosen == 0
    v = final.variants[0]
    variant_bytes = download(stack, v.version)
    source_bytes_ts = v.size_bytes * v.compression_ratio
    assert v.size_bytes == len(variant_bytes)
    assert v.compression_ratio > 1.5 and source_bytes_ts > len(variant_bytes)
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
