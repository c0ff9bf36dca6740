"""``margin train``'s options as the TrainingSpec they become: what a package job sends (no family, a registry
dataset, the config as a Struct), what fine-tuning from ``--base`` alone leaves to the service, and the bad input the
CLI refuses as a usage error (exit 2) before any service is called."""
from __future__ import annotations

import pytest
from margin.cli.jobs import SPEC_OPTIONS, build_spec
from margin.cli.main import app
from margin.common import protoconv
from typer.testing import CliRunner

UNREACHABLE = ["--training", "127.0.0.1:1", "--api-key", "mk_test"]  # a spec that got past parsing would exit 1 here


def spec(**given):
    """The spec ``margin train submit --model m`` plus ``given`` options builds (the others at their defaults)."""
    defaults = {name: option.default for name, _, option in SPEC_OPTIONS}
    return build_spec(**{**defaults, "model": "m", **given})


def test_a_package_job_sends_no_family_its_registry_dataset_config_and_time_limit():
    s = spec(package="resnet-code:1", config='{"width": 16, "blocks": [1, 2]}', dataset="images@train",
             max_seconds=600)
    assert s.family == "" and (s.package.model, s.package.number) == ("resnet-code", 1)
    assert (s.dataset.registry.model, s.dataset.registry.alias) == ("images", "train")
    assert protoconv.from_struct(s.config) == {"width": 16, "blocks": [1, 2]} and s.max_seconds == 600


def test_fine_tuning_from_base_alone_leaves_the_family_to_the_base_version():
    s = spec(base="resnet:1", dataset="images:1")
    assert s.family == "" and not s.HasField("package") and (s.base_version.model, s.base_version.number) == (
        "resnet", 1)
    assert spec(base="digits:1", family="cnn").family == "cnn"  # given: sent, for the service to compare


def test_a_plain_job_keeps_its_defaults():
    s = spec()
    assert (s.family, s.dataset.builtin, s.max_seconds, len(s.config)) == ("mlp", "sklearn:digits", 0, 0)


@pytest.mark.parametrize(("args", "fragments"), [
    (["--package", "resnet-code:1", "--dataset", "images:1", "--config", '{"width": 16'], ["--config", "not JSON"]),
    (["--package", "resnet-code:1", "--dataset", "images:1", "--config", "[16]"], ["--config", "JSON object"]),
    (["--package", "resnet-code:1", "--dataset", "sklearn:digits"], ["--dataset", "registry dataset", "sklearn"]),
    (["--package", "resnet-code:1"], ["--dataset", "registry dataset"]),
    (["--package", "resnet-code:1", "--dataset", "images:1", "--family", "cnn"], ["--family", "not both"]),
    (["--package", "resnet-code:v1", "--dataset", "images:1"], ["MODEL:NUMBER"]),
    (["--package", "resnet-code:1", "--dataset", "images:1", "--max-seconds", "-1"], ["--max-seconds"]),
])
@pytest.mark.parametrize("command", ["estimate", "submit"])
def test_bad_package_options_are_usage_errors(command, args, fragments):
    result = CliRunner().invoke(app, ["train", command, "--model", "resnet", *args, *UNREACHABLE])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())  # the message as one line, out of rich's box
    for fragment in fragments:
        assert fragment in text, result.output
