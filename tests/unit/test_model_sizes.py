"""Architecture sizes are checked and counted from the spec alone (margin.modelzoo.sizes)."""
from __future__ import annotations

import pytest
from margin.common.errors import InvalidArgument
from margin.modelzoo import sizes
from margin.modelzoo.architectures import build_model, parameter_names

SPECS = [{"family": "mlp", "input_dim": 64, "hidden": [128], "num_classes": 10},
         {"family": "mlp", "input_dim": 7, "hidden": [5, 3, 9], "num_classes": 2, "dropout": 0.5},
         {"family": "cnn", "image_size": 8, "channels": [16, 32], "num_classes": 10},
         {"family": "cnn", "image_size": 5, "channels": [3], "num_classes": 4}]
LIMITS = sizes.SizeLimits(max_parameters=1_000_000, max_width=1024, max_layers=4)


@pytest.mark.parametrize("spec", SPECS)
def test_the_parameter_count_is_what_the_built_model_has(spec):
    model = build_model(spec)
    assert sizes.parameter_count(spec) == sum(p.numel() for p in model.parameters())
    assert sizes.check(spec, LIMITS) == sizes.parameter_count(spec)
    assert parameter_names(spec) == [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize(("arch", "field"), [
    ({"hidden": [1_000_000, 1_000_000]}, "architecture.hidden[0] is 1000000"),
    ({"hidden": [8, 8, 8, 8, 8]}, "architecture.hidden has 5 layers"),
    ({"input_dim": 5000}, "architecture.input_dim is 5000"),
    ({"num_classes": 2000}, "architecture.num_classes is 2000"),
    ({"hidden": [1000, 1000]}, "architecture has 1076010 parameters"),
])
def test_sizes_beyond_the_limits_are_invalid_argument_naming_the_field(arch, field):
    spec = {"family": "mlp", "input_dim": 64, "num_classes": 10, **arch}
    with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
        sizes.check(spec, LIMITS)


def test_a_cnn_image_is_limited_by_its_input_features():
    with pytest.raises(InvalidArgument, match="image_size squared"):
        sizes.check({"family": "cnn", "image_size": 33, "num_classes": 10}, LIMITS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 2.5, True, "8", None, 0, -3])
def test_a_size_that_is_not_a_positive_whole_number_is_refused_naming_it(value):
    with pytest.raises(InvalidArgument, match=r"architecture\.hidden\[1\] must be a positive integer"):
        sizes.check({"family": "mlp", "input_dim": 64, "hidden": [8, value], "num_classes": 10}, LIMITS)
    with pytest.raises(InvalidArgument, match=r"architecture\.image_size must be a positive integer"):
        sizes.check({"family": "cnn", "image_size": value, "num_classes": 10}, LIMITS)


def test_the_limits_come_from_the_environment(monkeypatch):
    spec = {"family": "mlp", "input_dim": 64, "hidden": [10_000, 10_000], "num_classes": 10}
    with pytest.raises(InvalidArgument, match="MARGIN_MAX_LAYER_WIDTH"):
        sizes.check(spec)
    monkeypatch.setenv("MARGIN_MAX_LAYER_WIDTH", "20000")
    monkeypatch.setenv("MARGIN_MAX_MODEL_PARAMETERS", str(10**9))
    assert sizes.check(spec) == sizes.parameter_count(spec) == 64 * 10_000 + 10_000 + 10_001 * 10_000 + 10_001 * 10
