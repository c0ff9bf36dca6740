"""Hostile model packages, through the real worker and a real bubblewrap sandbox.

Each package below tries one thing a tenant's code must not do — reach the network, read the worker's files or
another tenant's artifacts or the worker's environment, write outside its directory, fork or allocate without
bound, never return, import what is not there, trick the worker into uploading a file it cannot see — and each
attempt must end the job FAILED with a message naming what it hit, billed its device time (one attempt, on the
ledger), with nothing outside the sandbox touched. The same worker then trains an honest package. A package that
does not parse is refused at upload.
"""
from __future__ import annotations

import io
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from margin.v1 import common_pb2, registry_pb2, training_pb2
from sklearn.datasets import load_digits

from tests.integration.inference_stack import code_of
from tests.integration.training_stack import TrainingStack, training_stack, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (make setup)")]
State = common_pb2.JobState
ENDED = {State.JOB_STATE_SUCCEEDED, State.JOB_STATE_FAILED, State.JOB_STATE_BUDGET_EXCEEDED,
         State.JOB_STATE_CANCELLED}
HONEST = """
import torch
from torch import nn

def build_model(hidden=32):
{body}
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
"""


@dataclass
class Stack:
    jobs: TrainingStack
    dataset: common_pb2.VersionRef
    secret: Path

    @property
    def home(self) -> Path:
        return self.jobs.home


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    home = tmp_path_factory.mktemp("sandbox")
    secret = home / "worker-only-secret.txt"
    secret.write_text("the worker's secret\n")
    secret.chmod(0o600)
    with training_stack(home) as jobs:
        digits = load_digits()
        buffer = io.BytesIO()
        np.savez(buffer, x=(digits.data / 16).astype(np.float32), y=digits.target.astype(np.int64))
        client = jobs.cluster.client("acme")
        client.ensure_model("digits-data")
        data = client.upload_bytes(buffer.getvalue(), registry_pb2.UploadMetadata(
            model="digits-data", format=registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ))
        yield Stack(jobs, common_pb2.VersionRef(model=data.model, number=data.number), secret)


def package(body: str = "    pass", extra: str = "") -> bytes:
    return (HONEST.format(body=textwrap.indent(textwrap.dedent(body).strip(), "    ")) + extra).encode()


def upload(stack: Stack, name: str, source: bytes) -> common_pb2.VersionRef:
    client = stack.jobs.cluster.client("acme")
    client.ensure_model(name)
    v = client.upload_bytes(source, registry_pb2.UploadMetadata(model=name,
                                                                format=registry_pb2.ARTIFACT_FORMAT_MODEL_PACKAGE))
    return common_pb2.VersionRef(model=v.model, number=v.number)


def train(stack: Stack, name: str, source: bytes, **fields) -> training_pb2.TrainingJob:
    ref = upload(stack, f"{name}-code", source)
    stub, md = stack.jobs.stub()
    spec = training_pb2.TrainingSpec(model=name, package=ref, epochs=fields.pop("epochs", 2), batch_size=64,
                                     dataset=common_pb2.DatasetRef(registry=stack.dataset), **fields)
    job = stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec), metadata=md)
    return wait_for(lambda: (j := stub.GetJob(training_pb2.GetJobRequest(id=job.id), metadata=md)).state in ENDED
                    and j, 180, interval=0.2)


def hostile_cases(stack: Stack) -> dict[str, tuple[bytes, dict, list[str]]]:
    """name -> (package source, spec fields, fragments the FAILED message must contain)."""
    redis_port = stack.jobs.redis.spec.address.rsplit(":", 1)[1]
    artifacts = stack.home / "artifacts"
    checkpoints = stack.home / "checkpoints"
    return {
        "socket": (package(f"""
            import socket
            socket.create_connection(("127.0.0.1", {redis_port}), timeout=5)
            """), {}, ["ConnectionRefusedError", "build_model"]),
        "internet": (package("""
            import socket
            socket.create_connection(("1.1.1.1", 443), timeout=5)
            """), {}, ["Network is unreachable"]),
        "etc-passwd": (package("open('/etc/passwd').read()"), {}, ["No such file or directory: '/etc/passwd'"]),
        "other-tenants-artifacts": (package(f"import os; os.listdir({str(artifacts)!r})"), {},
                                    ["FileNotFoundError", str(artifacts)]),
        "worker-environment": (package("""
            import glob, os
            seen = {k for k in os.environ if k.startswith(("MARGIN", "DATABASE", "REDIS"))}
            for path in glob.glob("/proc/*/environ"):
                try:
                    seen |= {e.split(b"=")[0].decode() for e in open(path, "rb").read().split(b"\\0")
                             if e.startswith((b"MARGIN", b"DATABASE", b"REDIS"))}
                except OSError:
                    pass
            raise RuntimeError(f"credentials seen: {sorted(seen)}; processes: {len(glob.glob('/proc/[0-9]*'))}")
            """), {}, ["credentials seen: []"]),
        "write-outside": (package(f"""
            refused = []
            for path in ({str(checkpoints / 'planted')!r}, "/job/in/planted", "/usr/planted", "/planted"):
                try:
                    open(path, "w").write("x")
                except OSError as err:
                    refused.append(type(err).__name__)
                else:
                    raise RuntimeError("wrote " + path)
            raise RuntimeError(f"writes refused: {{refused}}")
            """), {}, ["writes refused: [", "'OSError'"]),
        "fork-bomb": (package("""
            import os
            while True:
                os.fork()
            """), {}, ["BlockingIOError", "processes limit"]),
        "memory": (package("bytearray(64 << 30)"), {}, ["MemoryError", "memory limit"]),
        "infinite-loop": (package("""
            while True:
                pass
            """), {"max_seconds": 10}, ["time limit of 10 s", "without returning to Margin's loop"]),
        "missing-module": (b"import margin_no_such_module\n" + package(), {},
                           ["ModuleNotFoundError: No module named 'margin_no_such_module'", "in importing model"]),
        "symlinked-weights": (package(extra=f"""

def example_inputs(batch_size):
    import os
    os.remove("/job/out/weights.safetensors")
    os.symlink({str(stack.secret)!r}, "/job/out/weights.safetensors")
    return torch.zeros(batch_size, 64)
"""), {}, ["weights.safetensors as something other than a regular file"]),
    }


CASES = ["socket", "internet", "etc-passwd", "other-tenants-artifacts", "worker-environment", "write-outside",
         "fork-bomb", "memory", "infinite-loop", "missing-module", "symlinked-weights"]


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_package_is_contained_and_fails_with_what_it_hit_billed_its_device_time(stack, case):
    source, fields, fragments = hostile_cases(stack)[case]
    job = train(stack, f"hostile-{case}", source, **fields)
    print(f"\nfigures: {case}: {common_pb2.JobState.Name(job.state)}, {job.cost.total.micros} micros: {job.message}")
    assert job.state == State.JOB_STATE_FAILED, (job.state, job.message)
    for fragment in fragments:
        assert fragment in job.message, job.message
    assert stack.jobs.cluster.admin_key not in job.message
    assert job.attempts == 1 and not job.HasField("result_version")
    assert 0 < job.cost.total.micros == sum(row.micros for row in stack.jobs.ledger(job.id))
    wall = job.end_time.ToDatetime() - job.start_time.ToDatetime()
    price_per_second = job.cost.total.micros / job.cost.device_hours / 3600
    # its own device time, nothing more (the attempt's clock starts just before it takes the lease)
    assert job.cost.device_hours * 3600 <= wall.total_seconds() + 5
    assert price_per_second > 0
    assert not (stack.home / "checkpoints" / "planted").exists()


def test_a_package_that_does_not_parse_is_refused_at_upload_and_nothing_is_stored(stack):
    client = stack.jobs.cluster.client("acme")
    client.ensure_model("broken-code")
    code, message = code_of(lambda: client.upload_bytes(b"def build_model(:\n    pass\n", registry_pb2.UploadMetadata(
        model="broken-code", format=registry_pb2.ARTIFACT_FORMAT_MODEL_PACKAGE)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "model.py line 1" in message
    assert stack.jobs.versions("broken-code") == []


def test_the_same_worker_trains_an_honest_package_after_the_hostile_ones(stack):
    worker = stack.jobs.workers[0]
    pid = worker.proc.pid
    job = train(stack, "honest", package(), epochs=5, learning_rate=0.01)
    assert job.state == State.JOB_STATE_SUCCEEDED, job.message
    assert job.metrics["val_accuracy"] >= 0.85
    assert worker.proc.pid == pid and worker.proc.poll() is None
    assert stack.secret.read_text() == "the worker's secret\n"
    leftovers = list((stack.home / "sandbox").glob("*")) if (stack.home / "sandbox").exists() else []
    assert leftovers == []  # every attempt's private directories were removed


def test_layers_to_freeze_that_the_model_lacks_fail_before_the_first_step_naming_its_parameters(stack):
    job = train(stack, "freeze-typo", package(), freeze_layers=["encoder"])
    assert job.state == State.JOB_STATE_FAILED, job.message
    assert "freeze_layers: 'encoder' matches no parameter" in job.message and "'0.weight'" in job.message
    assert job.step == 0 and job.attempts == 1
