"""Run one delivery of a compression job: every candidate recipe becomes a TorchScript variant in the registry,
measured honestly — size and R from the two serialized files, quality recomputed from the saved artifact on held-out
data, latency at batch 1 and 32, cost per million inferences from the measured throughput and the device price —
then the variant that best meets the floor under the objective is chosen, with the Pareto front reported.

What depends on the kind of model — loading the source, applying a recipe, serializing, quality (accuracy for the
classifiers, cosine to the source's embeddings for minilm), latency inputs, the registered signature — is the
source family's :mod:`~margin.compression.tasks` task; :class:`Compressor` keeps the job logic.

Between variants, between the stages of one (apply, serialize, score, time), and after every epoch of fine-tuning
or distillation, the attempt renews its lease (at most once a second inside a variant), checks for a cancel, and
stops before work that would cross the job's budget (the next variant is assumed to take 1.5× what the last one
took). Each variant is registered with the idempotency key ``compression-job:<job>:<index>``, so a resumed job never
registers one twice.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from margin.common import config, protoconv
from margin.common.costs import RunCost, cost_per_million_micros, format_money, run_cost
from margin.common.jobs import BUDGET_EXCEEDED, CANCELLED, RUNNING, SUCCEEDED, Refusal
from margin.compression import quality
from margin.compression.estimate import CompressionEstimator, history_key, source_parameters, variant_work
from margin.compression.recipe import Recipe
from margin.compression.tasks import Quality, Task, task_for
from margin.sdk.channel import Connection
from margin.sdk.pages import all_pages
from margin.sdk.registry import RegistryClient
from margin.v1 import common_pb2, registry_pb2
from margin.worker.context import WorkerContext
from margin.worker.jobrun import JobRun
from margin.worker.runner import guarded, lease_owner, registry_for, take_lease

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
BUDGET_MARGIN = 1.5  # the next piece of work is assumed to take up to 1.5× what it took last time
SERVING_FIGURES = ("cost_per_million_micros", "latency_p50_ms_batch1", "latency_p50_ms_batch32")
VARIANT_FORMATS = {"torchscript": registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, "onnx": registry_pb2.ARTIFACT_FORMAT_ONNX}
OBJECTIVE_KEYS = {"min_cost_per_million": "cost_per_million_micros", "min_latency": "latency_p50_ms_batch1",
                  "min_size": "size_bytes"}


class Stop(Exception):
    def __init__(self, state: str, message: str):
        super().__init__(message)
        self.state = state


class Compressor:
    def __init__(self, run: JobRun, spec: dict, registry: Connection):
        self.run, self.spec, self.registry = run, spec, RegistryClient(registry)
        self.arch = spec["architecture"]
        self.source = spec["source"]
        self.price_micros_per_hour = run.ctx.catalog.device(spec["device_class"]).micros_per_hour
        self.variant_seconds: list[float] = []
        self.variant_work: list[float] = []
        self.fixed_seconds = 0.0  # measuring the source: the fixed part of a variant without training
        self.last_beat = 0.0
        self.task: Task | None = None

    def load_source(self, beat: Callable[[], None]) -> torch.nn.Module | bytes:
        """The source, loaded by its task; a registry evaluation dataset is downloaded for the task first."""
        dataset = self.spec["eval_dataset"]
        with tempfile.TemporaryDirectory() as tmp:
            path = None
            if isinstance(dataset, dict):
                path = Path(tmp) / "dataset.npz"
                self.registry.download_to(common_pb2.VersionRef(model=dataset["model"], number=dataset["number"]),
                                          path)
                beat()
            self.task = task_for(self.arch, dataset, self.spec["quality_metric"], path, self.spec["device_class"])
            beat()
            source = Path(tmp) / "source"
            self.registry.download_to(common_pb2.VersionRef(model=self.source["model"],
                                                            number=self.source["number"]), source)
            beat()
            return self.task.load(source)

    def check(self, step: int, total: int, next_seconds: float, *, between: bool = True) -> None:
        """Renew the lease (at most once a second inside a variant); stop for a cancel, or before work expected to
        take ``next_seconds`` would cross the budget."""
        now = time.monotonic()
        if between or now - self.last_beat >= HEARTBEAT_S:
            self.last_beat = now
            _, cancel = self.run.ctx.store.heartbeat(
                self.run.lease, self.run.ctx.lease_seconds, device_seconds=self.run.device_seconds(),
                progress={"stage": "variants", "step": step, "total_steps": total})
            if cancel:
                raise Stop(CANCELLED, f"cancelled {'between variants' if between else f'during variant {step + 1}'}"
                                      f" of {total}")
        budget = self.run.lease.job.budget_micros
        if budget and self.run.micros(self.run.device_seconds(next_seconds * BUDGET_MARGIN)) > budget:
            where = f"before variant {step + 1}" if between else f"during variant {step + 1}"
            raise Stop(BUDGET_EXCEEDED, f"stopped {where} of {total}: going on would cross the budget "
                                        f"(spent {self.run.spent_micros()} of {budget} micros)")

    def epoch_check(self, step: int, total: int) -> Callable[[int], None]:
        """Called after every fine-tuning/distillation epoch: the next epoch plus measuring and registering must fit
        in the budget."""
        last = [time.monotonic()]

        def after_epoch(_: int) -> None:
            now = time.monotonic()
            epoch_s, last[0] = now - last[0], now
            self.check(step, total, epoch_s + self.fixed_seconds, between=False)
        return after_epoch

    def stage_check(self, step: int, total: int) -> Callable[[], None]:
        """Called between the stages of a variant (or of measuring the source, as step 0)."""
        return partial(self.check, step, total, 0.0, between=False)

    def report(self, module: torch.nn.Module, blob: bytes, recipe: dict, sparsity: float, run_micros: int,
               beat: Callable[[], None]) -> dict:
        """Measure what would be served: the artifact, reloaded from its bytes."""
        served = self.task.served(blob)
        quality = self.task.quality(served)
        beat()
        m = self.task.measure(served, blob)
        beat()
        report = {"recipe": recipe, "device_class": self.spec["device_class"], "size_bytes": len(blob),
                "parameters": self.task.parameters(module), "sparsity": sparsity,
                "latency_p50_ms_batch1": m.latency_p50_ms_batch1, "latency_p99_ms_batch1": m.latency_p99_ms_batch1,
                "latency_p50_ms_batch32": m.latency_p50_ms_batch32,
                "latency_p99_ms_batch32": m.latency_p99_ms_batch32, "throughput_per_second": m.throughput_per_second,
                "quality_metric": self.task.quality_metric, "quality": quality.mean,
                "cost_per_million_micros": cost_per_million_micros(self.price_micros_per_hour,
                                                                   m.throughput_per_second),
                "run_cost_micros": run_micros}
        if quality.minimum is not None:
            report["quality_min"] = quality.minimum
        return report

    def register(self, index: int, blob: bytes, report: dict, made: RunCost) -> dict:
        meta = registry_pb2.UploadMetadata(
            model=self.source["model"], format=VARIANT_FORMATS[self.task.format],
            signature=protoconv.signature_to_proto(self.task.signature()),
            parent=common_pb2.VersionRef(model=self.source["model"], number=self.source["number"]),
            recipe=protoconv.struct({"kind": "compression", "job_id": self.run.job_id, "recipe": report["recipe"]}),
            metrics={**self.task.registry_metrics(Quality(report["quality"], report.get("quality_min"))),
                     "compression_ratio": report["compression_ratio"],
                     "cost_per_million_micros": float(report["cost_per_million_micros"]),
                     "latency_p50_ms_batch1": report["latency_p50_ms_batch1"],
                     "latency_p50_ms_batch32": report["latency_p50_ms_batch32"]},
            cost=protoconv.cost(dataclasses.asdict(made), self.run.ctx.catalog.currency),
            idempotency_key=f"compression-job:{self.run.job_id}:{index}",
            description=f"{report['recipe'].get('name') or 'variant'} of {self.source['model']} "
                        f"v{self.source['number']} (job {self.run.job_id})")
        version = self.registry.upload_bytes(blob, meta)
        return {"model": version.model, "number": version.number}

    def record_history(self, ctx: WorkerContext) -> None:
        """What this run's variants took, for the next estimates (see :mod:`margin.compression.estimate`)."""
        CompressionEstimator(ctx.store, ctx.catalog).record(
            history_key(self.arch), self.spec["device_class"], list(zip(self.variant_seconds, self.variant_work,
                                                                     strict=True)), self.fixed_seconds)

    def attach_baseline(self, baseline: dict) -> None:
        """Give the source — and its TorchScript exports, the same weights scripted — the serving figures measured
        for it here, so that routing compares the original and its variants measured the same way."""
        figures = {k: float(baseline[k]) for k in SERVING_FIGURES}
        versions = all_pages(partial(self.registry.stub.ListVersions, metadata=self.registry.metadata),
                             registry_pb2.ListVersionsRequest(model=self.source["model"]), "versions")
        exports = [v.number for v in versions if v.parent.model == self.source["model"]
                   and v.parent.number == self.source["number"] and v.format == registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT
                   and protoconv.from_struct(v.recipe).get("kind") == "export"]
        for number in (self.source["number"], *exports):
            self.registry.stub.AttachMetrics(registry_pb2.AttachMetricsRequest(
                version=common_pb2.VersionRef(model=self.source["model"], number=number), metrics=figures),
                metadata=self.registry.metadata)

    def compress(self) -> dict:
        candidates = self.spec["candidates"]
        beat = self.stage_check(0, len(candidates))
        source = self.load_source(beat)
        beat()
        start = time.time()
        baseline_blob = self.task.serialize(source)
        beat()
        baseline = self.report(source, baseline_blob, {"name": "source", "steps": []}, 0.0, 0, beat)
        self.fixed_seconds = time.time() - start
        params = source_parameters(self.arch)
        baseline.update(compression_ratio=1.0, quality_delta=0.0, break_even_inferences=0, version=self.source)
        self.attach_baseline(baseline)
        variants = []
        for i, recipe in enumerate(candidates):
            plain = [t for t, work in zip(self.variant_seconds, self.variant_work, strict=True) if work == 0]
            self.check(i, len(candidates), max([self.fixed_seconds, *plain]))
            beat = self.stage_check(i, len(candidates))
            start = time.time()
            compressed = self.task.apply(source, Recipe.from_dict(recipe), self.epoch_check(i, len(candidates)))
            beat()
            blob = self.task.serialize(compressed.model)
            beat()
            made = run_cost(self.run.ctx.catalog, self.spec["device_class"], (time.time() - start) / 3600)
            micros = made.total_micros
            report = self.report(compressed.model, blob, recipe, compressed.sparsity, micros, beat)
            report["compression_ratio"] = len(baseline_blob) / len(blob)
            report["quality_delta"] = report["quality"] - baseline["quality"]  # signed as the metric is
            saving = baseline["cost_per_million_micros"] - report["cost_per_million_micros"]
            report["break_even_inferences"] = int(micros * 1_000_000 / saving) if saving > 0 else -1
            report["version"] = self.register(i, blob, report, made)
            self.variant_seconds.append(time.time() - start)
            self.variant_work.append(variant_work(recipe, self.task.train_rows, params))
            variants.append(report)
            self.run.publish({"state": RUNNING, "stage": "variant", "step": i + 1, "total_steps": len(candidates),
                              "variant": {**report, "meets_floor": False, "pareto_optimal": False},
                              "cost_micros": self.run.spent_micros(),
                              "message": f"{recipe.get('name') or f'variant {i + 1}'}: {report['quality_metric']} "
                                         f"{report['quality']:.4f}, R {report['compression_ratio']:.2f}"})
        return choose(variants, baseline, self.spec.get("auto"))


def choose(variants: list[dict], baseline: dict, auto: dict | None) -> dict:
    """Mark the floor and the Pareto front (cost per million vs quality), and pick the best variant meeting the floor
    under the objective — the best, not the first that passes."""
    floor = (auto or {}).get("floor") or {}
    minimum = float(floor.get("minimum", 0.0))
    metric = baseline.get("quality_metric", "")
    if not floor:  # an explicit recipe: every variant meets the (absent) floor
        minimum = float("inf") if metric in quality.LOWER_IS_BETTER else float("-inf")
    good = {id(v): quality.goodness(metric, v["quality"]) for v in (baseline, *variants)}
    baseline.update(meets_floor=quality.meets(metric, baseline["quality"], minimum), pareto_optimal=False)
    for v in variants:
        v["meets_floor"] = quality.meets(metric, v["quality"], minimum)
        v["pareto_optimal"] = not any(
            (o["cost_per_million_micros"] <= v["cost_per_million_micros"] and good[id(o)] >= good[id(v)])
            and (o["cost_per_million_micros"] < v["cost_per_million_micros"] or good[id(o)] > good[id(v)])
            for o in variants)
    objective = (auto or {}).get("objective") or "min_cost_per_million"
    key = OBJECTIVE_KEYS[objective]
    passing = [i for i, v in enumerate(variants) if v["meets_floor"]]
    if not passing:
        best = max(variants, key=lambda v: good[id(v)]) if variants else None
        bound = "≤" if metric in quality.LOWER_IS_BETTER else "≥"
        outcome = (f"no variant meets the floor {metric or 'quality'} {bound} {minimum}: the best reached "
                   f"{best['quality']:.4f} "
                   f"({best['recipe'].get('name')}); the source has {baseline['quality']:.4f}"
                   if best else "no variant was made")
        return {"variants": variants, "chosen": -1, "outcome": outcome, "baseline": baseline}
    chosen = min(passing, key=lambda i: (variants[i][key], -good[id(variants[i])]))
    v = variants[chosen]
    outcome = (f"chose {v['recipe'].get('name') or f'variant {chosen + 1}'} ({objective.replace('_', ' ')}): "
               f"{format_money(v['cost_per_million_micros'])} per million inferences vs "
               f"{format_money(baseline['cost_per_million_micros'])} for the source, {v['quality_metric']} "
               f"{v['quality']:.4f} ({v['quality_delta']:+.4f}), R {v['compression_ratio']:.2f}; {len(passing)} of "
               f"{len(variants)} variants meet the floor")
    if v[key] >= baseline[key]:
        outcome += f"; the source itself is no worse by {key} — keeping it costs nothing more"
    return {"variants": variants, "chosen": chosen, "outcome": outcome, "baseline": baseline}


def run_compression(job_id: str, task_id: str, ctx: WorkerContext) -> str:
    started = time.time()
    lease = take_lease(job_id, lease_owner(task_id), ctx)
    if isinstance(lease, Refusal):
        return lease.reason
    run = JobRun(ctx, lease, lease.job.spec["device_class"], 1, started)
    run.publish({"state": RUNNING, "stage": "start", "message": f"attempt {lease.fence}"})
    registry = registry_for(ctx, lease)

    def compress() -> str:
        torch.set_num_threads(config.torch_threads())
        compressor = Compressor(run, lease.job.spec, registry)
        try:
            result = compressor.compress()
        except Stop as stop:
            run.end(stop.state, str(stop), {"stage": "stopped"})
            return str(stop)
        finally:
            compressor.record_history(ctx)
        run.end(SUCCEEDED, result["outcome"], {"stage": "done"}, result=result)
        return "ran"

    return guarded(job_id, compress, run.fail, registry)
