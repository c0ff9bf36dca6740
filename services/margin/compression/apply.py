"""Run a validated recipe: on a trained classifier (:func:`apply_recipe`: prune (→ fine-tune), distill, quantize,
in the recipe's order), or on a sentence encoder (:func:`apply_encoder_recipe`: quantize steps only)."""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from margin.common.errors import InvalidArgument
from margin.compression import prune as pruning
from margin.compression.distill import build_student, distill
from margin.compression.measure import accuracy
from margin.compression.measure import sparsity as weight_sparsity
from margin.compression.recipe import DistillStep, PruneStep, QuantizeStep, Recipe, validate
from margin.compression.sensitivity import layer_sensitivity, most_sensitive
from margin.modelzoo.datasets import Split


@dataclass
class Compressed:
    model: nn.Module | bytes  # bytes: an ONNX source's variant (margin.compression.onnx_apply)
    arch: dict | None  # None once quantized: the result is then only servable as TorchScript
    notes: list[str] = field(default_factory=list)
    sparsity: float = 0.0  # fraction of zero Linear / Conv weights in the result


def calibration_batches_of(data: Split, batches: int, batch_size: int = 32) -> list[tuple[torch.Tensor]]:
    """The first ``batches`` training batches, as ``quantize``'s calibration input."""
    x = torch.from_numpy(data.x_train)
    return [(x[i:i + batch_size],) for i in range(0, min(len(x), batches * batch_size), batch_size)]


def apply_recipe(model: nn.Module, arch: dict, recipe: Recipe, data: Split, *, calibration_batches: int = 8,
                 seed: int = 0, after_epoch: Callable[[int], None] | None = None) -> Compressed:
    """Validate ``recipe`` against ``arch`` and ``data``, then run its steps on a copy of ``model``.

    - prune: unstructured (global magnitude; sparsity reported) or structured (a smaller ``arch``); then
      ``finetune_epochs`` of training that keeps pruned weights at zero.
    - distill: the current model teaches a fresh student of the step's architecture, which replaces it.
    - quantize: ``skip_layers`` plus the recipe's ``keep_sensitive_layers`` most sensitive layers (measured on the
      validation rows; only layers whose quantization lowers accuracy count as sensitive) stay in float; static
      schemes and SmoothQuant calibrate on the step's ``calibration_batches`` (or this call's) training batches.
      Afterwards ``arch`` is None.

    ``notes`` says, step by step, what was done and the validation accuracy it left. ``after_epoch`` runs after
    every epoch of fine-tuning or distillation (the worker's cancel and budget check).
    """
    if not isinstance(arch, dict) or "family" not in arch:
        raise InvalidArgument("arch must be an architecture spec with a 'family'")
    input_dim = int(data.x_train.shape[1])
    num_classes = int(arch.get("num_classes") or int(max(data.y_train.max(), data.y_val.max())) + 1)
    validate(recipe, family=arch["family"], input_dim=input_dim, num_classes=num_classes)
    model = copy.deepcopy(model).eval()
    arch = dict(arch)
    notes = [f"source: validation accuracy {accuracy(model, data.x_val, data.y_val):.4f}"]
    for number, step in enumerate(recipe.steps, start=1):
        if isinstance(step, PruneStep):
            if step.kind == "structured":
                before = arch
                model, arch = pruning.structured(model, arch, step.amount, step.skip_layers)
                shape = "hidden" if arch["family"] == "mlp" else "channels"
                notes.append(f"step {number}: structured prune {step.amount:g}: {shape} {before.get(shape)} -> "
                             f"{arch[shape]}, validation accuracy {accuracy(model, data.x_val, data.y_val):.4f}")
            else:
                model, achieved = pruning.unstructured(model, step.amount, step.skip_layers)
                notes.append(f"step {number}: unstructured prune {step.amount:g}: sparsity {achieved:.4f}, "
                             f"validation accuracy {accuracy(model, data.x_val, data.y_val):.4f}")
            if step.finetune_epochs:
                result = pruning.finetune(model, data, step.finetune_epochs, seed=seed, after_epoch=after_epoch)
                notes.append(f"step {number}: fine-tuned {result.epochs} epochs, validation accuracy "
                             f"{result.val_accuracy:.4f}")
        elif isinstance(step, DistillStep):
            student, spec = build_student(step, input_dim=input_dim, num_classes=num_classes)
            model = distill(model, student, data, temperature=step.temperature, alpha=step.alpha,
                            epochs=step.epochs, lr=step.learning_rate, seed=seed, after_epoch=after_epoch)
            arch = spec
            notes.append(f"step {number}: distilled into {spec} (T={step.temperature:g}, alpha={step.alpha:g}, "
                         f"{step.epochs} epochs), validation accuracy {accuracy(model, data.x_val, data.y_val):.4f}")
        elif isinstance(step, QuantizeStep):
            model = _quantize(model, step, recipe.keep_sensitive_layers, data,
                              step.calibration_batches or calibration_batches, number, notes)
            arch = None
    return Compressed(model=model, arch=arch, notes=notes, sparsity=weight_sparsity(model))


def _quantize(model: nn.Module, step: QuantizeStep, keep: int, data: Split, batches: int, number: int,
              notes: list[str]) -> nn.Module:
    skip = list(step.skip_layers)
    if keep:
        ranking = layer_sensitivity(model, data.x_val, data.y_val, step.scheme, calibration_batches=batches)
        # a layer whose quantization costs no accuracy is not sensitive: keeping it in float would only cost size
        hurting = [(name, drop) for name, drop in ranking if drop > 0]
        sensitive = [name for name in most_sensitive(hurting, keep) if name not in skip]
        skip += sensitive
        ranked = ", ".join(f"{name} {drop:+.4f}" for name, drop in ranking)
        notes.append(f"step {number}: sensitivity ({step.scheme}, accuracy drop per layer): {ranked}; kept in "
                     f"float (up to {keep} with a drop > 0): {sensitive}")
    calibration = calibration_batches_of(data, batches) if step.scheme == "static_int8" or step.smoothquant else None
    quantized = quantize_step(model, step, calibration, skip)
    notes.append(f"step {number}: quantized {step.scheme}" + (f" (kept in float: {skip})" if skip else "")
                 + f", validation accuracy {accuracy(quantized, data.x_val, data.y_val):.4f}")
    return quantized


def quantize_step(model: nn.Module, step: QuantizeStep, calibration: Sequence[tuple] | None,
                  skip_layers: Sequence[str] | None = None) -> nn.Module:
    """``model`` quantized as ``step`` says (a copy); ``calibration`` is used by the schemes that calibrate."""
    from margin.compression.quantize import quantize

    return quantize(model, step.scheme, per_channel=step.per_channel,
                    skip_layers=tuple(step.skip_layers if skip_layers is None else skip_layers),
                    calibration=calibration, group_size=step.group_size)


def apply_encoder_recipe(model: nn.Module, family: str, recipe: Recipe,
                         calibration: Sequence[tuple]) -> Compressed:
    """Validate ``recipe`` for the encoder ``family`` (quantize steps only) and run it on a copy of ``model``.
    A ``smoothquant`` step calibrates on ``calibration`` (batches of the model's positional inputs)."""
    validate(recipe, family=family)
    notes = []
    for number, step in enumerate(recipe.steps, start=1):
        model = quantize_step(model, step, calibration if step.smoothquant else None)
        notes.append(f"step {number}: quantized {step.scheme}"
                     + (f", SmoothQuant calibrated on {len(calibration)} batches" if step.smoothquant else ""))
    return Compressed(model=model, arch=None, notes=notes, sparsity=weight_sparsity(model))
