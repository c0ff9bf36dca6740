"""A team's own PyTorch code as a Margin training job, through the real worker and a real bubblewrap sandbox.

The package is the README's example (``examples/resnet-package/model.py``: a ResNet-style CNN with BatchNorm) and
the dataset is the one its ``make_dataset.py`` makes (3x32x32 images). It trains to a stated accuracy, is registered
with its package reference, config, lineage and cost, fine-tunes from its own weights with frozen layers, exports
TorchScript and ONNX, compresses (ONNX, #11's path) and deploys behind the gateway; DDP world size 2 with bf16 runs
on CPU; cancel and a budget that runs out end as they do for built-in jobs.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from margin.common import protoconv
from margin.common.protoconv import signature_from_proto
from margin.v1 import common_pb2, compression_pb2, inference_pb2, inference_pb2_grpc, registry_pb2, training_pb2
from safetensors.numpy import load as load_safetensors

from tests.byom_models import EXAMPLE, ONNX_EXPORT_WARNINGS, example_module
from tests.integration.inference_stack import Gateway, gateway_on
from tests.integration.training_stack import TrainingStack, training_stack, wait_for

make = example_module("make_dataset").make  # the README example's own dataset maker

pytestmark = [pytest.mark.slow, *ONNX_EXPORT_WARNINGS,
              pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (make setup)")]
State = common_pb2.JobState
ENDED = {State.JOB_STATE_SUCCEEDED, State.JOB_STATE_FAILED, State.JOB_STATE_BUDGET_EXCEEDED,
         State.JOB_STATE_CANCELLED}
ACCURACY = 0.85  # the stated accuracy: chance is 0.10
ROWS = 1200


@dataclass
class Packages:
    jobs: TrainingStack
    gateway: Gateway
    package: common_pb2.VersionRef
    dataset: common_pb2.VersionRef
    arrays: dict[str, np.ndarray]

    def registry(self, tenant: str = "acme"):
        return self.jobs.cluster.client(tenant)

    def md(self, tenant: str = "acme") -> tuple:
        return (("authorization", f"Bearer {self.jobs.cluster.keys[tenant]}"),)


def upload_package(client, model: str, source: bytes) -> common_pb2.VersionRef:
    client.ensure_model(model)
    v = client.upload_bytes(source, registry_pb2.UploadMetadata(model=model,
                                                                format=registry_pb2.ARTIFACT_FORMAT_MODEL_PACKAGE))
    return common_pb2.VersionRef(model=v.model, number=v.number)


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> Packages:
    home = tmp_path_factory.mktemp("packages")
    with training_stack(home, max_upload=64 << 20) as jobs, \
            gateway_on(jobs.cluster, home, jobs.worker_env["MARGIN_REDIS_URL"]) as gateway:
        client = jobs.cluster.client("acme")
        package = upload_package(client, "resnet-code", (EXAMPLE / "model.py").read_bytes())
        arrays = {k: v[:ROWS] for k, v in make().items()}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        client.ensure_model("images")
        data = client.upload_bytes(buffer.getvalue(), registry_pb2.UploadMetadata(
            model="images", format=registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ))
        yield Packages(jobs, gateway, package, common_pb2.VersionRef(model=data.model, number=data.number), arrays)


def package_spec(p: Packages, model: str, **fields) -> training_pb2.TrainingSpec:
    config = fields.pop("config", {"width": 16})
    values = {"epochs": 6, "batch_size": 32, "learning_rate": 0.01, **fields}
    package = values.pop("package", p.package)
    spec = training_pb2.TrainingSpec(model=model, config=protoconv.struct(config),
                                     dataset=common_pb2.DatasetRef(registry=p.dataset), **values)
    if package is not None:  # fine-tuning may leave it out: the base version names its package
        spec.package.CopyFrom(package)
    return spec


def submit(p: Packages, spec: training_pb2.TrainingSpec, budget_micros: int = 0, tenant: str = "acme"):
    stub, md = p.jobs.stub(tenant)
    request = training_pb2.SubmitJobRequest(spec=spec)
    if budget_micros:
        request.budget.CopyFrom(common_pb2.Money(currency="USD", micros=budget_micros))
    return stub.SubmitJob(request, metadata=md)


def ended(p: Packages, job_id: str, timeout: float = 300, tenant: str = "acme") -> training_pb2.TrainingJob:
    stub, md = p.jobs.stub(tenant)
    return wait_for(lambda: (j := stub.GetJob(training_pb2.GetJobRequest(id=job_id), metadata=md)).state in ENDED
                    and j, timeout, interval=0.2)


def version(p: Packages, ref: common_pb2.VersionRef) -> registry_pb2.ModelVersion:
    client = p.registry()
    return client.stub.GetVersion(registry_pb2.GetVersionRequest(version=ref), metadata=client.metadata)


def weights(p: Packages, ref: common_pb2.VersionRef) -> dict[str, np.ndarray]:
    return load_safetensors(p.registry().download_bytes(ref)[1])


@pytest.fixture(scope="module")
def trained(packages) -> training_pb2.TrainingJob:
    job = ended(packages, submit(packages, package_spec(packages, "resnet")).id)
    assert job.state == State.JOB_STATE_SUCCEEDED, job.message
    return job


def test_a_package_trains_to_the_stated_accuracy_and_is_registered_with_its_code_config_lineage_and_cost(
        packages, trained):
    p, job = packages, trained
    print(f"\nfigures: trained val_accuracy {job.metrics['val_accuracy']:.3f}, cost {job.cost.total.micros} micros, "
          f"versions {job.result_version.number} + exports {[v.number for v in job.exported_versions]}")
    assert job.metrics["val_accuracy"] >= ACCURACY, dict(job.metrics)
    assert 0 < job.metrics["val_top2_accuracy"] <= 1  # the package's own metrics(outputs, batch)
    result = version(p, job.result_version)
    assert result.format == registry_pb2.ARTIFACT_FORMAT_SAFETENSORS
    arch = protoconv.from_struct(result.architecture)
    assert arch["package"] == {"model": "resnet-code", "number": p.package.number}
    assert arch["config"] == {"width": 16} and "stem.0.weight" in arch["parameters"]
    assert (result.parent.model, result.parent.number) == ("resnet-code", p.package.number)
    assert 0 < result.cost.total.micros <= job.cost.total.micros  # the version's: what the job had spent to make it
    assert sum(row.micros for row in p.jobs.ledger(job.id)) == job.cost.total.micros
    assert job.attempts == 1 and "servable" in job.message

    (ts, onnx_ref) = job.exported_versions
    ts_version, onnx_version = version(p, ts), version(p, onnx_ref)
    assert ts_version.format == registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT
    assert onnx_version.format == registry_pb2.ARTIFACT_FORMAT_ONNX
    for served in (ts_version, onnx_version):
        assert (served.parent.model, served.parent.number) == (result.model, result.number)
    sig = signature_from_proto(ts_version.signature)
    assert [(s.name, s.dtype, s.shape) for s in sig.inputs] == [("images", "FP32", (-1, 3, 32, 32))]
    assert [(s.name, s.shape) for s in sig.outputs] == [("output__0", (-1, 10))]
    lineage = p.registry().stub.GetLineage(registry_pb2.GetLineageRequest(version=onnx_ref),
                                           metadata=p.registry().metadata)
    chain = [(v.model, v.number) for v in lineage.chain]
    assert chain == [(onnx_ref.model, onnx_ref.number), (result.model, result.number),
                     ("resnet-code", p.package.number)], chain

    # the ONNX export computes what the trained weights compute: its accuracy on the held-out rows is the job's
    session = onnxruntime.InferenceSession(p.registry().download_bytes(onnx_ref)[1],
                                           providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": p.arrays["images"][:200]})[0]
    assert (logits.argmax(1) == p.arrays["y"][:200]).mean() >= ACCURACY - 0.05


def test_fine_tuning_from_its_own_weights_keeps_frozen_layers_then_compresses_and_deploys(packages, trained):
    p = packages
    spec = package_spec(p, "resnet-tuned", epochs=2, config={}, package=None,
                        freeze_layers=["stem", "blocks.0"])
    spec.base_version.CopyFrom(trained.result_version)
    tuned = ended(p, submit(p, spec).id)
    assert tuned.state == State.JOB_STATE_SUCCEEDED, tuned.message
    assert tuned.spec.package.model == "resnet-code" and protoconv.from_struct(tuned.spec.config) == {"width": 16}
    base, after = weights(p, trained.result_version), weights(p, tuned.result_version)
    frozen = [k for k in base if k.startswith(("stem.0.weight", "blocks.0.body.0.weight"))]
    assert frozen and all(np.array_equal(base[k], after[k]) for k in frozen)
    assert not np.array_equal(base["head.weight"], after["head.weight"])
    assert tuned.metrics["val_accuracy"] >= ACCURACY
    tuned_version = version(p, tuned.result_version)
    assert (tuned_version.parent.model, tuned_version.parent.number) == (trained.result_version.model,
                                                                       trained.result_version.number)

    onnx_ref = tuned.exported_versions[1]
    stub, md = p.jobs.compression_stub()
    recipe = compression_pb2.Recipe(name="int8", steps=[compression_pb2.CompressionStep(
        quantize=compression_pb2.QuantizeStep(scheme="dynamic_int8"))])
    compression = stub.SubmitCompression(compression_pb2.SubmitCompressionRequest(
        source=onnx_ref, recipe=recipe, eval_dataset=common_pb2.DatasetRef(registry=p.dataset)), metadata=md)
    done = wait_for(lambda: (j := stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=compression.id),
                                                         metadata=md)).state in ENDED and j, 300, interval=0.2)
    assert done.state == State.JOB_STATE_SUCCEEDED, done.outcome
    (variant,) = done.variants
    print(f"\nfigures: fine-tuned val_accuracy {tuned.metrics['val_accuracy']:.3f}; int8 R "
          f"{variant.compression_ratio:.2f}, quality {variant.quality:.3f}")
    assert variant.compression_ratio > 1.5 and variant.quality >= ACCURACY - 0.05

    inference = inference_pb2_grpc.InferenceStub(p.gateway.channel)
    deployment = inference.Deploy(inference_pb2.DeployRequest(version=variant.version), metadata=p.md())
    assert deployment.state == inference_pb2.DEPLOYMENT_STATE_READY, deployment.message
    rows = p.arrays["images"][:8]
    response = inference.Predict(inference_pb2.PredictRequest(version=variant.version, inputs=[common_pb2.Tensor(
        name="images", dtype=common_pb2.DTYPE_FP32, shape=rows.shape, raw=rows.tobytes())]), metadata=p.md())
    (out,) = response.outputs
    answered = np.frombuffer(out.raw, dtype=np.float32).reshape(tuple(out.shape))
    blob = p.registry().download_bytes(variant.version)[1]
    expected = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"images": rows})[0]
    np.testing.assert_allclose(answered, expected, rtol=1e-4, atol=1e-4)


def test_ddp_world_size_2_in_bf16_runs_in_the_sandbox(packages):
    p = packages
    job = ended(p, submit(p, package_spec(p, "resnet-ddp", epochs=2, world_size=2,
                                          precision=training_pb2.PRECISION_BF16)).id)
    assert job.state == State.JOB_STATE_SUCCEEDED, job.message
    print(f"\nfigures: ddp2 bf16 eta {job.distributed_efficiency:.2f}, val_accuracy {job.metrics['val_accuracy']:.3f}")
    assert job.distributed_efficiency > 0 and job.scaling_efficiency == pytest.approx(job.distributed_efficiency / 2)
    assert job.spec.world_size == 2 and job.spec.precision == training_pb2.PRECISION_BF16
    assert job.metrics["val_accuracy"] > 0.2  # two bf16 epochs learn something (chance: 0.1)


def sandboxed_processes() -> list[int]:
    """Processes running the sandbox's runtime (inside any sandbox on this machine)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"margin.worker.package_runtime" in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_sigkill_of_the_worker_takes_its_sandbox_down_and_the_next_attempt_resumes_from_the_checkpoint(packages):
    p = packages
    stub, md = p.jobs.stub()
    job = submit(p, package_spec(p, "resnet-resumed", epochs=10))  # epochs left to kill it in, however fast
    wait_for(lambda: stub.GetJob(training_pb2.GetJobRequest(id=job.id), metadata=md).checkpoint.epoch >= 2, 180, 0.2)
    (child,) = p.jobs.worker_children(p.jobs.workers[0])
    assert sandboxed_processes()
    os.kill(child, signal.SIGKILL)  # the pool process running the attempt: its sandbox must die with it
    killed_at = stub.GetJob(training_pb2.GetJobRequest(id=job.id), metadata=md)
    done = ended(p, job.id)
    assert done.state == State.JOB_STATE_SUCCEEDED, done.message
    assert done.attempts == 2 and done.cost.total.micros == sum(a.total.micros for a in done.attempt_costs)
    assert done.cost.total.micros == sum(row.micros for row in p.jobs.ledger(job.id))
    events = list(stub.WatchJob(training_pb2.WatchJobRequest(id=job.id), metadata=md))
    resumed = [e.step for e in events if e.attempt == 2 and e.step > 0]
    print(f"\nfigures: killed at checkpoint step {killed_at.checkpoint.step}, attempt 2 resumed at step "
          f"{min(resumed, default=0)}, costs {[a.total.micros for a in done.attempt_costs]}")
    assert resumed and min(resumed) > killed_at.checkpoint.step > 0
    assert wait_for(lambda: not sandboxed_processes(), 30)  # no sandbox outlived its attempt


def test_cancel_ends_a_package_job_cancelled_with_a_checkpoint(packages):
    p = packages
    stub, md = p.jobs.stub()
    job = submit(p, package_spec(p, "resnet-cancel", epochs=500))
    wait_for(lambda: stub.GetJob(training_pb2.GetJobRequest(id=job.id), metadata=md).epoch >= 1, 180, 0.2)
    stub.CancelJob(training_pb2.CancelJobRequest(id=job.id), metadata=md)
    done = ended(p, job.id)
    print(f"\nfigures: cancelled at checkpoint epoch {done.checkpoint.epoch}: {done.message}")
    assert done.state == State.JOB_STATE_CANCELLED, done.message
    assert done.checkpoint.epoch >= 1 and "checkpoint" in done.message
    assert 0 < done.cost.total.micros == sum(row.micros for row in p.jobs.ledger(job.id))


def test_a_budget_that_runs_out_stops_a_package_job_with_spend_at_or_under_it(packages):
    p = packages
    stub, md = p.jobs.stub()
    # a config with no history yet, 4x the compute of width 16: its first guess's low end (a tenth of the expected
    # time at 300 samples/s) is well under what the run takes here (about 800 samples/s)
    spec = package_spec(p, "resnet-budget", epochs=20, config={"width": 32})
    estimate = stub.EstimateCost(training_pb2.EstimateCostRequest(spec=spec), metadata=md)
    assert estimate.basis.startswith("first guess (no history for package resnet-code"), estimate.basis
    budget = estimate.cost.low.micros + 40  # the first guess's low end is a tenth of its expected time
    assert budget < estimate.cost.expected.micros
    done = ended(p, submit(p, spec, budget_micros=budget).id)
    print(f"\nfigures: budget {budget}, spent {done.cost.total.micros}: {done.message}")
    assert done.state == State.JOB_STATE_BUDGET_EXCEEDED, done.message
    assert 0 < done.cost.total.micros <= budget
    assert f"of {budget} micros" in done.message
