"""Compressing an ONNX model a team uploaded (family ``onnx``): the compression worker's task for it.

- The source is the ONNX file as uploaded; recipes run through ONNX Runtime's tools
  (:func:`~margin.compression.onnx_apply.apply_onnx_recipe`); a variant is an ONNX file with the source's signature.
- The data is the tenant's dataset version (an ``.npz`` of one array per model input, plus optional labels ``y``),
  loaded with ``allow_pickle=False`` and split as a training job splits it (20 % held out, seed 0): static
  quantization calibrates on batches of 32 training rows, quality is measured on the held-out rows (at most
  :data:`MAX_EVAL_ROWS`) by the metric the floor names (:mod:`margin.compression.quality`), against the source's
  outputs on the same rows, computed once by the same runtime.
- Latency is ONNX Runtime on one intra-op thread (as the TorchScript tasks use one torch thread), on the first
  held-out row and on the first 32 (repeated when fewer are held out); on a GPU device class, quality and latency
  run on ONNX Runtime's CUDA provider when the worker's onnxruntime has it (:func:`providers`).
- Parameters are the source's weights (ONNX Runtime's quantizers store weights in fewer bits; they remove none).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from margin.common import config, manifest
from margin.common.errors import InvalidArgument
from margin.common.tensors import DTYPES, Signature, TensorSpec
from margin.compression.apply import Compressed
from margin.compression.measure import Measurement, time_calls
from margin.compression.onnx_apply import Feeds, apply_onnx_recipe
from margin.compression.quality import Quality, score
from margin.compression.recipe import Recipe
from margin.modelzoo.datasets import holdout

MAX_EVAL_ROWS = 4096
BATCH = 32  # calibration batches, evaluation batches and the second latency batch
LATENCY_THREADS = 1


def providers(device_class: str) -> list[str]:
    """ONNX Runtime's providers for a device class: CUDA first on a GPU class when this onnxruntime has it (the GPU
    worker's image installs onnxruntime-gpu), else the CPU."""
    import onnxruntime as ort

    if device_class != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(model: bytes, threads: int, device_class: str = "cpu"):
    """An ONNX Runtime session of ``model`` on ``threads`` intra-op threads, on the device class's provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=providers(device_class))


def load_arrays(path: Path, signature: Signature) -> tuple[Feeds, np.ndarray | None]:
    """The dataset's array for each model input and its labels ``y`` (None without), checked against the model."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as err:
        raise InvalidArgument(f"the dataset is not a plain-array .npz: {err}") from None
    found = Signature(tuple(TensorSpec(name, _dtype_name(a), a.shape) for name, a in arrays.items() if a.ndim))
    manifest.check_inputs(found, signature, what="the evaluation dataset")
    return {s.name: arrays[s.name] for s in signature.inputs}, arrays.get("y")


def _dtype_name(a: np.ndarray) -> str:
    names = {np.dtype(v): k for k, v in DTYPES.items() if k != "BYTES" and v != "bfloat16"}
    if a.dtype not in names:
        raise InvalidArgument(f"the dataset has an array of dtype {a.dtype}, which no model input takes")
    return names[a.dtype]


def _take(feeds: Feeds, rows: np.ndarray) -> Feeds:
    return {name: np.ascontiguousarray(a[rows]) for name, a in feeds.items()}


def first_output(runner, feeds: Feeds, rows: int) -> np.ndarray:
    """The model's first output over ``rows`` rows of ``feeds``, run in batches of :data:`BATCH`."""
    return np.concatenate([runner.run(None, _take(feeds, np.arange(i, min(i + BATCH, rows))))[0]
                           for i in range(0, rows, BATCH)])


class OnnxTask:
    format = "onnx"
    train_rows = 0  # quantize and optimize steps only: nothing is trained
    latency_repeats, latency_warmup = 30, 5

    def __init__(self, arch: dict, dataset: Path, quality_metric: str, device_class: str = "cpu"):
        self._signature = Signature.from_dict(arch["signature"])
        self.quality_metric, self.device_class = quality_metric, device_class
        feeds, labels = load_arrays(dataset, self._signature)
        rows = len(next(iter(feeds.values())))
        train, val = holdout(rows, validation_fraction=0.2, seed=0)
        val = val[:MAX_EVAL_ROWS]
        self.held_out = _take(feeds, val)
        self.held_out_rows = len(val)
        self.labels = None if labels is None else labels[val]
        self.calibration = [_take(feeds, train[i:i + BATCH]) for i in range(0, len(train), BATCH)]
        self.latency_batches = (_take(self.held_out, np.arange(1)),
                                _take(self.held_out, np.arange(BATCH) % self.held_out_rows))
        self.reference: np.ndarray | None = None  # the source's outputs on the held-out rows, set by load()
        self.source_parameters = 0

    def load(self, artifact: Path) -> bytes:
        model = artifact.read_bytes()
        graph = onnx.load_model_from_string(model).graph
        self.source_parameters = sum(int(np.prod(t.dims)) for t in graph.initializer)
        self.reference = first_output(self.served(model), self.held_out, self.held_out_rows)
        return model

    def apply(self, source: bytes, recipe: Recipe, after_epoch) -> Compressed:
        return apply_onnx_recipe(source, recipe, self.calibration)

    def serialize(self, model: bytes) -> bytes:
        return model

    def served(self, blob: bytes):
        return session(blob, config.torch_threads(), self.device_class)

    def quality(self, served) -> Quality:
        if self.reference is None:
            raise RuntimeError("load the source before scoring variants against it")
        outputs = first_output(served, self.held_out, self.held_out_rows)
        return score(self.quality_metric, outputs, self.reference, self.labels)

    def measure(self, served, blob: bytes) -> Measurement:
        timed = session(blob, LATENCY_THREADS, self.device_class)
        b1, b32 = (time_calls(lambda feeds=feeds: timed.run(None, feeds), self.latency_repeats, self.latency_warmup)
                   for feeds in self.latency_batches)
        return Measurement.of(len(blob), self.source_parameters, 0.0, b1, b32, batch=BATCH, threads=LATENCY_THREADS)

    def parameters(self, model: bytes) -> int:
        return self.source_parameters

    def signature(self) -> Signature:
        return self._signature

    def registry_metrics(self, quality: Quality) -> dict[str, float]:
        metrics = {self.quality_metric: quality.mean}
        if quality.minimum is not None:
            metrics[f"{self.quality_metric}_worst"] = quality.minimum
        return metrics
