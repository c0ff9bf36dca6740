"""Bring your own model: MiniLM-L6 exported to ONNX by its team, uploaded, compressed by AutoCompress and served.

The ``byom`` part of ``bench/compression_bench.py``. Starts the whole local cluster (``margin up`` in a temp
``MARGIN_HOME``, as ``bench/costtruth_bench.py`` does; always stopped at the end) and, as the demo tenant:

1. exports ``SentenceEncoder`` over MiniLM-L6 to ONNX (TorchScript exporter, opset 17, batch and sequence axes
   dynamic) and uploads it as model ``minilm-onnx`` without a signature (the registry derives it), with a
   ``dataset-npz`` version of ``minilm-sentences``: the held-out sentences tokenized and padded to the longest;
2. runs AutoCompress over gRPC (floor cosine >= 0.99, objective min cost per million) on ONNX Runtime's int8
   variants — dynamic per-channel, dynamic per-tensor, optimize + static QDQ — and int4 weight-only, watches it to
   the end and records every ``VariantReport`` and the baseline;
3. times here, on one thread, interleaved, on the same inputs: fp32 TorchScript, the built-in TorchScript int8
   variant (``emb-int8+int8-dynamic``, what AutoCompress picks for a registered MiniLM), fp32 ONNX and every ONNX
   variant downloaded from the registry; and scores each by the cosine of its embeddings to fp32's;
4. deploys the fp32 ONNX source and the job's chosen variant through the gateway, drives both with the same
   requests (batches of 8 sentences, alternated), waits past a metering interval and reads each deployment's
   allocated serving cost from the ledger: cost per million embeddings as served, fp32 against the variant.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from compression_bench import interleaved_latency, money, seconds, serve_form, short, variant_row, wait_ended
from rich.console import Console
from rich.table import Table

SOURCE_MODEL = "minilm-onnx"
DATASET_MODEL = "minilm-sentences"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "embedding"
FLOOR = 0.99  # AutoCompress floor: mean cosine to the source's embeddings
# ONNX Runtime's recipes to compare (by name, from the built-in ONNX search space).
CANDIDATES = ("ort-int8-dynamic-per-channel", "ort-int8-dynamic", "ort-optimized+int8-static-qdq",
              "ort-int4-weight-only")
TORCHSCRIPT_INT8 = "emb-int8+int8-dynamic"  # the built-in MiniLM recipe AutoCompress picks for a registered MiniLM
GOALS = {"ratio": 3.5, "mean_cos": 0.99, "min_cos": 0.98, "speedup_b32_vs_torchscript": 2.0}
SERVED_GOAL = 3.0  # fp32 ONNX's served cost per million embeddings / the chosen variant's
SERVE_BATCH = 8
GOAL_LABELS = {"ratio": "R", "mean_cos": "mean cos", "min_cos": "min cos", "speedup_b32_vs_torchscript": "speed"}


# -- the team's model and data --------------------------------------------------------------------------------------
def export_onnx(encoder: torch.nn.Module, tokenizer) -> bytes:
    """``encoder`` (a SentenceEncoder) as ONNX: (input_ids INT64, attention_mask INT64) -> embedding FP32, opset 17,
    batch and sequence axes dynamic; the TorchScript exporter (``dynamo=False``), as a team would export it."""
    from margin.compression.minilm import example_inputs

    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            OUTPUT: {0: "batch"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder.eval(), example_inputs(tokenizer), buffer, dynamo=False, opset_version=17,
                          input_names=list(INPUTS), output_names=[OUTPUT], dynamic_axes=axes)
    return buffer.getvalue()


def sentences_npz(tokenizer, sentences: list[str]) -> tuple[bytes, int]:
    """The sentences tokenized together, so padded to the longest: an ``.npz`` of ``input_ids`` and
    ``attention_mask`` (int64), one array per model input; and that padded length."""
    from margin.compression.minilm import tokenize

    ids, mask = tokenize(tokenizer, sentences)
    buffer = io.BytesIO()
    np.savez(buffer, input_ids=ids.numpy(), attention_mask=mask.numpy())
    return buffer.getvalue(), int(ids.shape[1])


def upload_source(registry, onnx_blob: bytes, dataset: bytes) -> tuple:
    """Upload the ONNX model (no signature) and the dataset as new versions; (source version, dataset version)."""
    from margin.v1 import registry_pb2

    registry.ensure_model(SOURCE_MODEL, description="MiniLM-L6 exported to ONNX by its team (bring your own)")
    source = registry.upload_bytes(onnx_blob, registry_pb2.UploadMetadata(
        model=SOURCE_MODEL, format=registry_pb2.ARTIFACT_FORMAT_ONNX))
    registry.ensure_model(DATASET_MODEL, description="held-out sentences, tokenized for minilm-onnx")
    data = registry.upload_bytes(dataset, registry_pb2.UploadMetadata(
        model=DATASET_MODEL, format=registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ))
    return source, data


# -- AutoCompress ---------------------------------------------------------------------------------------------------
def candidate_recipes() -> list:
    """:data:`CANDIDATES` as ``Recipe`` protos, from the built-in ONNX search space."""
    from google.protobuf import json_format
    from margin.compression.core import ONNX_SEARCH_SPACE
    from margin.v1 import compression_pb2

    by_name = {c["name"]: c for c in ONNX_SEARCH_SPACE}
    return [json_format.ParseDict(by_name[name], compression_pb2.Recipe()) for name in CANDIDATES]


def auto_compress(conn, source, dataset, timeout: float, console: Console):
    """Submit AutoCompress, follow its events on a status line until it ends, and return the finished job."""
    from margin.v1 import common_pb2, compression_pb2, compression_pb2_grpc

    stub = compression_pb2_grpc.CompressionStub(conn.channel)
    job = stub.AutoCompress(compression_pb2.AutoCompressRequest(
        source=common_pb2.VersionRef(model=source.model, number=source.number),
        floor=common_pb2.QualityFloor(metric="cosine", minimum=FLOOR),
        objective=compression_pb2.OBJECTIVE_MIN_COST_PER_MILLION,
        eval_dataset=common_pb2.DatasetRef(registry=common_pb2.VersionRef(model=dataset.model,
                                                                          number=dataset.number)),
        candidates=candidate_recipes()), metadata=conn.metadata, timeout=60)
    began = time.monotonic()
    with console.status(f"AutoCompress {job.id}: queued") as status:
        events = stub.WatchCompressionJob(compression_pb2.WatchCompressionJobRequest(id=job.id),
                                          metadata=conn.metadata, timeout=timeout)
        for event in events:
            what = f"{event.stage} {event.step}/{event.total_steps}" if event.total_steps else event.stage
            status.update(f"AutoCompress {job.id}: {common_pb2.JobState.Name(event.state)} {what} "
                          f"{event.message[:80]} ({time.monotonic() - began:.0f} s)")
            if event.variant.recipe.name:
                v = event.variant
                console.print(f"  variant {v.recipe.name}: cosine {v.quality:.4f} (min {v.quality_min:.4f}), R "
                              f"{v.compression_ratio:.2f}, b32 p50 {v.latency_p50_ms_batch32:.1f} ms")
    return wait_ended(lambda: stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=job.id),
                                                     metadata=conn.metadata, timeout=30),
                      max(timeout - (time.monotonic() - began), 30), f"compression job {job.id}")


def worker_row(v, index: int, chosen: int) -> dict:
    """compression_bench's record of a VariantReport, with its quality named as the metric it is (cosine)."""
    row = variant_row(v, index, chosen)
    row["cosine"] = row.pop("accuracy")
    row.pop("delta_points")
    row["cosine_min"] = v.quality_min
    row["chosen"] = index >= 0 and row["chosen"]  # the baseline (index -1) is never the choice
    return row


# -- timing here ----------------------------------------------------------------------------------------------------
@contextmanager
def torch_threads(n: int):
    """torch on ``n`` intra-op threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class OnnxForm:
    """An ONNX file in a one-thread ONNX Runtime session, called like the TorchScript encoder."""

    def __init__(self, blob: bytes):
        from margin.compression.onnx_task import session

        self.size = len(blob)
        self.session = session(blob, 1)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


def onnx_embeddings(form: OnnxForm, tokenizer, sentences: list[str], batch_size: int = 32) -> np.ndarray:
    """``form``'s embeddings of ``sentences``, batched and padded as ``minilm.encode`` does for TorchScript."""
    from margin.compression.minilm import tokenize

    return np.concatenate([form(*tokenize(tokenizer, sentences[i:i + batch_size]))
                           for i in range(0, len(sentences), batch_size)])


def torchscript_forms(encoder: torch.nn.Module, tokenizer) -> list[tuple[str, str, object, int]]:
    """(name, kind, reloaded TorchScript, file bytes) of fp32 and of the built-in int8 recipe, as the worker makes
    it (``apply_encoder_recipe``)."""
    from margin.compression.apply import apply_encoder_recipe
    from margin.compression.core import MINILM_SEARCH_SPACE
    from margin.compression.minilm import FAMILY
    from margin.compression.recipe import Recipe

    recipe = Recipe.from_dict(next(c for c in MINILM_SEARCH_SPACE if c["name"] == TORCHSCRIPT_INT8))
    int8 = apply_encoder_recipe(encoder, FAMILY, recipe, calibration=[]).model
    return [("fp32 TorchScript", "torchscript", *serve_form(encoder, tokenizer)),
            (f"{TORCHSCRIPT_INT8} TorchScript", "torchscript", *serve_form(int8, tokenizer))]


def measure_here(forms: list[tuple[str, str, object, int]], tokenizer, held_out: list[str],
                 args: argparse.Namespace) -> list[dict]:
    """Per form (the first of each format is its fp32): mean/min cosine of its embeddings of every held-out sentence
    to its format's fp32 (and the mean to fp32 TorchScript), R = its format's fp32 file bytes / its bytes, latency at
    batch 1 and 32 (interleaved rounds, after warm-up), speed-ups against fp32 TorchScript and fp32 ONNX, goals."""
    from margin.compression.minilm import cosines, encode, tokenize

    embeddings = [onnx_embeddings(f, tokenizer, held_out) if kind == "onnx" else encode(f, tokenizer, held_out)
                  for _, kind, f, _ in forms]
    fp32 = {kind: next(i for i, (_, k, _, _) in enumerate(forms) if k == kind) for _, kind, _, _ in forms}
    batches = {1: tokenize(tokenizer, [args.batch1_sentence]), 32: tokenize(tokenizer, held_out[:32])}
    latency = interleaved_latency([f for _, _, f, _ in forms], batches, args)
    rows = []
    for (name, kind, _, size), emb, lat in zip(forms, embeddings, latency, strict=True):
        cos = cosines(embeddings[fp32[kind]], emb)
        rows.append({"variant": name, "format": kind, "size_bytes": size,
                     "ratio": forms[fp32[kind]][3] / size, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                     "mean_cos_vs_fp32_torchscript": float(cosines(embeddings[0], emb).mean()), **lat})
    for row in rows:
        row["speedup_b32_vs_torchscript"] = rows[0]["batch32"]["p50_ms"] / row["batch32"]["p50_ms"]
        row["speedup_b32_vs_onnx"] = rows[fp32["onnx"]]["batch32"]["p50_ms"] / row["batch32"]["p50_ms"]
        row["goals_missed"] = [k for k, v in GOALS.items() if row[k] < v]
        row["goal_met"] = not row["goals_missed"]
    return rows


# -- serving --------------------------------------------------------------------------------------------------------
def predict_requests(version, tokenizer, held_out: list[str], count: int) -> list:
    """``count`` PredictRequests to ``version``: batches of :data:`SERVE_BATCH` held-out sentences in turn, each
    tokenized and padded to its longest, as a client sends them."""
    from margin.compression.minilm import tokenize
    from margin.v1 import common_pb2, inference_pb2

    starts = [(i * SERVE_BATCH) % (len(held_out) - SERVE_BATCH + 1) for i in range(count)]
    out = []
    for start in starts:
        tensors = tokenize(tokenizer, held_out[start:start + SERVE_BATCH])
        out.append(inference_pb2.PredictRequest(version=version, inputs=[
            common_pb2.Tensor(name=name, dtype=common_pb2.DTYPE_INT64, shape=t.shape, raw=t.numpy().tobytes())
            for name, t in zip(INPUTS, tensors, strict=True)]))
    return out


class Load:
    """Sends requests on a thread pool, counting those sent and failed per deployment."""

    def __init__(self, predict: Callable, pool: ThreadPoolExecutor):
        self.predict, self.pool = predict, pool
        self.sent: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _call(self, name: str, request) -> None:
        try:
            self.predict(request)
            ok = True
        except Exception as err:  # counted and shown: a failed request is a finding, not a crash
            ok = False
            with self._lock:
                self.errors.append(f"{name}: {err}"[:300])
        with self._lock:
            self.sent[name] = self.sent.get(name, 0) + 1
            self.failed[name] = self.failed.get(name, 0) + (not ok)

    def run(self, name: str, requests: list) -> None:
        """Send ``requests`` to deployment ``name`` and wait for all of them."""
        for future in [self.pool.submit(self._call, name, r) for r in requests]:
            future.result()


def deploy(stub, md, version, console: Console):
    from margin.v1 import inference_pb2

    d = stub.Deploy(inference_pb2.DeployRequest(version=version), metadata=md, timeout=600)
    if d.state != inference_pb2.DEPLOYMENT_STATE_READY:
        raise RuntimeError(f"deployment of {version.model} v{version.number} is {d.state}: {d.message}")
    console.print(f"  deployed {version.model} v{version.number} as {d.name}: capacity {d.capacity_rps:.1f} rps, "
                  f"p50 {d.latency_p50_ms:.1f} ms at batch 1")
    return d


def serving_ledger(budgets, md, since: float, until: float) -> dict[str, dict]:
    """The tenant's serving entries dated in (since, until], summed per deployment: allocated µ$ and requests."""
    from margin.common.protoconv import timestamp
    from margin.v1 import budget_pb2

    window = {"since": timestamp(dt.datetime.fromtimestamp(since + 0.001, dt.UTC)),
              "until": timestamp(dt.datetime.fromtimestamp(until + 0.001, dt.UTC))}
    per: dict[str, dict] = {}
    token = ""
    while True:
        page = budgets.ListLedger(budget_pb2.ListLedgerRequest(
            page_size=1000, page_token=token, category=budget_pb2.SPEND_CATEGORY_SERVING, **window), metadata=md)
        for e in page.entries:
            line = per.setdefault(e.deployment, {"allocated_micros": 0, "gateway_requests": 0, "entries": 0})
            line["allocated_micros"] += e.amount.micros
            line["gateway_requests"] += e.quantity
            line["entries"] += 1
        token = page.next_page_token
        if not token:
            return per


def serve_and_bill(services: dict, key: str, versions: dict, tokenizer, held_out: list[str],
                   args: argparse.Namespace, console: Console) -> dict:
    """Deploy each of ``versions`` (label → VersionRef), drive them with the same requests, alternated, over whole
    metering intervals, and read what the ledger allocated to each deployment."""
    from margin.cluster import processes
    from margin.sdk.channel import connect
    from margin.v1 import budget_pb2_grpc, inference_pb2, inference_pb2_grpc

    interval = processes.LOCAL_FLEET_INTERVAL_S
    gateway = connect(services["inference"]["address"], key)
    budget = connect(services["budget"]["address"], key)
    try:
        stub = inference_pb2_grpc.InferenceStub(gateway.channel)
        deployed = {label: deploy(stub, gateway.metadata, v, console) for label, v in versions.items()}
        requests = {label: predict_requests(v, tokenizer, held_out, args.byom_requests)
                    for label, v in versions.items()}
        chunk = max(args.byom_requests // args.byom_alternations, 1)
        with ThreadPoolExecutor(args.byom_concurrency) as pool:
            load = Load(lambda r: stub.Predict(r, metadata=gateway.metadata, timeout=60), pool)
            for label in versions:  # warm both up, outside the window
                load.run(deployed[label].name, requests[label][:args.byom_concurrency])
            load.sent.clear()
            load.failed.clear()
            start = (int(time.time() / interval) + 1) * interval
            time.sleep(max(0.0, start - time.time()))
            order = list(versions)
            with console.status(f"serving {args.byom_requests} requests of {SERVE_BATCH} sentences to each of "
                                f"{', '.join(order)} (concurrency {args.byom_concurrency}), alternated"):
                for i, begin in enumerate(range(0, args.byom_requests, chunk)):
                    for label in (order if i % 2 == 0 else order[::-1]):
                        load.run(deployed[label].name, requests[label][begin:begin + chunk])
            load_s = time.time() - start
            end = (int(time.time() / interval) + 1) * interval
        with console.status("billing the last metering interval…"):
            time.sleep(max(0.0, end - time.time()) + interval + 3)
        ledger = serving_ledger(budget_pb2_grpc.BudgetsStub(budget.channel), budget.metadata, start, end)
        listed = {d.name: d for d in stub.ListDeployments(inference_pb2.ListDeploymentsRequest(),
                                                          metadata=gateway.metadata).deployments}
    finally:
        gateway.close()
        budget.close()
    served = {}
    for label, d in deployed.items():
        line = ledger.get(d.name, {"allocated_micros": 0, "gateway_requests": 0, "entries": 0})
        embeddings = line["gateway_requests"] * SERVE_BATCH
        served[label] = {"deployment": d.name, "version": {"model": d.version.model, "number": d.version.number},
                         "sent": load.sent.get(d.name, 0), "failed": load.failed.get(d.name, 0), **line,
                         "embeddings": embeddings,
                         "cost_per_million_embeddings_micros": line["allocated_micros"] / embeddings * 1e6
                         if embeddings else None,
                         "deploy_capacity_rps": d.capacity_rps,
                         "served_cost_per_million_micros": listed[d.name].served_cost_per_million.micros
                         if d.name in listed else None,
                         "served_cost_source": listed[d.name].served_cost_source if d.name in listed else None}
    return {"window": {"start": start, "end": end, "seconds": end - start, "load_s": load_s},
            "metering_interval_s": interval, "requests_per_deployment": args.byom_requests,
            "batch": SERVE_BATCH, "concurrency": args.byom_concurrency, "alternations": args.byom_alternations,
            "deployments": served, "errors": load.errors[:5]}


# -- the part -------------------------------------------------------------------------------------------------------
@contextmanager
def local_cluster(console: Console, keep: bool):
    """The whole local cluster in a temp MARGIN_HOME (as costtruth_bench starts it); always stopped on the way out,
    and the previous MARGIN_HOME put back."""
    home = Path(tempfile.mkdtemp(prefix="margin-byom-bench-"))
    previous = os.environ.get("MARGIN_HOME")
    os.environ["MARGIN_HOME"] = str(home)
    from margin.cluster import local, state  # after MARGIN_HOME: the cluster lives there

    try:
        t0 = time.monotonic()
        with console.status("starting the local cluster…"):
            cluster = local.up()
        console.print(f"byom: local cluster up in {time.monotonic() - t0:.1f} s in {home}")
        yield cluster["services"], state.demo_key_path().read_text().strip()
    finally:
        local.down()
        if previous is None:
            os.environ.pop("MARGIN_HOME", None)
        else:
            os.environ["MARGIN_HOME"] = previous
        if keep:
            console.print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def run_byom(args: argparse.Namespace, console: Console) -> dict:
    from margin.compression.minilm import SentenceEncoder, held_out_sentences, load_minilm
    from margin.sdk.channel import connect
    from margin.sdk.registry import RegistryClient
    from margin.v1 import common_pb2

    model, tokenizer = load_minilm()
    encoder = SentenceEncoder(model).eval()
    held_out = held_out_sentences()
    onnx_blob = export_onnx(encoder, tokenizer)
    dataset, seq_len = sentences_npz(tokenizer, held_out)
    console.print(f"byom: MiniLM-L6 as ONNX {len(onnx_blob):,} bytes; dataset {len(held_out)} sentences padded to "
                  f"{seq_len} tokens, {len(dataset):,} bytes")
    with local_cluster(console, args.keep) as (services, key):
        registry_conn = connect(services["registry"]["address"], key)
        compression_conn = connect(services["compression"]["address"], key)
        try:
            registry = RegistryClient(registry_conn)
            source, data = upload_source(registry, onnx_blob, dataset)
            console.print(f"  uploaded {source.model} v{source.number} (signature derived: "
                          f"{[(i.name, i.shape) for i in source.signature.inputs]}), {data.model} v{data.number}")
            t0 = time.time()
            job = auto_compress(compression_conn, source, data, args.job_timeout, console)
            client_wall_s = time.time() - t0
            if common_pb2.JobState.Name(job.state) != "JOB_STATE_SUCCEEDED":
                raise RuntimeError(f"compression job {job.id} ended {common_pb2.JobState.Name(job.state)}: "
                                   f"{job.outcome}")
            console.print(f"  job {job.id}: {job.outcome}")
            worker = [worker_row(v, i, job.chosen) for i, v in enumerate(job.variants)]
            blobs = [registry.download_bytes(v.version)[1] for v in job.variants]
            with torch_threads(1):
                forms = [*torchscript_forms(encoder, tokenizer),
                         ("fp32 ONNX", "onnx", OnnxForm(onnx_blob), len(onnx_blob)),
                         *[(v.recipe.name, "onnx", OnnxForm(b), len(b)) for v, b in zip(job.variants, blobs,
                                                                                        strict=True)]]
                here = measure_here(forms, tokenizer, held_out, args)
            del forms
            serving = None
            if job.chosen >= 0:
                chosen = job.variants[job.chosen].version
                serving = serve_and_bill(services, key, {
                    "fp32 ONNX": common_pb2.VersionRef(model=source.model, number=source.number),
                    job.variants[job.chosen].recipe.name: chosen}, tokenizer, held_out, args, console)
        finally:
            registry_conn.close()
            compression_conn.close()
    return byom_result(source, data, job, worker, here, serving, {"sentences": len(held_out), "seq_len": seq_len},
                       len(onnx_blob), client_wall_s)


def byom_result(source, data, job, worker: list[dict], here: list[dict], serving: dict | None, dataset: dict,
                source_bytes: int, client_wall_s: float) -> dict:
    """The part's JSON: the job as the worker reported it, the measurements here, the served costs, the goals."""
    from margin.common.protoconv import signature_from_proto
    from margin.v1 import common_pb2

    onnx_rows = [r for r in here if r["format"] == "onnx" and r["variant"] != "fp32 ONNX"]
    met_by = [r["variant"] for r in onnx_rows if r["goal_met"]]
    best = max(onnx_rows, key=lambda r: (-len(r["goals_missed"]), r["speedup_b32_vs_torchscript"]), default=None)
    chosen = job.variants[job.chosen].recipe.name if job.chosen >= 0 else None
    headline = None
    if serving:
        source_cost = serving["deployments"]["fp32 ONNX"]["cost_per_million_embeddings_micros"]
        chosen_cost = serving["deployments"][chosen]["cost_per_million_embeddings_micros"]
        ratio = source_cost / chosen_cost if source_cost and chosen_cost else None
        headline = {"fp32_onnx_micros_per_million": source_cost, "chosen_micros_per_million": chosen_cost,
                    "ratio": ratio, "goal": SERVED_GOAL, "goal_met": bool(ratio and ratio >= SERVED_GOAL),
                    "worker_fp32_micros_per_million": job.baseline.cost_per_million.micros,
                    "worker_chosen_micros_per_million": job.variants[job.chosen].cost_per_million.micros}
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 as SentenceEncoder, exported with torch.onnx.export "
                 "(dynamo=False, opset 17, batch and sequence dynamic)",
        "source": {"model": source.model, "number": source.number, "size_bytes": source_bytes,
                   "signature": signature_from_proto(source.signature).to_dict()},
        "dataset": {"model": data.model, "number": data.number, "size_bytes": data.size_bytes, **dataset},
        "compression": {"job_id": job.id, "state": common_pb2.JobState.Name(job.state),
                        "floor": {"metric": "cosine", "minimum": FLOOR}, "objective": "min_cost_per_million",
                        "candidates": list(CANDIDATES), "outcome": job.outcome, "chosen": job.chosen,
                        "chosen_recipe": chosen, "cost_micros": job.cost.total.micros,
                        "currency": job.cost.total.currency,
                        "wall_s": seconds(job.end_time) - seconds(job.create_time), "client_wall_s": client_wall_s},
        "baseline": worker_row(job.baseline, -1, job.chosen),
        "worker_rows": worker,
        "here": here,
        "goals": GOALS,
        "met_by": met_by,
        "best": best["variant"] if best else None,
        "serving": serving,
        "headline": headline,
    }


# -- report ---------------------------------------------------------------------------------------------------------
def report_byom(r: dict, console: Console) -> None:
    """The part's tables: measured here next to the worker's figures, the goal line, the served costs."""
    worker = {w["recipe"]: w for w in r["worker_rows"]}
    worker["fp32 ONNX"] = r["baseline"]
    g = r["goals"]
    t = Table(title=f"Bring your own model: MiniLM-L6 as ONNX ({r['source']['size_bytes']:,} bytes), AutoCompress "
                    f"floor cosine ≥ {r['compression']['floor']['minimum']}; measured here on 1 thread, "
                    f"{r['dataset']['sentences']} held-out sentences ({r['machine']['cpu_count']} cores)",
              caption=f"here: R = the same format's fp32 file bytes / the variant's (bytes in the JSON), cosine to "
                      f"the same format's fp32 (batches of 32, each padded to its longest), p50 latency (median over "
                      f"rounds), ×TS: b32 speed-up against fp32 TorchScript. wkr: the worker's, in the job's "
                      f"VariantReport (its b1 p50 in the JSON; rows padded to {r['dataset']['seq_len']} tokens, cosine "
                      f"on its 20 % held-out rows, ONNX Runtime on 1 thread, µ$ per million inferences). Goals, one "
                      f"ONNX variant: R ≥ {g['ratio']}, mean cos ≥ {g['mean_cos']}, min cos ≥ {g['min_cos']}, b32 ≥ "
                      f"{g['speedup_b32_vs_torchscript']}× faster than fp32 TorchScript (speed)")
    for col in ("variant", "R", "mean cos", "min cos", "b1 ms", "b32 ms", "×TS", "wkr R", "wkr cos/min",
                "wkr b32 ms", "wkr µ$/M", "goals"):
        t.add_column(col, justify="left" if col in ("variant", "goals") else "right",
                     no_wrap=col not in ("variant", "goals"), max_width=20 if col == "goals" else None)
    for h in r["here"]:
        w = worker.get(h["variant"])
        goals = "" if h["format"] != "onnx" or h["variant"] == "fp32 ONNX" else \
            ("[green]met[/]" if h["goal_met"] else "✗ " + ", ".join(GOAL_LABELS[k] for k in h["goals_missed"]))
        name = h["variant"] + (" [bold](chosen)[/]" if w and w.get("chosen") else "")
        t.add_row(name, f"{h['ratio']:.2f}", f"{h['mean_cos']:.4f}", f"{h['min_cos']:.4f}",
                  f"{h['batch1']['p50_ms']:.2f}", f"{h['batch32']['p50_ms']:.1f}",
                  f"{h['speedup_b32_vs_torchscript']:.2f}", f"{w['ratio']:.2f}" if w else "",
                  f"{w['cosine']:.4f}/{w['cosine_min']:.4f}" if w else "",
                  f"{w['batch32']['p50_ms']:.1f}" if w else "",
                  f"{w['cost_per_million_micros']:,}" if w else "", goals)
    console.print(t)
    c = r["compression"]
    console.print(f"  AutoCompress job {c['job_id']}: {c['wall_s']:.1f} s, {money(c['cost_micros'], c['currency'])}; "
                  f"{c['outcome']}")
    if r["met_by"]:
        console.print(f"[green]met[/]  goal (R ≥ {g['ratio']}, cos ≥ {g['mean_cos']}/{g['min_cos']}, ≥ "
                      f"{g['speedup_b32_vs_torchscript']}× fp32 TorchScript at b32) by {', '.join(r['met_by'])}")
    else:
        best = next((h for h in r["here"] if h["variant"] == r["best"]), None)
        console.print(f"[red]missed[/]  goal: no ONNX variant meets all of it; the closest, {r['best']}, misses "
                      f"{', '.join(GOAL_LABELS[k] for k in best['goals_missed']) if best else '?'}")
    report_serving(r, console)


def report_serving(r: dict, console: Console) -> None:
    s, h = r["serving"], r["headline"]
    if not s:
        console.print("[red]no variant met the floor: nothing deployed[/]")
        return
    t = Table(title=f"Served through the gateway: {s['requests_per_deployment']} requests of {s['batch']} sentences "
                    f"to each, concurrency {s['concurrency']}, alternated {s['alternations']}×; ledger over "
                    f"{s['window']['seconds']:.0f} s (metering every {s['metering_interval_s']:g} s)",
              caption="allocated: the deployment's share of the Triton pool's bill (idle policy: usage). worker: "
                      "the VariantReport's cost per million at batch 32, 1 thread, no serving overhead")
    for col in ("deployment", "sent", "failed", "ledger requests", "allocated", "µ$ / M embeddings",
                "served $/1M req (source)", "worker µ$/M"):
        t.add_column(col, justify="left" if col == "deployment" else "right")
    worker = {"fp32 ONNX": h["worker_fp32_micros_per_million"]}
    worker[r["compression"]["chosen_recipe"]] = h["worker_chosen_micros_per_million"]
    for label, d in s["deployments"].items():
        cost = d["cost_per_million_embeddings_micros"]
        t.add_row(f"{label} ({d['deployment']})", f"{d['sent']:,}", f"{d['failed']:,}", short(d["gateway_requests"]),
                  money(d["allocated_micros"]), f"{cost:,.0f}" if cost is not None else "—",
                  f"{money(d['served_cost_per_million_micros'] or 0)} ({d['served_cost_source']})",
                  f"{worker.get(label, 0):,}")
    console.print(t)
    verdict = "[green]met[/]" if h["goal_met"] else "[red]missed[/]"
    ratio = f"{h['ratio']:.3f}×" if h["ratio"] else "n/a"
    console.print(f"{verdict}  served cost per million embeddings: fp32 ONNX / {r['compression']['chosen_recipe']} = "
                  f"{ratio} (goal ≥ {h['goal']:g}×); the worker's bare figures: "
                  f"{h['worker_fp32_micros_per_million']:,} / {h['worker_chosen_micros_per_million']:,} µ$ per million")
    for err in s["errors"]:
        console.print(f"[yellow]  failed request: {err}[/]")

