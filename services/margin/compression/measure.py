"""Measure a (compressed) module: serialized size, parameters, sparsity, latency, throughput and accuracy.

Latency is taken on CPU under ``torch.inference_mode`` after a warm-up, with a fixed intra-op thread count (one by
default, so numbers are comparable between machines and variants); the count used is recorded in the result. A
batch is one tensor (a classifier's features) or a tuple of them (an encoder's ``(input_ids, attention_mask)``),
called as ``module(*batch)``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeAlias

import numpy as np
import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from margin.common.errors import InvalidArgument

Batch: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Measurement:
    size_bytes: int  # serialized TorchScript
    parameters: int  # logical weights and biases; packed/quantized weights count as the elements they hold
    sparsity: float  # fraction of zero weights among Linear/Conv/Embedding weights
    latency_p50_ms_batch1: float
    latency_p99_ms_batch1: float
    latency_p50_ms_batch32: float
    latency_p99_ms_batch32: float
    throughput_per_second: float  # samples/s at batch 32
    threads: int  # torch intra-op threads used for the latency runs
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, size_bytes: int, parameters: int, sparsity: float, batch1_ms: np.ndarray, batch32_ms: np.ndarray,
           *, batch: int, threads: int) -> Measurement:
        """The figures from the timed calls at batch 1 and at ``batch`` (32)."""
        return cls(size_bytes=size_bytes, parameters=parameters, sparsity=sparsity,
                   latency_p50_ms_batch1=float(np.percentile(batch1_ms, 50)),
                   latency_p99_ms_batch1=float(np.percentile(batch1_ms, 99)),
                   latency_p50_ms_batch32=float(np.percentile(batch32_ms, 50)),
                   latency_p99_ms_batch32=float(np.percentile(batch32_ms, 99)),
                   throughput_per_second=float(batch * len(batch32_ms) / (batch32_ms.sum() / 1000.0)),
                   threads=threads, repeats=len(batch1_ms))


def measure(module: nn.Module, example_batch1: Batch, example_batch32: Batch, *, repeats: int = 50,
            warmup: int = 5, threads: int | None = 1) -> Measurement:
    """Size, parameter count, sparsity, and latency at batch 1 and 32 (``repeats`` timed calls each).

    ``threads=None`` keeps the process's current thread count.
    """
    if repeats < 1 or warmup < 0:
        raise InvalidArgument("repeats must be >= 1 and warmup >= 0")
    from margin.compression.quantize import serialized_size

    example_batch1, example_batch32 = _args(example_batch1), _args(example_batch32)
    size = serialized_size(module, example_batch1)
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise InvalidArgument(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        device = _device(module)
        b1 = _latencies_ms(module, tuple(t.to(device) for t in example_batch1), repeats, warmup)
        b32 = _latencies_ms(module, tuple(t.to(device) for t in example_batch32), repeats, warmup)
    finally:
        torch.set_num_threads(previous)
    return Measurement.of(int(size), parameter_count(module), sparsity(module), b1, b32,
                          batch=example_batch32[0].shape[0], threads=used)


def _args(batch: Batch) -> tuple[torch.Tensor, ...]:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _sync(batch: tuple[torch.Tensor, ...]) -> None:
    if batch[0].is_cuda:
        torch.cuda.synchronize(batch[0].device)


def _latencies_ms(module: nn.Module, batch: tuple[torch.Tensor, ...], repeats: int, warmup: int) -> np.ndarray:
    was_training = getattr(module, "training", False)
    module.eval()

    def call() -> None:
        module(*batch)
        _sync(batch)
    try:
        with torch.inference_mode():
            return time_calls(call, repeats, warmup)
    finally:
        module.train(was_training)


def time_calls(call: Callable[[], object], repeats: int, warmup: int) -> np.ndarray:
    """Milliseconds of each of ``repeats`` calls of ``call``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter_ns()
        call()
        times[i] = (time.perf_counter_ns() - start) / 1e6
    return times


def _device(module: nn.Module) -> torch.device:
    """Where the module's weights live (inputs are moved there); CPU when it has none."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def accuracy(module: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
             batch_size: int = 512) -> float:
    """Top-1 accuracy of ``module`` (eval mode, inference mode) on ``x`` / integer labels ``y``."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if len(x) != len(y) or len(x) == 0:
        raise InvalidArgument(f"accuracy needs as many labels as rows (> 0); got {len(x)} and {len(y)}")
    was_training = getattr(module, "training", False)
    module.eval()
    device = _device(module)
    correct = 0
    try:
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                logits = module(x[i:i + batch_size].to(device))
                correct += int((logits.float().argmax(1).cpu() == y[i:i + batch_size]).sum())
    finally:
        module.train(was_training)
    return correct / len(x)


def _dense(tensor) -> torch.Tensor | None:
    """A plain float tensor with the values of a (possibly quantized or subclassed) weight, or None."""
    if not isinstance(tensor, torch.Tensor):
        return None
    try:
        if tensor.is_quantized:
            return tensor.dequantize()
        if type(tensor) is not torch.Tensor and type(tensor) is not nn.Parameter and hasattr(tensor, "dequantize"):
            return tensor.dequantize()  # e.g. torchao's affine-quantized tensor subclasses
        return tensor.detach()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _module_tensors(module: nn.Module, names: tuple[str, ...]) -> list[torch.Tensor]:
    """``module.<name>`` for each name, calling it when it is a method (quantized modules expose ``weight()``)."""
    out = []
    for name in names:
        try:
            value = getattr(module, name, None)
            if callable(value) and not isinstance(value, torch.Tensor):
                value = value()
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            continue
        if isinstance(value, torch.Tensor):
            out.append(value)
    return out


def _weight(module: nn.Module) -> torch.Tensor | None:
    """The dense float weight of a Linear / Conv / Embedding layer, float or quantized, or None for other modules."""
    if hasattr(module, "dequantized_weight"):  # quantize.Int8WeightOnlyLinear
        try:
            return module.dequantized_weight().detach()
        except (RuntimeError, TypeError):
            return None
    if not isinstance(module, _WEIGHTED):
        return None
    weights = _module_tensors(module, ("weight",))
    return _dense(weights[0]) if weights else None


def parameter_count(module: nn.Module) -> int:
    """Trainable-parameter count; quantized modules, whose packed weights are not ``Parameter``s, count the elements
    of their weight and bias, so a quantized model reports the same count as its float original."""
    total = 0
    for sub in module.modules():
        params = list(sub.parameters(recurse=False))
        total += sum(p.numel() for p in params)
        if not params:
            weight = _weight(sub)
            if weight is not None:
                total += weight.numel() + sum(t.numel() for t in _module_tensors(sub, ("bias",)))
    return total


# torch.ao's quantized modules (static, dynamic, fused, and subclasses of them) expose ``weight()`` / ``bias()``
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag, nnq.Linear, nnq.Conv1d,
             nnq.Conv2d, nnq.Conv3d, nnq.Embedding, nnq.EmbeddingBag)


def sparsity(module: nn.Module) -> float:
    """Fraction of exactly-zero weights among the weights of Linear / Conv / Embedding layers (float or quantized;
    biases and normalization parameters are left out)."""
    zeros = total = 0
    for sub in module.modules():
        weight = _weight(sub)
        if weight is not None:
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0
