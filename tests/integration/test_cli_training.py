"""``margin train`` and ``margin jobs`` against a real training stack (redis-server, budget, registry, training
service and a Celery worker process), invoked in-process with typer's CliRunner. The tests run in file order and
build on each other: the job submitted with --watch is the one listed and shown."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from margin.v1 import common_pb2, training_pb2
from training_stack import TrainingStack, training_stack, wait_for
from typer.testing import CliRunner, Result

pytestmark = pytest.mark.slow
JOB_ID = re.compile(r"job-[0-9a-f]+")
runner = CliRunner()
seen: dict[str, str] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingStack]:
    with training_stack(Path(tmp_path_factory.mktemp("cli_training"))) as s:
        yield s


def margin(stack: TrainingStack, *args: str, code: int = 0) -> Result:
    return stack.cli("--training", stack.training.server.address, *args, code=code)


def test_estimate_prints_a_cost(stack: TrainingStack) -> None:
    out = margin(stack, "train", "estimate", "--model", "digits", "--family", "cnn", "--epochs", "2").output
    assert re.search(r"expected cost\W+\$0\.\d+", out), out
    for line in ("range", "device-hours", "kWh", "price per device-hour", "basis"):
        assert line in out, out


def test_submit_and_watch_a_small_cnn(stack: TrainingStack) -> None:
    out = margin(stack, "train", "submit", "--model", "digits", "--family", "cnn", "--arch", '{"channels": [8]}',
                 "--epochs", "2", "--lr", "0.005", "--budget", "0.01", "--watch").output
    assert "expected cost" in out and "epoch 2/2" in out, out
    assert "SUCCEEDED" in out and "validation accuracy" in out and "× the estimate" in out, out
    version = re.search(r"registered version (digits:\d+)", out)
    assert version, out
    seen["job"], seen["version"] = JOB_ID.search(out)[0], version[1]


def test_jobs_list_shows_the_job(stack: TrainingStack) -> None:
    out = margin(stack, "jobs", "list").output
    assert seen["job"] in out and "SUCCEEDED" in out and seen["version"] in out and "2/2" in out, out
    assert seen["job"] in margin(stack, "jobs", "list", "--state", "succeeded", "--limit", "5").output
    assert seen["job"] not in margin(stack, "jobs", "list", "--state", "running").output


def test_jobs_show_has_estimate_and_actual_cost(stack: TrainingStack) -> None:
    out = margin(stack, "jobs", "show", seen["job"]).output
    assert seen["job"] in out and "SUCCEEDED" in out and seen["version"] in out, out
    for line in ("estimate", "actual cost", "attempt 1", "checkpoint", "val_accuracy", "budget"):
        assert line in out, out


def test_cancel_a_running_job(stack: TrainingStack) -> None:
    out = margin(stack, "train", "submit", "--model", "digits-long", "--family", "mlp", "--epochs", "400").output
    job_id = JOB_ID.search(out)[0]
    stub, md = stack.stub()
    wait_for(lambda: stub.GetJob(training_pb2.GetJobRequest(id=job_id), metadata=md).epoch >= 1, timeout=30)
    assert "cancel requested" in margin(stack, "jobs", "cancel", job_id, "--reason", "enough").output
    out = margin(stack, "jobs", "watch", job_id, code=1).output
    assert "CANCELLED" in out and "enough" in out, out
    assert stub.GetJob(training_pb2.GetJobRequest(id=job_id), metadata=md).state == common_pb2.JOB_STATE_CANCELLED
    assert "FAILED_PRECONDITION" in margin(stack, "jobs", "cancel", job_id, code=1).output


def test_a_bad_spec_is_invalid_argument(stack: TrainingStack) -> None:
    out = margin(stack, "train", "submit", "--model", "digits", "--family", "transformer", code=1).output
    assert "INVALID_ARGUMENT" in out and "transformer" in out, out
    assert margin(stack, "train", "estimate", "--model", "digits", "--arch", "[1]", code=2).exit_code == 2


def test_a_budget_far_too_small_is_refused(stack: TrainingStack) -> None:
    out = margin(stack, "train", "submit", "--model", "digits", "--family", "cnn", "--epochs", "2",
                 "--budget", "0.000001", code=1).output
    assert "RESOURCE_EXHAUSTED" in out, out
    assert "submitted" not in out, out
