"""Run a validated recipe on an ONNX model a team uploaded, with ONNX Runtime's own tools (bytes in, bytes out).

- ``optimize``: offline graph optimization (``basic``: constant folding and redundant-node removal; ``extended``:
  also ONNX Runtime's node fusions), saved by a CPU session as a model.
- ``quantize`` ``dynamic_int8``: ``quantize_dynamic`` — int8 weights (per output channel with ``per_channel``) for
  MatMul / Gather / Conv and friends, activations quantized at run time;
- ``static_int8``: ``quantize_static`` in the QDQ format, per-channel int8 weights and uint8 activations whose ranges
  are calibrated (MinMax) on ``calibration_batches`` batches of the tenant's own training rows, at the inputs of
  the ops that carry weights (:data:`STATIC_OPS`);
- ``weight_only_int4``: ``MatMulNBitsQuantizer`` — symmetric int4 MatMul weights in groups of ``group_size`` (32);
- ``fp16``: float16 weights and compute with the model's float32 inputs and outputs kept (GPU device classes).

``skip_layers`` names nodes kept in float. The model never runs a tenant's code: an ONNX graph is data, executed by
ONNX Runtime's own kernels. Files go through a temporary folder (the quantizers work on paths).
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from margin.common.errors import InvalidArgument
from margin.compression.apply import Compressed
from margin.compression.recipe import OptimizeStep, QuantizeStep, Recipe, validate

Feeds = dict[str, np.ndarray]
DEFAULT_CALIBRATION_BATCHES = 8
DEFAULT_INT4_GROUP = 32
# Static int8 quantizes the activations entering the ops that carry weights, nowhere else: per-tensor ranges
# calibrated through a transformer's attention-mask Add, Softmax or LayerNorm ruin it (MiniLM-L6: cosine 0.36 with
# every op quantized, 0.93 with these), while a CNN keeps its int8 convolutions (agreement unchanged, ~15 % slower
# than quantizing its ReLUs and Adds too).
STATIC_OPS = ("MatMul", "Gemm", "Conv", "Gather")


def optimize(model: bytes, level: str) -> bytes:
    """``model`` after ONNX Runtime's offline graph optimization at ``level``."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return out.read_bytes()


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over the tenant's training batches."""

    def __init__(self, batches: Sequence[Feeds]):
        self._batches: Iterator[Feeds] = iter(batches)

    def get_next(self) -> Feeds | None:
        return next(self._batches, None)


def _dynamic_int8(source: Path, out: Path, step: QuantizeStep, _: Sequence[Feeds]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, out, per_channel=step.per_channel, weight_type=QuantType.QInt8,
                     nodes_to_exclude=list(step.skip_layers))


def _static_int8(source: Path, out: Path, step: QuantizeStep, calibration: Sequence[Feeds]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    batches = calibration[:step.calibration_batches or DEFAULT_CALIBRATION_BATCHES]
    if not batches:
        raise InvalidArgument("static_int8 needs calibration rows: the dataset's training part is empty")
    quantize_static(source, out, _Calibration(batches), quant_format=QuantFormat.QDQ, per_channel=step.per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(STATIC_OPS), nodes_to_exclude=list(step.skip_layers))


def _weight_only_int4(source: Path, out: Path, step: QuantizeStep, _: Sequence[Feeds]) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=step.group_size or DEFAULT_INT4_GROUP,
                                     is_symmetric=True, nodes_to_exclude=list(step.skip_layers))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def _fp16(source: Path, out: Path, step: QuantizeStep, _: Sequence[Feeds]) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(onnx.load(source), keep_io_types=True,
                                               node_block_list=list(step.skip_layers) or None))
    model.topological_sort()  # the converter appends the casts of float inputs last; onnx.checker needs them first
    onnx.save(model.model, out)


QUANTIZERS = {"dynamic_int8": _dynamic_int8, "static_int8": _static_int8, "weight_only_int4": _weight_only_int4,
              "fp16": _fp16}


def quantize(model: bytes, step: QuantizeStep, calibration: Sequence[Feeds]) -> bytes:
    """``model`` quantized as ``step`` says; ``calibration`` feeds the static scheme."""
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "source.onnx", Path(tmp) / "quantized.onnx"
        source.write_bytes(model)
        QUANTIZERS[step.scheme](source, out, step, calibration)
        return out.read_bytes()


def _weights(model: bytes) -> list[tuple[str, int]]:
    """Each initializer's name and element type: what a quantizer would have changed."""
    return [(t.name, t.data_type) for t in onnx.load_model_from_string(model).graph.initializer]


def apply_onnx_recipe(model: bytes, recipe: Recipe, calibration: Sequence[Feeds]) -> Compressed:
    """Validate ``recipe`` for an ONNX source and run it on ``model``; ``Compressed.model`` is the ONNX bytes."""
    validate(recipe, family="onnx")
    notes = []
    for number, step in enumerate(recipe.steps, start=1):
        if isinstance(step, OptimizeStep):
            model = optimize(model, step.level)
            notes.append(f"step {number}: graph optimized ({step.level})")
        else:
            before = model
            model = quantize(model, step, calibration)
            if _weights(model) == _weights(before):
                notes.append(f"step {number}: {step.scheme} found nothing to quantize (e.g. int4 takes MatMul "
                             "weights; Conv and Gemm stay float)")
            batches = min(len(calibration), step.calibration_batches or DEFAULT_CALIBRATION_BATCHES)
            calibrated = f", calibrated on {batches} batches" if step.scheme == "static_int8" else ""
            notes.append(f"step {number}: quantized {step.scheme}{calibrated}")
    return Compressed(model=model, arch=None, notes=notes)
