"""The README's "Train your own PyTorch code" block, run exactly as written against the real stack: the example's
dataset maker, then each ``margin`` command in-process (typer's CliRunner) against a real registry, training
service, Celery worker with its bubblewrap sandbox, compression service, tritonserver and inference gateway.

What the commands leave is checked through the services: both training jobs SUCCEEDED (the package job sent no
family, the fine-tuning job took its package and config from its base), each registered its weights and their
TorchScript and ONNX exports with the lineage the README describes, the int8 compression of the fine-tuned ONNX
export SUCCEEDED as the version the README deploys, and that deployment is READY.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from margin.common import protoconv
from margin.v1 import common_pb2, compression_pb2, inference_pb2, inference_pb2_grpc, registry_pb2, training_pb2

from tests.byom_models import ONNX_EXPORT_WARNINGS
from tests.integration.inference_stack import gateway_on
from tests.integration.test_byom import margin_commands, readme_block, run_margin, service_options
from tests.integration.training_stack import training_stack

pytestmark = [pytest.mark.slow, *ONNX_EXPORT_WARNINGS,
              pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (make setup)")]
HEADING = "#### Train your own PyTorch code"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FORMATS = {"safetensors": registry_pb2.ARTIFACT_FORMAT_SAFETENSORS,
           "torchscript": registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, "onnx": registry_pb2.ARTIFACT_FORMAT_ONNX}
SUCCEEDED = common_pb2.JOB_STATE_SUCCEEDED


def readme_steps() -> tuple[list[str], list[list[str]]]:
    """The block's one Python command (the dataset maker) and the arguments of each ``margin`` command after it;
    asserts the block holds nothing else, so every line of it is run."""
    block = readme_block(HEADING)
    lines = block.strip().splitlines()
    assert lines[0].startswith(".venv/bin/python "), lines[0]
    commands = margin_commands(block)
    assert len(commands) == len(lines) - 1, block
    return shlex.split(lines[0], comments=True), commands


def versions_of(client, model: str) -> dict[int, registry_pb2.ModelVersion]:
    reply = client.stub.ListVersions(registry_pb2.ListVersionsRequest(model=model), metadata=client.metadata)
    return {v.number: v for v in reply.versions}


def assert_trained_and_exported(client, model: str, parent: tuple[str, int]) -> None:
    """``model`` v1 is the trained weights (parent: ``parent``), v2 and v3 its TorchScript and ONNX exports."""
    versions = versions_of(client, model)
    assert [versions[n].format for n in (1, 2, 3)] == [FORMATS[f] for f in ("safetensors", "torchscript", "onnx")]
    assert (versions[1].parent.model, versions[1].parent.number) == parent
    assert all((versions[n].parent.model, versions[n].parent.number) == (model, 1) for n in (2, 3))


def test_the_readmes_train_your_own_code_commands_work_as_written(tmp_path, monkeypatch):
    python, commands = readme_steps()
    assert [c[:2] for c in commands] == [["versions", "upload"], ["models", "upload-package"], ["train", "submit"],
                                         ["train", "submit"], ["compress", "submit"], ["deploy", "resnet-tuned:4"]]
    work = tmp_path / "work"  # a stand-in for the clone: the README's relative paths resolve as there
    work.mkdir()
    (work / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    monkeypatch.chdir(work)
    subprocess.run([sys.executable, *python[1:]], check=True, cwd=work, timeout=300)
    with training_stack(tmp_path / "stack", max_upload=64 << 20) as jobs, \
            gateway_on(jobs.cluster, tmp_path / "stack", jobs.worker_env["MARGIN_REDIS_URL"]) as gateway:
        options, key = service_options(jobs, gateway), jobs.cluster.keys["acme"]
        outputs = [run_margin(args, options, key).output for args in commands]
        assert "registered version resnet:1; servable: resnet:2, resnet:3" in outputs[2], outputs[2]
        assert "registered version resnet-tuned:1; servable: resnet-tuned:2, resnet-tuned:3" in outputs[3], outputs[3]

        stub, md = jobs.stub()
        tuned, trained = stub.ListJobs(training_pb2.ListJobsRequest(), metadata=md).jobs  # newest first
        assert trained.state == tuned.state == SUCCEEDED, (trained.message, tuned.message)
        assert trained.spec.family == tuned.spec.family == ""
        assert (trained.spec.package.model, trained.spec.package.number) == ("resnet-code", 1)
        assert (tuned.spec.package.model, tuned.spec.package.number) == ("resnet-code", 1)  # from its base
        assert protoconv.from_struct(tuned.spec.config) == protoconv.from_struct(trained.spec.config) == {"width": 16}
        assert trained.metrics["val_accuracy"] > 0.5  # it learned (chance: 0.1)
        shown = run_margin(["jobs", "show", tuned.id], options, key).output
        assert "resnet-tuned (package resnet-code:1, fine-tuned from resnet:1)" in shown, shown
        assert 'config {"width": 16}' in shown and "resnet-tuned:1; servable: resnet-tuned:2, resnet-tuned:3" in shown

        client = jobs.cluster.client()
        assert_trained_and_exported(client, "resnet", ("resnet-code", 1))
        assert_trained_and_exported(client, "resnet-tuned", ("resnet", 1))

        compression, md = jobs.compression_stub()
        (job,) = compression.ListCompressionJobs(compression_pb2.ListCompressionJobsRequest(), metadata=md).jobs
        assert job.state == SUCCEEDED, job.outcome
        (variant,) = job.variants
        assert (variant.version.model, variant.version.number) == ("resnet-tuned", 4)
        assert versions_of(client, "resnet-tuned")[4].format == FORMATS["onnx"]

        inference = inference_pb2_grpc.InferenceStub(gateway.channel)
        auth = (("authorization", f"Bearer {key}"),)
        (deployment,) = inference.ListDeployments(inference_pb2.ListDeploymentsRequest(model="resnet-tuned"),
                                                  metadata=auth).deployments
        assert deployment.state == inference_pb2.DEPLOYMENT_STATE_READY, deployment.message
        assert (deployment.version.model, deployment.version.number) == ("resnet-tuned", 4)
