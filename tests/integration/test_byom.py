"""Bring your own model, end to end: two models Margin never built — a transformer text classifier over INT64
token ids and a ResNet-style CNN with BatchNorm — are built and trained here, exported to ONNX, uploaded with a
dataset of their own shape, and compressed by AutoCompress (floor ``agreement ≥ 0.99``) through the real worker.
What the job reports is checked against the registry's files: the chosen variant is the cheapest meeting the floor,
R is the ratio of the downloaded files, quality recomputed here from the downloaded artifacts matches the report,
and the chosen variant, deployed on a real tritonserver, answers through the gateway as onnxruntime does here.
Bad input — random bytes as ONNX, a signature the graph contradicts, a dataset that does not feed the model, a floor
the dataset cannot give — is INVALID_ARGUMENT at upload or submit, with nothing queued or billed."""
from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
import torch
from margin.common.protoconv import signature_from_proto, signature_to_proto
from margin.common.tensors import Signature, TensorSpec
from margin.modelzoo.datasets import holdout
from margin.v1 import common_pb2, compression_pb2, inference_pb2, inference_pb2_grpc, registry_pb2
from typer.testing import CliRunner, Result

from tests.byom_models import (
    ONNX_EXPORT_WARNINGS,
    dataset_npz,
    export_onnx,
    image_data,
    text_data,
    trained_resnet_cnn,
    trained_text_classifier,
)
from tests.integration.inference_stack import Gateway, code_of, gateway_on
from tests.integration.training_stack import TrainingStack, training_stack, wait_for

pytestmark = [pytest.mark.slow, *ONNX_EXPORT_WARNINGS,
              pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")]
State = common_pb2.JobState
FLOOR = 0.99
ENDED = {State.Value(n) for n in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_BUDGET_EXCEEDED",
                                  "JOB_STATE_CANCELLED")}


@dataclass
class Byom:
    jobs: TrainingStack
    gateway: Gateway

    def registry(self, tenant: str = "acme"):
        return self.jobs.cluster.client(tenant)

    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.gateway.channel)

    def md(self, tenant: str = "acme") -> tuple:
        return (("authorization", f"Bearer {self.jobs.cluster.keys[tenant]}"),)


@dataclass(frozen=True)
class Uploaded:
    """A team's model as uploaded: the ONNX file, its version, and its dataset's version and arrays."""
    model: str
    onnx: bytes
    number: int
    dataset: common_pb2.VersionRef
    inputs: dict[str, np.ndarray]
    labels: np.ndarray


@pytest.fixture(scope="module")
def byom(tmp_path_factory) -> Byom:
    home = tmp_path_factory.mktemp("byom")
    with training_stack(home) as jobs, \
            gateway_on(jobs.cluster, home, jobs.worker_env["MARGIN_REDIS_URL"]) as gateway:
        yield Byom(jobs, gateway)


def upload(byom: Byom, model: str, module: torch.nn.Module, inputs: dict[str, np.ndarray], labels: np.ndarray,
           **dataset_arrays: np.ndarray) -> Uploaded:
    """Export ``module`` to ONNX and upload it (no signature: the registry reads the graph's) with a dataset of
    ``inputs`` and labels ``y`` (or ``dataset_arrays`` instead)."""
    (name, x), = inputs.items()
    blob = export_onnx(module, torch.from_numpy(x[:2]), name)
    client = byom.registry()
    client.ensure_model(model)
    number = client.upload_bytes(blob, registry_pb2.UploadMetadata(
        model=model, format=registry_pb2.ARTIFACT_FORMAT_ONNX)).number
    client.ensure_model(f"{model}-data")
    data = client.upload_bytes(dataset_npz(dataset_arrays or {**inputs, "y": labels}), registry_pb2.UploadMetadata(
        model=f"{model}-data", format=registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ))
    return Uploaded(model, blob, number, common_pb2.VersionRef(model=data.model, number=data.number), inputs, labels)


@pytest.fixture(scope="module")
def text(byom) -> Uploaded:
    ids, y = text_data(600, seed=1)  # rows the model was not trained on
    return upload(byom, "team-text", trained_text_classifier(seed=0), {"input_ids": ids}, y)


@pytest.fixture(scope="module")
def images(byom) -> Uploaded:
    x, y = image_data()
    return upload(byom, "team-cnn", trained_resnet_cnn(seed=0), {"images": x[-600:]}, y[-600:])


def auto(source: Uploaded, metric: str = "agreement", minimum: float = FLOOR,
         dataset: common_pb2.VersionRef | None = None, **fields) -> compression_pb2.AutoCompressRequest:
    return compression_pb2.AutoCompressRequest(
        source=common_pb2.VersionRef(model=source.model, number=source.number),
        floor=common_pb2.QualityFloor(metric=metric, minimum=minimum),
        eval_dataset=common_pb2.DatasetRef(registry=dataset or source.dataset), **fields)


def finished(byom: Byom, job_id: str) -> compression_pb2.CompressionJob:
    stub, md = byom.jobs.compression_stub()
    return wait_for(lambda: (j := stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=job_id),
                                                         metadata=md)).state in ENDED and j, 300)


def session(blob: bytes) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])


def held_out(source: Uploaded) -> dict[str, np.ndarray]:
    """The rows the worker scores on: the job's split of the dataset (20 % held out, seed 0)."""
    (name, x), = source.inputs.items()
    _, rows = holdout(len(x), validation_fraction=0.2, seed=0)
    return {name: x[rows]}


def argmax(blob: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's argmax over ``feeds`` run in batches of 32 rows, as the worker scores: a dynamically quantized
    model scales its activations per batch, so its answer for a row depends on the rows it is batched with."""
    run = session(blob)
    (name, x), = feeds.items()
    return np.concatenate([run.run(None, {name: x[i:i + 32]})[0].argmax(-1) for i in range(0, len(x), 32)])


def agreement(variant: bytes, source: bytes, feeds: dict[str, np.ndarray]) -> float:
    return float(np.mean(argmax(variant, feeds) == argmax(source, feeds)))


@pytest.mark.parametrize("which", ["text", "images"])
def test_auto_compress_of_a_teams_onnx_model_reports_what_its_files_show_and_the_choice_serves(byom, which, request):
    source: Uploaded = request.getfixturevalue(which)
    version = byom.registry().stub.GetVersion(registry_pb2.GetVersionRequest(
        version=common_pb2.VersionRef(model=source.model, number=source.number)), metadata=byom.registry().metadata)
    (name, x), = source.inputs.items()
    assert signature_from_proto(version.signature).inputs == (TensorSpec(name, x.dtype.name.upper().replace(
        "FLOAT", "FP"), (-1, *x.shape[1:])),)

    stub, md = byom.jobs.compression_stub()
    job = finished(byom, stub.AutoCompress(auto(source), metadata=md).id)
    assert job.state == State.JOB_STATE_SUCCEEDED, job.outcome
    assert len(job.variants) == 5 and job.baseline.quality == 1.0
    meeting = [i for i, v in enumerate(job.variants) if v.quality >= FLOOR]
    assert [v.meets_floor for v in job.variants] == [i in meeting for i in range(len(job.variants))]
    assert job.chosen == min(meeting, key=lambda i: job.variants[i].cost_per_million.micros)

    client = byom.registry()
    feeds = held_out(source)
    for v in job.variants:
        meta, blob = client.download_bytes(v.version)
        assert meta.format == registry_pb2.ARTIFACT_FORMAT_ONNX
        assert (meta.parent.model, meta.parent.number) == (source.model, source.number)
        assert signature_from_proto(meta.signature) == signature_from_proto(version.signature)
        assert v.size_bytes == len(blob) and v.compression_ratio == pytest.approx(len(source.onnx) / len(blob))
        assert v.quality == pytest.approx(agreement(blob, source.onnx, feeds), abs=1e-9), v.recipe.name
    int8 = [v for v in job.variants if v.recipe.name.startswith("ort-int8")]
    assert all(v.compression_ratio > 2 for v in int8), [(v.recipe.name, v.compression_ratio) for v in int8]

    chosen = job.variants[job.chosen]
    deployment = byom.inference().Deploy(inference_pb2.DeployRequest(version=chosen.version), metadata=byom.md())
    assert deployment.state == inference_pb2.DEPLOYMENT_STATE_READY, deployment.message
    rows = feeds[name][:8]
    response = byom.inference().Predict(inference_pb2.PredictRequest(version=chosen.version, inputs=[
        common_pb2.Tensor(name=name, dtype=common_pb2.DTYPE_INT64 if rows.dtype == np.int64 else common_pb2.DTYPE_FP32,
                          shape=rows.shape, raw=rows.tobytes())]), metadata=byom.md())
    (out,) = response.outputs
    answered = np.frombuffer(out.raw, dtype=np.float32).reshape(tuple(out.shape))
    expected = session(client.download_bytes(chosen.version)[1]).run(None, {name: rows})[0]
    np.testing.assert_allclose(answered, expected, rtol=1e-5, atol=1e-5)


def test_random_bytes_as_onnx_and_a_signature_the_graph_contradicts_are_refused_at_upload(byom, text):
    client = byom.registry()
    versions = len(byom.jobs.versions(text.model))
    upload_as = registry_pb2.UploadMetadata(model=text.model, format=registry_pb2.ARTIFACT_FORMAT_ONNX)
    status, message = code_of(lambda: client.upload_bytes(np.random.default_rng(0).bytes(5000), upload_as))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "ONNX" in message
    wrong = Signature((TensorSpec("input_ids", "FP32", (-1, 32)),), (TensorSpec("logits", "FP32", (-1, 4)),))
    upload_as.signature.CopyFrom(signature_to_proto(wrong))
    status, message = code_of(lambda: client.upload_bytes(text.onnx, upload_as))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "input_ids" in message and "INT64" in message
    assert len(byom.jobs.versions(text.model)) == versions


def jobs_of(byom: Byom) -> int:
    stub, md = byom.jobs.compression_stub()
    return len(stub.ListCompressionJobs(compression_pb2.ListCompressionJobsRequest(page_size=100), metadata=md).jobs)


def test_a_dataset_the_model_cannot_use_or_a_floor_it_cannot_give_is_refused_at_submit(byom, text):
    client = byom.registry()
    ids = text.inputs["input_ids"]
    bad = {"renamed": {"tokens": ids}, "dtype": {"input_ids": ids.astype(np.int32)},
           "shape": {"input_ids": ids[:, :16]}, "unlabelled": {"input_ids": ids}}
    refs = {}
    for what, arrays in bad.items():
        v = client.upload_bytes(dataset_npz(arrays), registry_pb2.UploadMetadata(
            model=f"{text.model}-data", format=registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ))
        refs[what] = common_pb2.VersionRef(model=v.model, number=v.number)
    stub, md = byom.jobs.compression_stub()
    before = jobs_of(byom)
    cases = [(auto(text, dataset=refs["renamed"]), "input_ids"), (auto(text, dataset=refs["dtype"]), "INT64"),
             (auto(text, dataset=refs["shape"]), "32"), (auto(text, "accuracy", 0.9, refs["unlabelled"]), "labels"),
             (auto(text, "accuracy", 0.9, common_pb2.VersionRef(model=text.model, number=text.number)),
              "not dataset-npz")]
    for request, fragment in cases:
        for call in (stub.AutoCompress, lambda r, metadata: stub.EstimateCompression(
                compression_pb2.EstimateCompressionRequest(auto=r), metadata=metadata)):
            status, message = code_of(lambda c=call, r=request: c(r, metadata=md))
            assert status == grpc.StatusCode.INVALID_ARGUMENT and fragment in message, message
    assert jobs_of(byom) == before


def test_what_onnx_compression_cannot_do_is_refused_saying_what_to_do_instead(byom, text):
    stub, md = byom.jobs.compression_stub()
    fp16 = compression_pb2.Recipe(name="half", steps=[compression_pb2.CompressionStep(
        quantize=compression_pb2.QuantizeStep(scheme="fp16"))])
    status, message = code_of(lambda: stub.AutoCompress(auto(text, candidates=[fp16]), metadata=md))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "GPU device classes" in message
    status, message = code_of(lambda: stub.AutoCompress(
        compression_pb2.AutoCompressRequest(source=common_pb2.VersionRef(model=text.model, number=text.number),
                                            floor=common_pb2.QualityFloor(metric="agreement", minimum=0.9)),
        metadata=md))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "scored on your own data" in message
    status, message = code_of(lambda: stub.AutoCompress(auto(text, "perplexity", 0.1), metadata=md))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "quality_metric" in message
    scripted = torch.jit.script(torch.nn.Linear(4, 2))
    client = byom.registry()
    client.ensure_model("team-scripted")
    path = byom.jobs.home / "scripted.pt"
    scripted.save(str(path))
    number = client.upload_file(path, registry_pb2.UploadMetadata(
        model="team-scripted", format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, signature=signature_to_proto(
            Signature((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 2)),))))).number
    request = auto(text)
    request.source.CopyFrom(common_pb2.VersionRef(model="team-scripted", number=number))
    status, message = code_of(lambda: stub.AutoCompress(request, metadata=md))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "torch.onnx.export" in message


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```bash block after ``heading`` in the README, as written."""
    section = README.read_text(encoding="utf-8").split(heading, 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def margin_commands(lines: str) -> list[list[str]]:
    """The arguments of each ``.venv/bin/margin`` command in ``lines``, as a shell splits them (comments dropped)."""
    return [shlex.split(line, comments=True)[1:] for line in lines.splitlines() if line.startswith(".venv/bin/margin ")]


def readme_walkthrough() -> tuple[str, list[list[str]]]:
    """The README's "Bring your own model" block: the Python it runs to export a model and a dataset, and the
    arguments of each ``margin`` command after it, as written."""
    script, commands = readme_block("### Bring your own model").split("<<'EOF'", 1)[1].split("\nEOF\n", 1)
    return script, margin_commands(commands)


def service_options(jobs: TrainingStack, gateway: Gateway) -> dict[str, list[str]]:
    """The service addresses a README command takes, by its command (``compress auto``) or else its group."""
    registry = ["--registry", jobs.cluster.registry.server.address]
    compression = ["--compression", jobs.compression.server.address]
    served = ["--inference", gateway.inference.server.address]
    training = ["--training", jobs.training.server.address]
    return {"versions": registry, "models": registry, "train": training, "jobs": training, "compress": compression,
            "compress auto": [*compression, *registry], "deploy": served, "predict": served}


def run_margin(args: list[str], options: dict[str, list[str]], api_key: str) -> Result:
    """``margin *args`` in-process, as the README writes it, with the addresses of ``options`` and the tenant's key;
    asserts it exits 0 with nothing but SystemExit escaping."""
    from margin.cli.main import app

    where = options.get(shlex.join(args[:2]), options[args[0]])
    result = CliRunner().invoke(app, [*args, *where, "--api-key", api_key])
    shown = f"margin {shlex.join(args)} -> exit {result.exit_code}\n{result.output}"
    assert result.exit_code == 0, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    return result


def test_the_readmes_bring_your_own_model_commands_work_as_written(byom, tmp_path, monkeypatch):
    script, commands = readme_walkthrough()
    assert [c[:2] for c in commands] == [["versions", "upload"], ["versions", "upload"], ["compress", "auto"],
                                         ["deploy", "my-classifier@cheapest"], ["predict", "my-classifier@cheapest"]]
    subprocess.run([sys.executable, "-"], input=script, text=True, check=True, cwd=tmp_path, timeout=300)
    monkeypatch.chdir(tmp_path)
    options = service_options(byom.jobs, byom.gateway)
    for args in commands:
        result = run_margin(args, options, byom.jobs.cluster.keys["acme"])
    assert "logits" in result.output
    chosen = byom.registry().stub.GetModel(registry_pb2.GetModelRequest(name="my-classifier"),
                                           metadata=byom.registry().metadata).aliases["cheapest"]
    assert chosen > 1  # a variant, registered under the source


def test_another_tenants_dataset_is_not_found_and_nothing_is_queued(byom, text):
    """A tenant naming another tenant's dataset version as its evaluation data gets NOT_FOUND, as for any other of
    its objects, even with a model of its own that the dataset would fit."""
    client = byom.registry("other")
    client.ensure_model("their-text")
    own = client.upload_bytes(text.onnx, registry_pb2.UploadMetadata(model="their-text",
                                                                       format=registry_pb2.ARTIFACT_FORMAT_ONNX))
    stub, md = byom.jobs.compression_stub("other")
    request = auto(text)
    request.source.CopyFrom(common_pb2.VersionRef(model="their-text", number=own.number))
    status, message = code_of(lambda: stub.AutoCompress(request, metadata=md))
    assert status == grpc.StatusCode.NOT_FOUND and text.dataset.model in message, message
    assert not stub.ListCompressionJobs(compression_pb2.ListCompressionJobsRequest(), metadata=md).jobs
