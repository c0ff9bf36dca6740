"""``margin compress`` against a real job stack (redis-server, budget, registry, training and compression services
and a Celery worker process), invoked in-process with typer's CliRunner. A digits MLP is trained first; the tests
run in file order and build on each other: the jobs submitted with --watch are the ones reported and listed."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from margin.v1 import common_pb2, compression_pb2
from training_stack import TrainingStack, train_digits_mlp, training_stack, wait_for
from typer.testing import CliRunner, Result

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]
JOB_ID = re.compile(r"cj-[0-9a-f]+")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INT8 = {"name": "int8", "steps": [{"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]}
WEIGHT_ONLY = {"name": "int8-wo", "steps": [{"quantize": {"scheme": "weight_only_int8"}}]}
runner = CliRunner()
seen: dict[str, str] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingStack]:
    with training_stack(Path(tmp_path_factory.mktemp("cli_compression"))) as s:
        train_digits_mlp(s)
        yield s


def margin(stack: TrainingStack, *args: str, code: int = 0) -> Result:
    return stack.cli("--compression", stack.compression.server.address, *args, code=code)


def assert_png(path: Path) -> None:
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = image.imread(path).shape[:2]
    assert height > 100 and width > 100


def test_submit_a_recipe_and_watch_it(stack: TrainingStack, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = margin(stack, "compress", "submit", "digits:1", "--recipe", json.dumps(INT8), "--budget", "0.05",
                 "--watch").output
    job_id = JOB_ID.search(out)[0]
    assert f"submitted {job_id}" in out and "variant 1/1" in out, out
    assert f"{job_id} SUCCEEDED — source digits:1" in out and "job cost $" in out, out
    assert re.search(r"\bR\s+params\b", out) and "$/1M" in out and "break-even" in out, out
    assert re.search(r"1\s+int8\s+digits:2\s+[\d.]+ KiB\s+\d+\.\d\d×", out) and "★ chosen" in out, out
    assert re.search(r"\$0\.\d+\s+\$0\.\d+\s+([\d,]+|never)\s+★ chosen", out), out
    assert_png(tmp_path / f"compression-{job_id}.png")
    assert f"compression-{job_id}.png" in out, out
    seen["submit"] = job_id


def test_auto_compress_chooses_a_variant_and_plots_the_front(stack: TrainingStack, tmp_path: Path) -> None:
    png = tmp_path / "front.png"
    out = margin(stack, "compress", "auto", "digits:1", "--floor", "accuracy>=0.9", "--objective", "cost",
                 "--candidates", json.dumps([INT8, WEIGHT_ONLY]), "--watch", "--png", str(png)).output
    job_id = JOB_ID.search(out)[0]
    assert "variant 2/2" in out and f"{job_id} SUCCEEDED" in out and "chose" in out, out
    assert "int8-wo" in out and "floor accuracy ≥ 0.9" in out and "≥ floor" in out and "pareto" in out, out
    assert out.count("★ chosen") == 1, out
    assert str(png) in out.replace("\n", ""), out
    assert_png(png)
    seen["auto"] = job_id


def test_report_and_watch_reproduce_the_table_and_list_shows_both_jobs(stack: TrainingStack, tmp_path: Path) -> None:
    png = tmp_path / "again.png"
    out = margin(stack, "compress", "report", seen["auto"], "--png", str(png)).output
    assert f"{seen['auto']} SUCCEEDED" in out and "int8-wo" in out and "★ chosen" in out, out
    assert_png(png)
    watched = margin(stack, "compress", "watch", seen["auto"], "--png", str(tmp_path / "watched.png")).output
    assert "variant 2/2" in watched and "★ chosen" in watched, watched
    listed = margin(stack, "compress", "list").output
    assert seen["submit"] in listed and seen["auto"] in listed and "recipe int8" in listed, listed
    assert "auto accuracy ≥ 0.9" in listed, listed
    assert seen["auto"] in margin(stack, "compress", "list", "--state", "succeeded", "--limit", "5").output
    assert seen["auto"] not in margin(stack, "compress", "list", "--state", "running").output


def test_bad_recipes_and_options_are_refused(stack: TrainingStack) -> None:
    bad = {"name": "bad", "steps": [{"prune": {"kind": "KIND_UNSTRUCTURED", "amount": 1.5}}]}
    out = margin(stack, "compress", "submit", "digits:1", "--recipe", json.dumps(bad), code=1).output
    assert "INVALID_ARGUMENT" in out and "prune amount must be in (0, 1)" in out and "submitted" not in out, out
    assert margin(stack, "compress", "submit", "digits:1", "--recipe", "{not json", code=2).exit_code == 2
    assert margin(stack, "compress", "submit", "digits:1", "--recipe", '{"nme": "typo"}', code=2).exit_code == 2
    assert margin(stack, "compress", "auto", "digits:1", "--floor", "accuracy>=0.9", "--objective", "speed",
                  code=2).exit_code == 2
    assert margin(stack, "compress", "auto", "digits:1", "--floor", "accuracy 0.9", code=2).exit_code == 2


def test_an_unattainable_floor_still_reports_the_front(stack: TrainingStack, tmp_path: Path) -> None:
    out = margin(stack, "compress", "auto", "digits:1", "--floor", "accuracy>=0.9999", "--candidates",
                 json.dumps([INT8]), "--watch", "--png", str(tmp_path / "none.png")).output
    assert "no variant meets the floor" in out and "int8" in out and "$/1M" in out, out
    assert "★ chosen" not in out and "pareto" in out, out
    assert_png(tmp_path / "none.png")


def test_estimate_prints_the_range_and_creates_no_job(stack: TrainingStack) -> None:
    before = margin(stack, "compress", "list", "--limit", "100").output.count("cj-")
    out = margin(stack, "compress", "estimate", "digits:1", "--candidates", json.dumps([INT8, WEIGHT_ONLY])).output
    assert re.search(r"2 variant\(s\) of digits:1 on cpu: expected \$0\.\d+ \(\$0\.\d+ – \$0\.\d+\)", out), out
    assert "basis: history" in out, out  # earlier tests in this file ran compression jobs of this MLP
    out = margin(stack, "compress", "estimate", "digits:1").output
    assert re.search(r"\b\d+ variant\(s\)", out) and "digits:1" in out, out  # the built-in search space
    assert margin(stack, "compress", "list", "--limit", "100").output.count("cj-") == before


def test_cancel_stops_a_running_search(stack: TrainingStack) -> None:
    slow = [{"name": f"prune-{i}", "steps": [{"prune": {"kind": "KIND_STRUCTURED", "amount": 0.5,
                                                         "finetune_epochs": 60}}]} for i in range(6)]
    out = margin(stack, "compress", "auto", "digits:1", "--floor", "accuracy>=0.5", "--candidates",
                 json.dumps(slow)).output
    job_id = JOB_ID.search(out)[0]
    stub, md = stack.compression_stub()
    wait_for(lambda: stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=job_id), metadata=md).state
             == common_pb2.JOB_STATE_RUNNING, 60)
    out = margin(stack, "compress", "cancel", job_id).output
    assert job_id in out and "stops at the next check" in out, out
    final = wait_for(lambda: (j := stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=job_id),
                                                          metadata=md)).state == common_pb2.JOB_STATE_CANCELLED
                     and j, 60)
    assert len(final.variants) == 0 and "cancelled" in final.outcome
    assert "CANCELLED" in margin(stack, "compress", "list", "--state", "cancelled").output
