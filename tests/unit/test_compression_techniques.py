"""Compression techniques on sklearn's digits: pruning, distillation, sensitivity, recipes, measurement."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from margin.common.errors import InvalidArgument
from margin.compression import measure, prune, recipe, sensitivity
from margin.compression.apply import apply_recipe
from margin.compression.distill import build_student, distill
from margin.compression.recipe import DistillStep, PruneStep, QuantizeStep, Recipe, validate
from margin.modelzoo.architectures import build_model
from margin.modelzoo.datasets import load_builtin, split
from margin.modelzoo.training import train_classifier
from safetensors.torch import save

MLP = {"family": "mlp", "input_dim": 64, "hidden": [64, 32], "num_classes": 10, "dropout": 0.0}
CNN = {"family": "cnn", "image_size": 8, "channels": [8, 16], "num_classes": 10}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only adds contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    x, y = load_builtin("sklearn:digits")
    return split(x, y, 0.2, seed=0)


def _trained(arch: dict, data, epochs: int):
    torch.manual_seed(0)
    model = build_model(arch)
    result = train_classifier(model, data, epochs=epochs, seed=0)
    model.eval()
    return model, result.val_accuracy


@pytest.fixture(scope="module")
def mlp(data):
    model, acc = _trained(MLP, data, 20)
    assert acc > 0.93
    return model, acc


@pytest.fixture(scope="module")
def cnn(data):
    model, acc = _trained(CNN, data, 15)
    assert acc > 0.9
    return model, acc


def _outputs(model, data) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(data.x_val))


# ------------------------------------------------------------------------------------------------ unstructured


def test_unstructured_hits_sparsity_and_packs_smaller(mlp, data):
    model, _ = mlp
    dense_before = len(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    pruned, sparsity = prune.unstructured(copy.deepcopy(model), 0.7)
    assert sparsity == pytest.approx(0.7, abs=0.005)
    assert measure.sparsity(pruned) == pytest.approx(sparsity)
    assert all(type(p) is torch.nn.Parameter for p in pruned.parameters())  # prune.remove: no masks left
    assert not any(name.endswith("_orig") for name, _ in pruned.named_parameters())
    state = pruned.state_dict()
    assert len(save(state)) == dense_before  # zeros alone do not shrink a dense file
    packed = prune.packed_state_dict(state)
    assert len(save(packed)) < 0.65 * dense_before
    unpacked = prune.unpack_state_dict(packed)
    assert unpacked.keys() == state.keys()
    assert all(torch.equal(unpacked[k], state[k]) and unpacked[k].dtype == state[k].dtype for k in state)


def test_packing_uses_positions_when_very_sparse(mlp):
    pruned, sparsity = prune.unstructured(copy.deepcopy(mlp[0]), 0.99)
    assert sparsity == pytest.approx(0.99, abs=0.002)
    state = pruned.state_dict()
    packed = prune.packed_state_dict(state)
    assert any(k.endswith(".__indices") for k in packed)
    assert packed["0.bias"] is not None  # dense biases stay under their own key
    unpacked = prune.unpack_state_dict(packed)
    assert all(torch.equal(unpacked[k], state[k]) for k in state)
    pruned.load_state_dict(unpacked)


def test_unstructured_skip_layers(mlp):
    model = copy.deepcopy(mlp[0])
    head = model[4].weight.detach().clone()
    _, sparsity = prune.unstructured(model, 0.5, skip_layers=["4"])
    assert torch.equal(model[4].weight, head)
    assert 0.4 < sparsity < 0.5  # the head's weights count but are not pruned
    with pytest.raises(InvalidArgument, match="unknown layers"):
        prune.unstructured(copy.deepcopy(mlp[0]), 0.5, skip_layers=["nope"])
    with pytest.raises(InvalidArgument, match=r"prune amount must be in \(0, 1\)"):
        prune.unstructured(copy.deepcopy(mlp[0]), 1.0)


def test_finetune_keeps_unstructured_zeros(mlp, data):
    pruned, sparsity = prune.unstructured(copy.deepcopy(mlp[0]), 0.8)
    prune.finetune(pruned, data, epochs=2, lr=1e-3)
    assert measure.sparsity(pruned) == pytest.approx(sparsity)
    assert not any(name.endswith("_orig") for name, _ in pruned.named_parameters())


# ------------------------------------------------------------------------------------------------ structured


def _zeroed(model, plan: dict[str, torch.Tensor]):
    """A copy of ``model`` whose units not in ``plan`` output zero (weights, bias and BatchNorm affine zeroed)."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name, kept in plan.items():
            layer = modules[name]
            removed = torch.ones(layer.weight.shape[0], dtype=torch.bool)
            removed[kept] = False
            layer.weight[removed] = 0
            layer.bias[removed] = 0
            if isinstance(layer, torch.nn.Conv2d):
                bn = out.features[int(name.split(".")[1]) + 1]
                bn.weight[removed] = 0
                bn.bias[removed] = 0
    return out


@pytest.mark.parametrize(("which", "arch", "key"), [("mlp", MLP, "hidden"), ("cnn", CNN, "channels")])
def test_structured_shrinks_and_matches_zeroed_units(which, arch, key, request, data):
    model, _ = request.getfixturevalue(which)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = prune.structured_plan(model, arch, 0.5)
    small, small_arch = prune.structured(model, arch, 0.5)
    assert small_arch[key] == [n // 2 for n in arch[key]]
    assert small_arch["num_classes"] == arch["num_classes"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    ratio = measure.parameter_count(small) / measure.parameter_count(model)
    assert 0.2 < ratio < 0.55, ratio  # roughly halved widths: about (1 - amount)² inside, (1 - amount) at edges
    expected = _outputs(_zeroed(model, plan), data)
    assert torch.allclose(_outputs(small, data), expected, atol=1e-5)
    rebuilt = build_model(small_arch)  # the new architecture is servable from safetensors + spec
    rebuilt.load_state_dict(small.state_dict())


def test_structured_skip_and_bad_input(mlp):
    model, _ = mlp
    _, small_arch = prune.structured(model, MLP, 0.5, skip_layers=["0"])
    assert small_arch["hidden"] == [64, 16]
    with pytest.raises(InvalidArgument, match="structured pruning supports"):
        prune.structured(model, {**MLP, "family": "cnn"}, 0.5)
    with pytest.raises(InvalidArgument, match=r"prune amount must be in \(0, 1\)"):
        prune.structured(model, MLP, 0.0)


def test_finetune_after_structured_prune_recovers(mlp, data):
    model, accuracy = mlp
    small, _ = prune.structured(model, MLP, 0.5)
    result = prune.finetune(small, data, epochs=10, lr=1e-3)
    assert result.val_accuracy >= accuracy - 0.03
    assert measure.accuracy(small, data.x_val, data.y_val) == pytest.approx(result.val_accuracy, abs=1e-6)


# ------------------------------------------------------------------------------------------------ distillation


def test_distill_into_smaller_mlp(mlp, data):
    teacher, _ = mlp
    step = DistillStep(student_family="mlp", student_architecture={"hidden": [16]}, temperature=4.0, alpha=0.7,
                       epochs=30, learning_rate=3e-3)
    torch.manual_seed(0)
    student, spec = build_student(step, input_dim=64, num_classes=10)
    assert spec == {"family": "mlp", "hidden": [16], "input_dim": 64, "num_classes": 10}
    distill(teacher, student, data, temperature=step.temperature, alpha=step.alpha, epochs=step.epochs,
            lr=step.learning_rate)
    assert measure.parameter_count(student) < 0.25 * measure.parameter_count(teacher)
    assert measure.accuracy(student, data.x_val, data.y_val) > 0.85


# ------------------------------------------------------------------------------------------------ sensitivity


def test_sensitivity_covers_every_quantizable_layer(mlp, cnn, data):
    results = sensitivity.layer_sensitivity(mlp[0], data.x_val, data.y_val, "dynamic_int8")
    assert sorted(name for name, _ in results) == ["0", "2", "4"]
    drops = [drop for _, drop in results]
    assert drops == sorted(drops, reverse=True)
    assert sensitivity.most_sensitive(results, 2) == [results[0][0], results[1][0]]
    assert sensitivity.most_sensitive(results, 0) == []
    conv = sensitivity.layer_sensitivity(cnn[0], data.x_val, data.y_val, "static_int8", calibration_batches=2)
    assert sorted(name for name, _ in conv) == ["features.0", "features.3", "head"]
    assert all(-0.1 < drop < 0.1 for _, drop in conv)


# ------------------------------------------------------------------------------------------------ recipes


def _distill(**kw) -> DistillStep:
    return DistillStep(**{"student_family": "mlp", "student_architecture": {"hidden": [16]}, **kw})


BAD_RECIPES = [
    (Recipe("empty", ()), "has no steps"),
    (Recipe("a0", (PruneStep("unstructured", 0.0),)), r"prune amount must be in \(0, 1\)"),
    (Recipe("a1", (PruneStep("structured", 1.0),)), r"prune amount must be in \(0, 1\)"),
    (Recipe("a-", (PruneStep("unstructured", -0.2),)), r"prune amount must be in \(0, 1\)"),
    (Recipe("kind", (PruneStep("diagonal", 0.5),)), "unknown prune kind 'diagonal'"),
    (Recipe("ft", (PruneStep("unstructured", 0.5, finetune_epochs=-1),)), "finetune_epochs must be a non-negative"),
    (Recipe("scheme", (QuantizeStep("int3"),)), r"unknown quantization scheme 'int3'; known: .*dynamic_int8"),
    (Recipe("q-p", (QuantizeStep("dynamic_int8"), PruneStep("unstructured", 0.5))), "quantize must be the last step"),
    (Recipe("q-d", (QuantizeStep("fp16"), _distill())), "quantize must be the last step"),
    (Recipe("fam", (_distill(student_family="transformer"),)), "unknown student family 'transformer'"),
    (Recipe("in", (_distill(student_architecture={"input_dim": 32, "hidden": [16]}),)),
     "incompatible with the data: it takes 32 inputs, the data has 64 features"),
    (Recipe("cls", (_distill(student_architecture={"hidden": [16], "num_classes": 5}),)),
     "incompatible with the data: it has 5 classes, the data 10"),
    (Recipe("img", (_distill(student_family="cnn", student_architecture={"image_size": 7, "channels": [4]}),)),
     "incompatible with the data"),
    (Recipe("arch", (_distill(student_architecture={"hidden": []}),)), "student architecture: .*hidden"),
    (Recipe("t0", (_distill(temperature=0.0),)), "temperature must be > 0"),
    (Recipe("t-", (_distill(temperature=-2.0),)), "temperature must be > 0"),
    (Recipe("a>1", (_distill(alpha=1.5),)), r"alpha must be in \[0, 1\]"),
    (Recipe("a<0", (_distill(alpha=-0.1),)), r"alpha must be in \[0, 1\]"),
    (Recipe("ep", (_distill(epochs=-1),)), "epochs must be a non-negative"),
    (Recipe("lr", (_distill(learning_rate=0.0),)), "learning_rate must be > 0"),
    (Recipe("keep", (QuantizeStep("dynamic_int8"),), keep_sensitive_layers=-1), "keep_sensitive_layers must be >= 0"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_RECIPES, ids=[r.name for r, _ in BAD_RECIPES])
def test_validate_rejects(bad, message):
    with pytest.raises(InvalidArgument, match=message):
        validate(bad, family="mlp", input_dim=64, num_classes=10)


def test_validate_accepts_and_tracks_family():
    good = Recipe("ok", (PruneStep("structured", 0.5, 2), _distill(), PruneStep("unstructured", 0.3),
                         QuantizeStep("dynamic_int8", per_channel=True)), keep_sensitive_layers=1)
    validate(good, family="cnn", input_dim=64, num_classes=10)
    validate(Recipe("cnn student", (_distill(student_family="cnn", student_architecture={"channels": [4]}),)),
             family="mlp", input_dim=64, num_classes=10)
    with pytest.raises(InvalidArgument, match="structured pruning supports"):
        validate(Recipe("s", (PruneStep("structured", 0.5),)), family="vit", input_dim=64, num_classes=10)
    with pytest.raises(InvalidArgument, match="prune is not supported for minilm"):
        validate(Recipe("s", (PruneStep("structured", 0.5),)), family="minilm")


def test_recipe_dict_round_trip_and_proto_shape():
    from google.protobuf import json_format
    from margin.v1 import compression_pb2

    original = Recipe("all", (PruneStep("structured", 0.5, 3, ("0",)), _distill(temperature=2.0),
                              QuantizeStep("static_int8", per_channel=True, calibration_batches=4)), 2)
    as_dict = original.to_dict()
    assert recipe.from_dict(as_dict) == original
    message = json_format.ParseDict(as_dict, compression_pb2.Recipe())
    assert message.steps[0].prune.kind == compression_pb2.PruneStep.KIND_STRUCTURED
    # what the service hands over: MessageToDict, zero values left out, Struct numbers as floats
    for kwargs in ({"preserving_proto_field_name": True}, {}):
        assert recipe.from_dict(json_format.MessageToDict(message, **kwargs)) == original
    assert recipe.from_dict({"steps": [{"quantize": {"scheme": "dynamic_int8"}}]}).steps[0].per_channel is False
    with pytest.raises(InvalidArgument, match="unknown technique"):
        recipe.from_dict({"steps": [{"sparsify": {}}]})
    with pytest.raises(InvalidArgument, match="must be an integer"):
        recipe.from_dict({"steps": [{"prune": {"amount": 0.5, "finetune_epochs": 1.5}}]})


# ------------------------------------------------------------------------------------------------ apply + measure


def test_apply_prune_quantize_recipe_is_smaller_and_close(mlp, data):
    quantize = pytest.importorskip("margin.compression.quantize")
    model, accuracy = mlp
    steps = (PruneStep("structured", 0.25, finetune_epochs=3), QuantizeStep("dynamic_int8", per_channel=True))
    result = apply_recipe(model, MLP, Recipe("prune+int8", steps, keep_sensitive_layers=1), data)
    assert result.arch is None  # quantized: TorchScript only
    example = torch.from_numpy(data.x_val[:1])
    assert quantize.serialized_size(result.model, example) < 0.6 * quantize.serialized_size(model, example)
    assert measure.accuracy(result.model, data.x_val, data.y_val) >= accuracy - 0.02
    assert any("sensitivity" in note for note in result.notes)
    assert measure.accuracy(model, data.x_val, data.y_val) == pytest.approx(accuracy)  # source untouched


def test_apply_unstructured_reports_sparsity(mlp, data):
    result = apply_recipe(mlp[0], MLP, Recipe("sparse", (PruneStep("unstructured", 0.6, 1),)), data)
    assert result.sparsity == pytest.approx(0.6, abs=0.01)
    assert result.arch == MLP


def test_apply_validates_first(mlp, data):
    with pytest.raises(InvalidArgument, match="has no steps"):
        apply_recipe(mlp[0], MLP, Recipe("empty", ()), data)


def test_measure(mlp, data):
    pytest.importorskip("margin.compression.quantize")
    model, accuracy = mlp
    x1, x32 = torch.from_numpy(data.x_val[:1]), torch.from_numpy(data.x_val[:32])
    torch.set_num_threads(2)
    try:
        m = measure.measure(model, x1, x32, repeats=5)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(1)
    assert m.threads == 1 and m.size_bytes > 0 and m.parameters == sum(p.numel() for p in model.parameters())
    assert 0 < m.latency_p50_ms_batch1 <= m.latency_p99_ms_batch1
    assert 0 < m.latency_p50_ms_batch32 <= m.latency_p99_ms_batch32
    assert m.throughput_per_second > 0 and m.sparsity == 0.0
    assert dataclasses.asdict(m) == m.to_dict()
    assert measure.accuracy(model, data.x_val, data.y_val) == pytest.approx(accuracy)


@pytest.mark.parametrize("scheme", ["dynamic_int8", "weight_only_int8", "fp16"])
def test_quantized_modules_count_packed_weights(mlp, scheme):
    quantize = pytest.importorskip("margin.compression.quantize")
    pruned, sparsity = prune.unstructured(copy.deepcopy(mlp[0]), 0.6)
    quantized = quantize.quantize(pruned, scheme, per_channel=True)
    assert measure.parameter_count(quantized) == measure.parameter_count(mlp[0])
    assert measure.sparsity(quantized) == pytest.approx(sparsity, abs=0.01)
