"""What a compression run will cost, before it runs.

A run makes one variant per candidate recipe. Each variant costs a fixed part (apply the quantization, script and
serialize it, measure quality and latency, register it) plus, for recipes that train (fine-tuning after pruning,
distillation), the training work in *sample-parameters* (training rows × epochs × the source's parameters — the
teacher's forward pass dominates distillation of these small students). The worker records both after every run:
the fixed seconds per variant and the training throughput, per family and device class; the estimate is the median
of the recent runs' figures with a margin (×0.8–×1.25), or, with no history, a documented first guess with a wide
range (×0.25–×4). A ``minilm`` source's parameters are counted from its BERT config's sizes (no model is built at
submit), and its variants (quantize steps only) never train.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from margin.common.costs import PriceCatalog, run_cost
from margin.common.jobs import JobStore
from margin.compression import minilm
from margin.compression.recipe import ONNX_FAMILY
from margin.modelzoo import sizes

# First guesses (measured once on the 2-core CPU VM for the digits MLP/CNN): fixed seconds per variant and
# training throughput in sample-parameters per second. MiniLM-L6 variants (quantize, trace, encode the held-out
# sentences, time batch 1 and 32, upload) take longer; its guess is per family.
FIRST_GUESS_SECONDS_PER_VARIANT = 6.0
FIRST_GUESS_SECONDS_BY_FAMILY = {minilm.FAMILY: 20.0, ONNX_FAMILY: 10.0}
FIRST_GUESS_WORK_PER_S = 1.0e9
FIRST_GUESS_RANGE = (0.25, 4.0)
HISTORY_MARGIN = (0.8, 1.25)
HISTORY_PRECISION = "compression"  # the throughput history's precision column marks compression runs
TRAIN_SHARE = 0.8                  # the worker's split: 80 % of the rows train, 20 % are held out


def source_parameters(arch: dict) -> int:
    """The source's parameters, from its architecture alone (nothing is built or downloaded): an ONNX source's are
    guessed from its file size (fp32 weights dominate an exported model's bytes)."""
    if arch["family"] == minilm.FAMILY:
        return minilm.encoder_parameters(arch.get("config"))
    if arch["family"] == ONNX_FAMILY:
        return int(arch.get("size_bytes", 0)) // 4
    return sizes.parameter_count(arch)


def history_key(arch: dict) -> str:
    """Which runs' history estimates this source: its family's; an ONNX source's, per power-of-two size in MiB (the
    time to quantize and time a variant grows with the model, and ONNX sources are any size)."""
    if arch["family"] != ONNX_FAMILY:
        return arch["family"]
    mib = max(1.0, int(arch.get("size_bytes", 0)) / (1 << 20))
    return f"{ONNX_FAMILY}:{1 << math.ceil(math.log2(mib))}MiB"


def variant_work(recipe: dict, train_rows: int, params: int) -> float:
    """Sample-parameters of the training a recipe does (0 for quantization alone)."""
    epochs = 0
    for step in recipe.get("steps", []):
        for name, body in step.items():
            if name == "prune":
                epochs += int(body.get("finetune_epochs", 0) or 0)
            elif name == "distill":
                epochs += int(body.get("epochs", 0) or 0)
    return float(epochs * train_rows * params)


def measured_rates(variants: Sequence[tuple[float, float]], fixed_seconds: float) -> tuple[float, float]:
    """(training sample-parameters per second, fixed seconds per variant) from one run's ``(seconds, work)`` per
    variant. The fixed part is the median time of the variants that did not train, or ``fixed_seconds`` (what
    measuring the source took) when all trained; the rate is 0 when no variant trained."""
    plain = [s for s, work in variants if work == 0]
    fixed = statistics.median(plain) if plain else fixed_seconds
    trained = [(s, work) for s, work in variants if work > 0]
    training_s = sum(max(s - fixed, 1e-3) for s, _ in trained)
    return (sum(work for _, work in trained) / training_s if trained else 0.0), fixed


class CompressionEstimator:
    def __init__(self, store: JobStore, catalog: PriceCatalog):
        self._store, self._catalog = store, catalog

    def estimate(self, arch: dict, rows: int, candidates: Sequence[dict], device_class: str) -> dict:
        params = source_parameters(arch)
        train_rows = max(1, round(rows * TRAIN_SHARE))
        work = sum(variant_work(c, train_rows, params) for c in candidates)
        n = len(candidates)
        key = history_key(arch)
        history = self._store.throughput_history(key, device_class, HISTORY_PRECISION, 1)
        rates = [r for r, _ in history if r > 0]
        if history:
            fixed = [f for _, f in history]
            rate = statistics.median(rates) if rates else FIRST_GUESS_WORK_PER_S
            seconds = n * statistics.median(fixed) + work / rate
            low = (n * min(fixed) + work / (max(rates) if rates else rate)) * HISTORY_MARGIN[0]
            high = (n * max(fixed) + work / (min(rates) if rates else rate)) * HISTORY_MARGIN[1]
            basis = (f"history: {len(history)} run(s) of {key} on {device_class}, median "
                     f"{statistics.median(fixed):.2f}s per variant"
                     + (f" + {rate:.3g} sample-params/s of fine-tuning" if rates else ""))
        else:
            per_variant = FIRST_GUESS_SECONDS_BY_FAMILY.get(arch["family"], FIRST_GUESS_SECONDS_PER_VARIANT)
            seconds = n * per_variant + work / FIRST_GUESS_WORK_PER_S
            low, high = seconds * FIRST_GUESS_RANGE[0], seconds * FIRST_GUESS_RANGE[1]
            basis = (f"first guess (no history for {key} on {device_class}): "
                     f"{per_variant:.0f}s per variant + fine-tuning at "
                     f"{FIRST_GUESS_WORK_PER_S:.0e} sample-params/s, range ×{FIRST_GUESS_RANGE[0]}–"
                     f"×{FIRST_GUESS_RANGE[1]}")
        cost = {s: run_cost(self._catalog, device_class, s / 3600.0) for s in (low, seconds, high)}
        return {"low_micros": cost[low].total_micros, "expected_micros": cost[seconds].total_micros,
                "high_micros": cost[high].total_micros, "seconds": seconds, "seconds_low": low,
                "seconds_high": high, "device_class": device_class, "basis": basis}

    def record(self, family: str, device_class: str, variants: Sequence[tuple[float, float]],
               fixed_seconds: float) -> None:
        if variants:
            rate, fixed = measured_rates(variants, fixed_seconds)
            self._store.record_throughput(family, device_class, HISTORY_PRECISION, 1, rate, fixed)
