"""Training with a registry dataset, checked at submit from the manifest the registry stored at upload: real
redis-server, registry and training servers over gRPC, and no worker (a refused job must never reach one)."""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from margin.common import protoconv
from margin.v1 import common_pb2, registry_pb2, training_pb2

from tests.integration.training_stack import TrainingStack, training_stack

ROWS, FEATURES = 1797, 64  # the shape of the built-in sklearn:digits
ARCH = {"input_dim": FEATURES, "hidden": [32], "num_classes": 10}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[TrainingStack]:
    with training_stack(Path(tmp_path_factory.mktemp("manifest")), worker=False) as s:
        yield s


def upload_dataset(stack: TrainingStack, model: str, **arrays: np.ndarray) -> common_pb2.DatasetRef:
    """Upload ``arrays`` as a compressed .npz: its few bytes would guess far fewer rows than it holds."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    client = stack.cluster.client()
    client.create_model(model)
    version = client.upload_bytes(buffer.getvalue(), registry_pb2.UploadMetadata(
        model=model, format=registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ))
    return common_pb2.DatasetRef(registry=common_pb2.VersionRef(model=model, number=version.number))


def spec(dataset: common_pb2.DatasetRef) -> training_pb2.TrainingSpec:
    return training_pb2.TrainingSpec(model="m", family="mlp", epochs=2, dataset=dataset,
                                     architecture=protoconv.struct(ARCH))


def job_count(stack: TrainingStack) -> int:
    stub, md = stack.stub()
    return len(stub.ListJobs(training_pb2.ListJobsRequest(page_size=1000), metadata=md).jobs)


def refused(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    return info.value.details()


@pytest.mark.parametrize(("name", "arrays", "fragment"), [
    ("narrow", {"x": np.zeros((50, 10), np.float32), "y": np.zeros(50, np.int64)},
     "`x` has 10 features but the architecture expects 64"),
    ("unlabelled", {"x": np.zeros((50, FEATURES), np.float32)}, "has no labels `y`"),
    ("pixels", {"pixels": np.zeros((50, FEATURES), np.float32), "y": np.zeros(50, np.int64)},
     "has no array 'x' (the features); its arrays: pixels: FP32[50, 64], y: INT64[50]"),
])
def test_a_dataset_the_architecture_cannot_train_on_is_refused_at_submit_and_creates_no_job(stack, name, arrays,
                                                                                           fragment):
    dataset = upload_dataset(stack, name, **arrays)
    stub, md = stack.stub()
    before = job_count(stack)
    details = refused(lambda: stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec(dataset)), metadata=md))
    assert f"dataset {name} v1" in details and fragment in details, details
    assert fragment in refused(lambda: stub.EstimateCost(training_pb2.EstimateCostRequest(spec=spec(dataset)),
                                                         metadata=md))
    assert job_count(stack) == before  # jobs are what is queued and billed: none was made


def test_a_dataset_that_fits_is_admitted_and_estimated_from_the_rows_of_its_manifest(stack):
    dataset = upload_dataset(stack, "digits-shaped", x=np.zeros((ROWS, FEATURES), np.float32),
                             y=np.zeros(ROWS, np.int64))
    stub, md = stack.stub()
    builtin = stub.EstimateCost(training_pb2.EstimateCostRequest(
        spec=spec(common_pb2.DatasetRef(builtin="sklearn:digits"))), metadata=md)
    from_registry = stub.EstimateCost(training_pb2.EstimateCostRequest(spec=spec(dataset)), metadata=md)
    assert from_registry.device_hours == builtin.device_hours  # same rows, features and model: the same work
    before = job_count(stack)
    job = stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec(dataset)), metadata=md)
    assert job.id and job_count(stack) == before + 1
