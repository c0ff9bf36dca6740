"""Architectures from clients (training specs, distillation students) over real gRPC: non-finite numbers and sizes
beyond the configured limits are INVALID_ARGUMENT naming the field, and estimates are counted from the spec, not
by building the model in the service (no worker: nothing here runs)."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from margin.common import protoconv
from margin.v1 import common_pb2, compression_pb2, registry_pb2, training_pb2
from safetensors.torch import save as safetensors_save

from tests.integration.training_stack import TrainingStack, training_stack

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[TrainingStack]:
    with training_stack(Path(tmp_path_factory.mktemp("arch")), worker=False) as s:
        yield s


def spec(hidden) -> training_pb2.TrainingSpec:
    return training_pb2.TrainingSpec(model="m", family="mlp", epochs=1, architecture=protoconv.struct(
        {"hidden": hidden}), dataset=common_pb2.DatasetRef(builtin="sklearn:digits"))


def refused(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    return info.value.details()


@pytest.mark.parametrize("number", NON_FINITE)
def test_a_non_finite_number_in_a_training_architecture_is_invalid_argument(stack, number):
    stub, md = stack.stub()
    for call in (lambda: stub.EstimateCost(training_pb2.EstimateCostRequest(spec=spec([32, number])), metadata=md),
                 lambda: stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec([32, number])), metadata=md)):
        details = refused(call)
        assert "spec.architecture.hidden[1]" in details and "finite" in details


@pytest.mark.parametrize("number", NON_FINITE)
def test_a_non_finite_number_in_a_student_architecture_is_invalid_argument(stack, number):
    stub, md = stack.compression_stub()
    distill = compression_pb2.DistillStep(student_family="mlp", epochs=1)
    distill.student_architecture.update({"hidden": [number]})
    recipe = compression_pb2.Recipe(name="r", steps=[compression_pb2.CompressionStep(distill=distill)])
    source = common_pb2.VersionRef(model="digits", number=1)
    submit = compression_pb2.SubmitCompressionRequest(source=source, recipe=recipe)
    auto = compression_pb2.AutoCompressRequest(source=source, candidates=[recipe],
                                               floor=common_pb2.QualityFloor(metric="accuracy", minimum=0.9))
    field = "steps[0].distill.student_architecture.hidden[0]"
    assert f"recipe.{field}" in refused(lambda: stub.SubmitCompression(submit, metadata=md))
    assert f"candidates[0].{field}" in refused(lambda: stub.AutoCompress(auto, metadata=md))
    assert f"submit.recipe.{field}" in refused(lambda: stub.EstimateCompression(
        compression_pb2.EstimateCompressionRequest(submit=submit), metadata=md))
    assert f"auto.candidates[0].{field}" in refused(lambda: stub.EstimateCompression(
        compression_pb2.EstimateCompressionRequest(auto=auto), metadata=md))


@pytest.mark.parametrize(("hidden", "field"), [([1e6, 1e6], "hidden[0] is 1000000"),
                                               ([8192, 8192], "parameters; the limit is 50000000"),
                                               ([8] * 65, "hidden has 65 layers")])
def test_an_architecture_beyond_the_limits_is_invalid_argument(stack, hidden, field):
    stub, md = stack.stub()
    assert field in refused(lambda: stub.EstimateCost(training_pb2.EstimateCostRequest(spec=spec(hidden)),
                                                      metadata=md))
    assert field in refused(lambda: stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec(hidden)), metadata=md))


def test_an_operator_can_raise_the_limits_and_the_estimate_never_builds_the_model(stack, monkeypatch):
    """With the limits raised, a 1e6 x 1e6 MLP (4 TB of fp32 weights) is estimated from its sizes: building it in
    the service would fail to allocate."""
    monkeypatch.setenv("MARGIN_MAX_LAYER_WIDTH", str(10**6))
    monkeypatch.setenv("MARGIN_MAX_MODEL_PARAMETERS", str(10**13))
    stub, md = stack.stub()
    estimate = stub.EstimateCost(training_pb2.EstimateCostRequest(spec=spec([1e6, 1e6])), metadata=md)
    assert estimate.cost.expected.micros > 0 and estimate.device_hours > 0


@pytest.mark.parametrize(("arch", "field"), [
    ({"family": "mlp", "input_dim": 64, "hidden": [1e6, 1e6], "num_classes": 10}, "hidden[0] is 1000000"),
    ({"family": "cnn", "image_size": "8", "num_classes": 10}, "architecture.image_size must be a positive integer"),
    ({"family": "mlp", "input_dim": 64, "hidden": [True], "num_classes": 10}, "hidden[0] must be a positive integer"),
])
def test_a_compression_source_whose_registered_architecture_is_out_of_bounds_is_invalid_argument(stack, arch, field):
    """The registry keeps whatever architecture an upload declares; compression checks it before reading it."""
    client = stack.cluster.client()
    name = f"src-{hashlib.sha256(field.encode()).hexdigest()[:8]}"
    client.create_model(name)
    meta = registry_pb2.UploadMetadata(model=name, format=registry_pb2.ARTIFACT_FORMAT_SAFETENSORS)
    meta.architecture.update(arch)
    client.upload_bytes(safetensors_save({"w": torch.zeros(2)}), meta)
    stub, md = stack.compression_stub()
    recipe = compression_pb2.Recipe(name="q", steps=[compression_pb2.CompressionStep(
        quantize=compression_pb2.QuantizeStep(scheme="dynamic_int8"))])
    details = refused(lambda: stub.EstimateCompression(compression_pb2.EstimateCompressionRequest(
        submit=compression_pb2.SubmitCompressionRequest(source=common_pb2.VersionRef(model=name, number=1),
                                                        recipe=recipe)), metadata=md))
    assert f"source {name} v1" in details and field in details


@pytest.mark.parametrize("number", NON_FINITE)
def test_a_non_finite_quality_floor_is_invalid_argument(stack, number):
    stub, md = stack.compression_stub()
    auto = compression_pb2.AutoCompressRequest(source=common_pb2.VersionRef(model="digits", number=1),
                                               floor=common_pb2.QualityFloor(metric="accuracy", minimum=number))
    assert "floor.minimum must be a finite number" in refused(lambda: stub.AutoCompress(auto, metadata=md))
    assert "auto.floor.minimum" in refused(lambda: stub.EstimateCompression(
        compression_pb2.EstimateCompressionRequest(auto=auto), metadata=md))
