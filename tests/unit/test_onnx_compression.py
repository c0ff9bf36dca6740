"""Compressing an uploaded ONNX model with ONNX Runtime's tools, without the services: recipes for the ``onnx``
family, every scheme on a real exported model (loadable, with the source's inputs and outputs), the quality metrics,
the task the worker runs (the tenant's dataset split, calibrated, scored against the source), and how the worker
chooses under a lower-is-better floor."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from google.protobuf import json_format
from margin.common.errors import InvalidArgument
from margin.common.tensors import Signature
from margin.compression import quality
from margin.compression.core import ONNX_GPU_SEARCH_SPACE, ONNX_SEARCH_SPACE
from margin.compression.estimate import history_key
from margin.compression.onnx_apply import apply_onnx_recipe
from margin.compression.onnx_task import OnnxTask
from margin.compression.recipe import OptimizeStep, QuantizeStep, Recipe, validate
from margin.registry.onnx_format import check_onnx
from margin.v1 import compression_pb2
from margin.worker.compress import choose

from tests.byom_models import ONNX_EXPORT_WARNINGS

pytestmark = ONNX_EXPORT_WARNINGS


class TokenClassifier(torch.nn.Module):
    """Embedding -> Linear over tokens (exported as Gather and MatMul, which every ONNX scheme touches) -> mean ->
    Linear: a small model Margin never built."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, 32)
        self.mix = torch.nn.Linear(32, 64)
        self.head = torch.nn.Linear(64, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.embed(tokens))).mean(1))


def exported() -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(TokenClassifier().eval(), (torch.zeros(2, 8, dtype=torch.int64),), buffer,
                      input_names=["tokens"], output_names=["scores"],
                      dynamic_axes={"tokens": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[bytes, Signature, Path]:
    """The exported model, its signature as the registry derives it, and a dataset of its own shape (with labels:
    the source's argmax)."""
    home = tmp_path_factory.mktemp("onnx")
    model = exported()
    (home / "model.onnx").write_bytes(model)
    signature = check_onnx(home / "model.onnx", Signature())
    tokens = np.random.default_rng(0).integers(0, 64, (200, 8), dtype=np.int64)
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    labels = session.run(None, {"tokens": tokens})[0].argmax(1).astype(np.int64)
    np.savez(home / "data.npz", tokens=tokens, y=labels)
    return model, signature, home


def recipe(*steps: dict, name: str = "r") -> Recipe:
    return Recipe.from_dict({"name": name, "steps": list(steps)})


@pytest.mark.parametrize("steps, fragment", [
    ([{"prune": {"amount": 0.5}}], "prune is not supported for onnx"),
    ([{"distill": {}}], "distill is not supported for onnx"),
    ([{"quantize": {"scheme": "embedding_int8"}}], "not supported for onnx sources"),
    ([{"quantize": {"scheme": "dynamic_int8"}}, {"quantize": {"scheme": "static_int8"}}], "at most one quantize"),
    ([{"quantize": {"scheme": "dynamic_int8"}}, {"optimize": {}}], "optimize must be the first step"),
    ([{"optimize": {"level": "aggressive"}}], "unknown optimization level"),
    ([{"quantize": {"scheme": "weight_only_int4", "group_size": 24}}], "group_size must be one of"),
    ([{"quantize": {"scheme": "dynamic_int8_per_token", "smoothquant": True}}], "not supported for onnx"),
])
def test_an_onnx_recipe_that_cannot_run_is_refused_naming_the_step(steps, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        validate(recipe(*steps), family="onnx")


def test_optimize_is_onnx_only_and_round_trips_through_the_proto():
    with pytest.raises(InvalidArgument, match="applies to onnx sources, not 'mlp'"):
        validate(recipe({"optimize": {"level": "basic"}}), family="mlp", input_dim=64, num_classes=10)
    r = recipe({"optimize": {"level": "basic"}}, {"quantize": {"scheme": "static_int8", "per_channel": True}})
    assert r.steps == (OptimizeStep("basic"), QuantizeStep("static_int8", per_channel=True))
    proto = json_format.ParseDict(r.to_dict(), compression_pb2.Recipe())
    assert Recipe.from_dict(json_format.MessageToDict(proto, preserving_proto_field_name=True)) == r
    assert Recipe.from_dict({"steps": [{"optimize": {}}]}).steps == (OptimizeStep("extended"),)


def test_every_built_in_onnx_candidate_is_a_valid_recipe():
    for candidate in ONNX_GPU_SEARCH_SPACE:
        validate(Recipe.from_dict(candidate), family="onnx")
    assert not any(s.get("quantize", {}).get("scheme") == "fp16" for c in ONNX_SEARCH_SPACE for s in c["steps"])


@pytest.mark.parametrize("steps, ops", [
    ([{"quantize": {"scheme": "dynamic_int8", "per_channel": True}}], {"MatMulInteger", "DynamicQuantizeLinear"}),
    ([{"quantize": {"scheme": "static_int8", "per_channel": True, "calibration_batches": 2}}],
     {"QuantizeLinear", "DequantizeLinear"}),
    ([{"quantize": {"scheme": "weight_only_int4", "group_size": 16}}], {"MatMulNBits"}),
    ([{"quantize": {"scheme": "fp16"}}], {"Cast"}),
    ([{"optimize": {"level": "basic"}}], set()),
])
def test_each_scheme_makes_a_loadable_model_with_the_sources_inputs_and_outputs(source, steps, ops, tmp_path):
    model, signature, home = source
    tokens = np.load(home / "data.npz")["tokens"][:32]
    calibration = [{"tokens": tokens[:16]}, {"tokens": tokens[16:]}]
    made = apply_onnx_recipe(model, recipe(*steps), calibration)
    graph = onnx.load_model_from_string(made.model).graph
    assert ops <= {n.op_type for n in graph.node}, sorted({n.op_type for n in graph.node})
    (tmp_path / "variant.onnx").write_bytes(made.model)
    assert check_onnx(tmp_path / "variant.onnx", Signature()) == signature
    expected = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"tokens": tokens})[0]
    got = onnxruntime.InferenceSession(made.model, providers=["CPUExecutionProvider"]).run(
        None, {"tokens": tokens})[0]
    assert got.shape == expected.shape and got.dtype == np.float32
    assert quality.score("cosine", got, expected).mean > 0.9  # a quantized model, not a broken one


def test_static_int8_without_calibration_rows_is_refused(source):
    with pytest.raises(InvalidArgument, match="needs calibration rows"):
        apply_onnx_recipe(source[0], recipe({"quantize": {"scheme": "static_int8"}}), [])


def test_the_task_scores_variants_on_the_held_out_rows_against_the_source(source):
    model, signature, home = source
    task = OnnxTask({"family": "onnx", "signature": signature.to_dict()}, home / "data.npz", "accuracy")
    assert task.held_out_rows == 40 and len(task.calibration) == 5  # 20 % of 200 held out; 160 rows in 32s
    loaded = task.load(home / "model.onnx")
    assert task.quality(task.served(loaded)) == quality.Quality(1.0)  # the labels are the source's argmax
    made = task.apply(loaded, recipe({"quantize": {"scheme": "dynamic_int8", "per_channel": True}}), None)
    m = task.measure(task.served(made.model), made.model)
    assert m.size_bytes == len(made.model) < len(model) and m.parameters == 64 * 32 + (32 * 64 + 64) + (64 * 5 + 5)
    assert m.threads == 1 and m.latency_p50_ms_batch1 > 0 and m.latency_p50_ms_batch32 > 0


def test_a_dataset_that_does_not_feed_the_model_is_refused_by_the_task(source, tmp_path):
    _, signature, _ = source
    np.savez(tmp_path / "wrong.npz", tokens=np.zeros((10, 9), dtype=np.int64))
    with pytest.raises(InvalidArgument, match="tokens"):
        OnnxTask({"family": "onnx", "signature": signature.to_dict()}, tmp_path / "wrong.npz", "agreement")


def test_the_metrics_on_known_outputs():
    reference = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    outputs = np.array([[1.0, 0.1, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert quality.score("agreement", outputs, reference) == quality.Quality(0.75)
    assert quality.score("accuracy", outputs, reference, np.array([0, 1, 2, 1])) == quality.Quality(0.5)
    cosine = quality.score("cosine", outputs, reference)
    assert cosine.minimum == pytest.approx(0.0) and cosine.mean == pytest.approx((0.995037 + 1 + 0 + 1) / 4)
    error = quality.score("relative_error", outputs, reference)
    assert error.minimum == pytest.approx(np.sqrt(18) / 3) and error.mean == pytest.approx((0.1 + np.sqrt(18) / 3) / 4)
    with pytest.raises(InvalidArgument, match="accuracy needs labels"):
        quality.score("accuracy", outputs, reference)
    with pytest.raises(InvalidArgument, match="output has shape"):
        quality.score("cosine", outputs[:2], reference)


def variant(name: str, error: float, cost: int) -> dict:
    return {"recipe": {"name": name}, "quality": error, "quality_metric": "relative_error", "quality_delta": error,
            "compression_ratio": 2.0, "cost_per_million_micros": cost, "latency_p50_ms_batch1": 1.0,
            "size_bytes": 10}


def test_a_relative_error_floor_is_a_ceiling_and_lower_error_is_better_on_the_front():
    baseline = {**variant("source", 0.0, 100), "quality_metric": "relative_error"}
    variants = [variant("cheap-but-wrong", 0.2, 10), variant("good", 0.01, 40), variant("dominated", 0.05, 50)]
    result = choose(variants, baseline, {"floor": {"metric": "relative_error", "minimum": 0.02}})
    assert result["chosen"] == 1 and baseline["meets_floor"]
    assert [v["meets_floor"] for v in variants] == [False, True, False]
    assert [v["pareto_optimal"] for v in variants] == [True, True, False]
    none = choose([variant("a", 0.2, 10)], {**baseline}, {"floor": {"metric": "relative_error", "minimum": 0.1}})
    assert none["chosen"] == -1 and "relative_error ≤ 0.1" in none["outcome"]


def test_fp16_keeps_float_inputs_and_outputs_and_a_graph_onnx_checker_accepts(tmp_path):
    """The fp16 converter casts a float input in a node it appends last; the variant is sorted so that the
    registry's onnx.checker (and Triton) take it."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                 torch.nn.Linear(8 * 6 * 6, 4)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.zeros(1, 3, 8, 8),), buffer, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    (tmp_path / "source.onnx").write_bytes(buffer.getvalue())
    made = apply_onnx_recipe(buffer.getvalue(), recipe({"quantize": {"scheme": "fp16"}}), [])
    (tmp_path / "half.onnx").write_bytes(made.model)
    assert check_onnx(tmp_path / "half.onnx", Signature()) == check_onnx(tmp_path / "source.onnx", Signature())
    assert len(made.model) < 0.65 * len(buffer.getvalue())  # half the weight bytes; the graph is as long


def test_a_scheme_that_finds_nothing_to_quantize_says_so(source):
    """int4 weight-only takes MatMul weights; a model of Conv and Gemm layers is left as it was, and the notes say
    so rather than report a variant as quantized."""
    module = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.zeros(1, 4),), buffer, input_names=["x"], output_names=["y"], dynamo=False)
    made = apply_onnx_recipe(buffer.getvalue(), recipe({"quantize": {"scheme": "weight_only_int4"}}), [])
    assert any("found nothing to quantize" in note for note in made.notes), made.notes


def test_onnx_runs_are_estimated_from_runs_of_sources_of_a_similar_size():
    assert history_key({"family": "onnx", "size_bytes": 300_000}) == "onnx:1MiB"
    assert history_key({"family": "onnx", "size_bytes": 90_000_000}) == "onnx:128MiB"
    assert history_key({"family": "onnx", "size_bytes": 64 << 20}) == "onnx:64MiB"
    assert history_key({"family": "mlp", "hidden": [32]}) == "mlp"
