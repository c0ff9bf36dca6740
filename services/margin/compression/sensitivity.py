"""Per-layer quantization sensitivity: quantize one layer at a time (the rest stay fp32) and measure the drop."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from margin.common.errors import InvalidArgument
from margin.compression.measure import accuracy

# The layer types each scheme quantizes (torch.ao's dynamic quantization has no conv kernels, and so on).
_LINEAR = (nn.Linear,)
_LINEAR_CONV = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EMBEDDING = (nn.Embedding, nn.EmbeddingBag)
LAYER_TYPES: dict[str, tuple[type, ...]] = {
    "dynamic_int8": _LINEAR, "weight_only_int8": _LINEAR, "torchao_int8": _LINEAR, "torchao_int4": _LINEAR,
    "static_int8": _LINEAR_CONV, "fp16": _LINEAR_CONV, "bf16": _LINEAR_CONV, "embedding_int8": _EMBEDDING,
}


def quantizable_layers(model: nn.Module, scheme: str) -> list[str]:
    """Names (as in ``named_modules()``) of the layers ``scheme`` quantizes, in model order."""
    if scheme not in LAYER_TYPES:
        raise InvalidArgument(f"unknown quantization scheme {scheme!r}; known: {sorted(LAYER_TYPES)}")
    return [name for name, m in model.named_modules() if name and type(m) in LAYER_TYPES[scheme]]


def layer_sensitivity(model: nn.Module, data_x: np.ndarray, data_y: np.ndarray, scheme: str = "dynamic_int8", *,
                      calibration_batches: int = 8, batch_size: int = 32) -> list[tuple[str, float]]:
    """``[(layer_name, quality_drop), ...]`` for every layer ``scheme`` quantizes, most sensitive first.

    ``quality_drop`` is the accuracy on ``data_x`` / ``data_y`` (held-out data) of the float model minus that of
    the model with only this layer quantized; it can be negative. Ties keep model order. ``model`` is not changed.
    Static schemes calibrate on the first ``calibration_batches`` batches of ``data_x``.
    """
    from margin.compression.quantize import quantize

    layers = quantizable_layers(model, scheme)
    x = torch.as_tensor(data_x)
    calibration = None
    if scheme == "static_int8":
        calibration = [(x[i:i + batch_size],) for i in range(0, min(len(x), calibration_batches * batch_size),
                                                                 batch_size)]
    baseline = accuracy(model, data_x, data_y)
    results = []
    for layer in layers:
        others = [name for name in layers if name != layer]
        quantized = quantize(model, scheme, skip_layers=others, calibration=calibration)
        results.append((layer, baseline - accuracy(quantized, data_x, data_y)))
    return sorted(results, key=lambda item: -item[1])


def most_sensitive(results: list[tuple[str, float]], k: int) -> list[str]:
    """The names of the ``k`` most sensitive layers of a :func:`layer_sensitivity` result."""
    if not isinstance(k, int) or k < 0:
        raise InvalidArgument(f"k must be a non-negative integer, got {k!r}")
    return [name for name, _ in sorted(results, key=lambda item: -item[1])[:k]]
