"""What a compression run needs to know about the kind of model it compresses, one class per task:

- :class:`ClassifierTask` (families ``mlp``, ``cnn``): the source is the architecture spec's model with its
  safetensors weights; recipes run through :func:`~margin.compression.apply.apply_recipe` on the built-in dataset's
  training rows; a variant is scripted (traced as a fallback); quality is top-1 ``accuracy`` on the held-out rows
  (``split(..., validation_fraction=0.2, seed=0)``, the training job's validation split); latency is measured on
  the first held-out row and the first 32.
- :class:`EncoderTask` (family ``minilm``): the source is the BERT config's encoder with its safetensors weights,
  served as :class:`~margin.compression.minilm.SentenceEncoder`; recipes are quantize steps (SmoothQuant calibrated
  on the package's README sentences); a variant is traced; quality is ``cosine``: the mean, over the held-out
  sentences of ``margin:sentences``, of the cosine similarity of each sentence's embedding to the fp32 source's
  (``minimum`` is the worst sentence); latency is measured on one sentence and on the first 32.

- :class:`~margin.compression.onnx_task.OnnxTask` (family ``onnx``): any ONNX model a team uploaded, compressed
  with ONNX Runtime's tools and scored on the tenant's own dataset.

A classifier may also be scored on a registry dataset (an ``.npz`` with ``x`` and ``y``) instead of a built-in one.
The worker (:mod:`margin.worker.compress`) picks the task with :func:`task_for` and keeps the job logic.
"""
from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from margin.common.errors import InvalidArgument
from margin.common.tensors import Signature
from margin.compression import minilm
from margin.compression.apply import Compressed, apply_encoder_recipe, apply_recipe
from margin.compression.measure import Batch, Measurement, accuracy, measure, parameter_count
from margin.compression.onnx_task import OnnxTask
from margin.compression.quality import Quality
from margin.compression.quantize import serialized_bytes
from margin.compression.recipe import Recipe
from margin.modelzoo.architectures import FAMILIES as CLASSIFIER_FAMILIES
from margin.modelzoo.architectures import build_model, signature
from margin.modelzoo.datasets import load_builtin, load_npz, split

AfterEpoch = Callable[[int], None]
CALIBRATION_BATCH = 16  # sentences per SmoothQuant calibration batch


class Task(Protocol):
    format: str  # the registry format of the variants: "torchscript" | "onnx"
    quality_metric: str
    train_rows: int  # training rows a recipe's fine-tuning would go over (for the estimate's history)
    latency_repeats: int
    latency_warmup: int

    def load(self, weights: Path) -> nn.Module:
        """The fp32 source, in eval mode, from its downloaded safetensors file."""

    def apply(self, source: nn.Module, recipe: Recipe, after_epoch: AfterEpoch) -> Compressed:
        """The compressed model (``source`` itself is left as it is)."""

    def serialize(self, module: nn.Module) -> bytes:
        """The file that would be served."""

    def served(self, blob: bytes):
        """The served form, reloaded from the file's bytes (what quality and latency are measured on)."""

    def quality(self, served) -> Quality:
        """The quality of the reloaded file on the held-out data."""

    def measure(self, served, blob: bytes) -> Measurement:
        """Size, parameters and latency at batch 1 and 32 of the reloaded file."""

    def parameters(self, model) -> int:
        """The model's parameter count."""

    def signature(self) -> Signature:
        """The variants' signature, as registered."""

    def registry_metrics(self, quality: Quality) -> dict[str, float]:
        """The quality figures registered with a variant."""


class TorchScriptServed:
    """Variants served as TorchScript: reloaded with ``torch.jit.load`` and timed with torch on one thread."""
    format = "torchscript"
    latency_repeats: int
    latency_warmup: int

    def latency_inputs(self) -> tuple[Batch, Batch]:
        raise NotImplementedError

    def served(self, blob: bytes) -> nn.Module:
        return torch.jit.load(io.BytesIO(blob))

    def measure(self, served: nn.Module, blob: bytes) -> Measurement:
        return measure(served, *self.latency_inputs(), repeats=self.latency_repeats, warmup=self.latency_warmup)

    def parameters(self, model: nn.Module) -> int:
        return parameter_count(model)


class ClassifierTask(TorchScriptServed):
    quality_metric = "accuracy"
    latency_repeats, latency_warmup = 30, 5

    def __init__(self, arch: dict, eval_dataset: str, dataset: Path | None = None):
        """``dataset``: a registry dataset's downloaded ``.npz`` (``x``, ``y``), used instead of the built-in one."""
        self.arch = arch
        rows = load_npz(dataset) if dataset is not None else load_builtin(eval_dataset)
        self.data = split(*rows, validation_fraction=0.2, seed=0)
        self.train_rows = len(self.data.x_train)
        self.x_val, self.y_val = torch.from_numpy(self.data.x_val), torch.from_numpy(self.data.y_val)

    def load(self, weights: Path) -> nn.Module:
        model = build_model(self.arch)
        model.load_state_dict(load_file(weights))
        return model.eval()

    def apply(self, source: nn.Module, recipe: Recipe, after_epoch: AfterEpoch) -> Compressed:
        return apply_recipe(copy.deepcopy(source), self.arch, recipe, self.data, after_epoch=after_epoch)

    def serialize(self, module: nn.Module) -> bytes:
        return serialized_bytes(copy.deepcopy(module), (self.x_val[:1],))  # scripting must not touch the source

    def quality(self, served: nn.Module) -> Quality:
        return Quality(accuracy(served, self.x_val, self.y_val))

    def latency_inputs(self) -> tuple[Batch, Batch]:
        return self.x_val[:1], self.x_val[:32]

    def signature(self) -> Signature:
        return signature(self.arch)

    def registry_metrics(self, quality: Quality) -> dict[str, float]:
        return {"accuracy": quality.mean, "val_accuracy": quality.mean}


class EncoderTask(TorchScriptServed):
    quality_metric = "cosine"
    train_rows = 0  # quantize steps only
    latency_repeats, latency_warmup = 10, 2  # a MiniLM batch of 32 takes tens of milliseconds on one thread

    def __init__(self, arch: dict, eval_dataset: str):
        self.family, self.config = arch["family"], arch.get("config")
        self.tokenizer = minilm.load_tokenizer()
        minilm.encoder_parameters(self.config)  # the config's sizes, checked before anything is loaded
        if len(self.tokenizer) > int(self.config["vocab_size"]):
            raise InvalidArgument(f"the {self.family} tokenizer has {len(self.tokenizer)} tokens; the source's "
                                  f"config only {self.config['vocab_size']}")
        self.sentences = minilm.held_out_sentences(eval_dataset)
        calibration = minilm.calibration_sentences()
        self.calibration = [minilm.tokenize(self.tokenizer, calibration[i:i + CALIBRATION_BATCH])
                            for i in range(0, len(calibration), CALIBRATION_BATCH)]
        self.reference = None  # the fp32 source's embeddings of the held-out sentences, set by load()

    def load(self, weights: Path) -> nn.Module:
        source = minilm.load_encoder(self.config, weights)
        self.reference = minilm.encode(source, self.tokenizer, self.sentences)
        return source

    def apply(self, source: nn.Module, recipe: Recipe, after_epoch: AfterEpoch) -> Compressed:
        return apply_encoder_recipe(source, self.family, recipe, self.calibration)

    def serialize(self, module: nn.Module) -> bytes:
        return minilm.traced_bytes(module, self.tokenizer)

    def quality(self, served: nn.Module) -> Quality:
        if self.reference is None:
            raise RuntimeError("load the source before scoring variants against it")
        cos = minilm.cosines(self.reference, minilm.encode(served, self.tokenizer, self.sentences))
        return Quality(float(cos.mean()), float(cos.min()))

    def latency_inputs(self) -> tuple[Batch, Batch]:
        return minilm.tokenize(self.tokenizer, self.sentences[:1]), minilm.tokenize(self.tokenizer, self.sentences[:32])

    def signature(self) -> Signature:
        return minilm.signature(self.config)

    def registry_metrics(self, quality: Quality) -> dict[str, float]:
        return {"cosine": quality.mean, "cosine_min": quality.minimum}


def task_for(arch: dict, eval_dataset: str | dict, quality_metric: str, dataset: Path | None = None,
             device_class: str = "cpu") -> Task:
    """The task for the source's family; ``eval_dataset`` is a built-in dataset's name or a registry dataset's
    reference (then downloaded to ``dataset``)."""
    family = arch.get("family")
    builtin = eval_dataset if isinstance(eval_dataset, str) else ""
    if family == minilm.FAMILY:
        return EncoderTask(arch, builtin)
    if family in CLASSIFIER_FAMILIES:
        return ClassifierTask(arch, builtin, dataset)
    if family == "onnx" and dataset is not None:
        return OnnxTask(arch, dataset, quality_metric, device_class)
    raise InvalidArgument(f"cannot compress a {family!r} model; known: {[*CLASSIFIER_FAMILIES, minilm.FAMILY, 'onnx']}")
