"""A job on a model package is checked at submit, before anything is queued or billed: real redis-server, registry
and training servers over gRPC, and no worker (a refused job must never reach one). No service imports the package:
what the checks know of it is what the registry read from its source at upload (the contract functions it
defines), and of a version trained from one, what its job recorded (package, config, parameter names)."""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from margin.common import protoconv
from margin.v1 import common_pb2, registry_pb2, training_pb2
from safetensors.numpy import save

from tests.integration.training_stack import TrainingStack, training_stack

PACKAGE = b"def build_model(width=8):\n    raise SystemExit('never run by a service')\n"
WITH_LOSS = PACKAGE + b"\ndef loss(outputs, batch):\n    return outputs.sum()\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[TrainingStack]:
    with training_stack(Path(tmp_path_factory.mktemp("packages")), worker=False) as s:
        yield s


def upload(stack: TrainingStack, model: str, data: bytes, fmt: int, tenant: str = "acme", **meta):
    client = stack.cluster.client(tenant)
    client.ensure_model(model)
    v = client.upload_bytes(data, registry_pb2.UploadMetadata(model=model, format=fmt, **meta))
    return common_pb2.VersionRef(model=v.model, number=v.number)


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def refs(stack) -> dict[str, common_pb2.VersionRef]:
    pkg, data = registry_pb2.ARTIFACT_FORMAT_MODEL_PACKAGE, registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ
    images = np.zeros((40, 3, 8, 8), np.float32)
    trained_arch = {"package": {"model": "code", "number": 1}, "config": {"width": 8},
                    "parameters": ["stem.weight", "head.weight", "head.bias"]}
    return {
        "code": upload(stack, "code", PACKAGE, pkg),
        "code-with-loss": upload(stack, "code-with-loss", WITH_LOSS, pkg),
        "labelled": upload(stack, "labelled", npz(images=images, y=np.zeros(40, np.int64)), data),
        "unlabelled": upload(stack, "unlabelled", npz(images=images, target=np.zeros((40, 2), np.float32)), data),
        "trained": upload(stack, "trained", save({"stem.weight": np.zeros(2, np.float32)}),
                          registry_pb2.ARTIFACT_FORMAT_SAFETENSORS, architecture=protoconv.struct(trained_arch)),
        "other-tenant-code": upload(stack, "theirs", PACKAGE, pkg, tenant="other"),
    }


def spec(refs, package: str | None = "code", dataset: str = "labelled", **fields) -> training_pb2.TrainingSpec:
    s = training_pb2.TrainingSpec(model="mine", epochs=2, dataset=common_pb2.DatasetRef(registry=refs[dataset]),
                                  **fields)
    if package:
        s.package.CopyFrom(refs[package])
    return s


def job_count(stack: TrainingStack) -> int:
    stub, md = stack.stub()
    return len(stub.ListJobs(training_pb2.ListJobsRequest(page_size=1000), metadata=md).jobs)


def refusal(stack: TrainingStack, s: training_pb2.TrainingSpec) -> tuple[grpc.StatusCode, str]:
    stub, md = stack.stub()
    before = job_count(stack)
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitJob(training_pb2.SubmitJobRequest(spec=s), metadata=md)
    assert job_count(stack) == before
    return info.value.code(), info.value.details()


def test_a_package_version_records_what_its_source_defines_without_running_it(stack, refs):
    client = stack.cluster.client()
    v = client.stub.GetVersion(registry_pb2.GetVersionRequest(version=refs["code-with-loss"]),
                               metadata=client.metadata)
    assert protoconv.from_struct(v.architecture)["defines"] == ["build_model", "loss"]


def test_a_valid_package_job_is_admitted_with_a_first_guess_estimate_in_samples(stack, refs):
    stub, md = stack.stub()
    s = spec(refs, config=protoconv.struct({"width": 16}))
    estimate = stub.EstimateCost(training_pb2.EstimateCostRequest(spec=s), metadata=md)
    assert estimate.basis.startswith("first guess (no history for package code v1 on cpu): 300 samples/s")
    assert 0 < estimate.cost.low.micros < estimate.cost.expected.micros < estimate.cost.high.micros
    job = stub.SubmitJob(training_pb2.SubmitJobRequest(spec=s), metadata=md)
    assert job.state == common_pb2.JOB_STATE_QUEUED and job.spec.package.number == 1
    assert protoconv.from_struct(job.spec.config) == {"width": 16} and job.spec.family == ""


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"family": "mlp"}, "name a built-in family or a model package"),
    ({"architecture": protoconv.struct({"hidden": [8]})}, "takes spec.config"),
    ({"max_seconds": -1}, "spec.max_seconds must be between 0"),
])
def test_a_package_job_with_fields_that_do_not_belong_is_invalid_and_nothing_is_queued(stack, refs, fields,
                                                                                       fragment):
    code, message = refusal(stack, spec(refs, **fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in message, message


def test_a_builtin_dataset_or_an_unlabelled_one_is_refused_for_a_package_without_a_loss(stack, refs):
    builtin = spec(refs)
    builtin.dataset.CopyFrom(common_pb2.DatasetRef(builtin="sklearn:digits"))
    code, message = refusal(stack, builtin)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "registry dataset" in message
    code, message = refusal(stack, spec(refs, dataset="unlabelled"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "defines no loss(outputs, batch)" in message


def test_a_package_with_its_own_loss_trains_on_a_dataset_without_labels(stack, refs):
    stub, md = stack.stub()
    job = stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec(refs, "code-with-loss", "unlabelled")),
                         metadata=md)
    assert job.state == common_pb2.JOB_STATE_QUEUED


def test_what_is_not_a_package_or_is_another_tenants_is_refused(stack, refs):
    code, message = refusal(stack, spec(refs, package="labelled"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a model package" in message
    code, message = refusal(stack, spec(refs, package="other-tenant-code"))
    assert code == grpc.StatusCode.NOT_FOUND, message


def test_fine_tuning_a_package_trained_version_takes_its_package_and_checks_layers_to_freeze(stack, refs):
    stub, md = stack.stub()
    s = spec(refs, package=None, freeze_layers=["stem"])
    s.base_version.CopyFrom(refs["trained"])
    job = stub.SubmitJob(training_pb2.SubmitJobRequest(spec=s), metadata=md)
    assert (job.spec.package.model, job.spec.package.number) == ("code", 1)
    assert protoconv.from_struct(job.spec.config) == {"width": 8}
    s.freeze_layers[:] = ["backbone"]
    code, message = refusal(stack, s)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'backbone' matches no parameter" in message
    s.freeze_layers[:] = ["stem", "head"]
    code, message = refusal(stack, s)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "freezes every parameter" in message
    s.freeze_layers[:] = []
    s.family = "cnn"
    code, message = refusal(stack, s)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "fine-tune it with that package" in message


def test_an_unknown_family_says_how_to_train_your_own_code(stack, refs):
    code, message = refusal(stack, spec(refs, package=None, family="resnet"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown model family 'resnet'" in message and "upload-package" in message
