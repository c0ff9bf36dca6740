"""The compression control plane, free of gRPC: resolve the source version, validate recipes, estimate the run,
and admit it under its budget (the shared :class:`~margin.common.jobcontrol.JobControl` queues and reports)."""
from __future__ import annotations

from margin.common.costs import PriceCatalog, run_cost
from margin.common.dispatch import Dispatcher
from margin.common.errors import InvalidArgument
from margin.common.jobcontrol import Admission, Caller, JobControl, check_request
from margin.common.jobevents import JobEvents
from margin.common.jobs import Job, JobStore
from margin.compression import recipe as recipes
from margin.modelzoo.datasets import BUILTIN_SHAPES
from margin.modelzoo.spec import TrainSpec, parameter_count
from margin.sdk.registry_source import RegistrySource

KIND = "compression"
QUALITY_METRICS = ("accuracy",)
OBJECTIVES = ("min_cost_per_million", "min_latency", "min_size")

# AutoCompress's built-in search space for the classifier families, cheapest to make first.
SEARCH_SPACE: tuple[dict, ...] = (
    {"name": "int8-dynamic-per-channel", "steps": [{"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
    {"name": "int8-weight-only", "steps": [{"quantize": {"scheme": "weight_only_int8"}}]},
    {"name": "int8-static", "steps": [{"quantize": {"scheme": "static_int8", "calibration_batches": 8}}]},
    {"name": "prune-50-structured+int8", "steps": [
        {"prune": {"kind": "KIND_STRUCTURED", "amount": 0.5, "finetune_epochs": 5}},
        {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
    {"name": "prune-75-structured+int8", "steps": [
        {"prune": {"kind": "KIND_STRUCTURED", "amount": 0.75, "finetune_epochs": 8}},
        {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
    {"name": "distill-mlp-32+int8", "steps": [
        {"distill": {"student_family": "mlp", "student_architecture": {"hidden": [32]}, "epochs": 30,
                     "temperature": 4.0, "alpha": 0.7, "learning_rate": 0.003}},
        {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
)

# First guesses for the estimate (documented, replaced by measurements as they accrue): fixed seconds per variant
# (load, evaluate, benchmark at batch 1 and 32, register) and training throughput for fine-tuning/distillation.
SECONDS_PER_VARIANT = 6.0
TRAIN_WORK_PER_S = 1.0e9       # sample-parameters per second on one CPU device
GUESS_RANGE = (0.25, 4.0)


class CompressionCore:
    def __init__(self, store: JobStore, events: JobEvents, dispatcher: Dispatcher, registry: RegistrySource,
                 catalog: PriceCatalog):
        self.jobs = JobControl(KIND, store, events, dispatcher)
        self.registry, self.catalog = registry, catalog

    def _source(self, caller: Caller, model: str, number: int, alias: str) -> tuple[dict, dict]:
        v = self.registry.version(caller.api_key, model, number, alias)
        family = v.architecture.get("family")
        if v.format != "safetensors" or family not in recipes.STRUCTURED_FAMILIES:
            raise InvalidArgument(f"{v.model} v{v.number} is {v.format} ({family or 'no architecture'}); compression "
                                  f"needs a safetensors version of a {list(recipes.STRUCTURED_FAMILIES)} model")
        return {"model": v.model, "number": v.number}, dict(v.architecture)

    def _dataset(self, eval_dataset: str, arch: dict) -> int:
        shape = BUILTIN_SHAPES.get(eval_dataset or "sklearn:digits")
        if shape is None:
            raise InvalidArgument(f"unknown evaluation dataset {eval_dataset!r}; known: {sorted(BUILTIN_SHAPES)}")
        if arch.get("num_classes") != shape.num_classes:
            raise InvalidArgument(f"the source outputs {arch.get('num_classes')} classes; {eval_dataset} has "
                                  f"{shape.num_classes}")
        return shape.rows

    def _recipe(self, data: dict, arch: dict) -> dict:
        recipe = recipes.Recipe.from_dict(data)
        input_dim = arch.get("input_dim") or arch.get("image_size", 8) ** 2
        recipes.validate(recipe, family=arch["family"], input_dim=int(input_dim), num_classes=int(arch["num_classes"]))
        return recipe.to_dict()

    def _device(self, device_class: str) -> str:
        device_class = device_class or "cpu"
        if device_class not in self.catalog.device_classes:
            known = sorted(self.catalog.device_classes)
            raise InvalidArgument(f"unknown device class {device_class!r}; known: {known}")
        return device_class

    def estimate(self, arch: dict, rows: int, candidates: list[dict], device_class: str) -> dict:
        params = parameter_count(TrainSpec(model="m", family=arch["family"],
                                           architecture={k: v for k, v in arch.items() if k != "family"}))
        seconds = 0.0
        for data in candidates:
            epochs = sum(int(body.get("finetune_epochs", 0) or body.get("epochs", 0) if name != "quantize" else 0)
                         for step in data["steps"] for name, body in step.items())
            seconds += SECONDS_PER_VARIANT + epochs * rows * 0.8 * params / TRAIN_WORK_PER_S
        low, high = seconds * GUESS_RANGE[0], seconds * GUESS_RANGE[1]
        cost = {s: run_cost(self.catalog, device_class, s / 3600.0) for s in (low, seconds, high)}
        return {"low_micros": cost[low].total_micros, "expected_micros": cost[seconds].total_micros,
                "high_micros": cost[high].total_micros, "seconds": seconds, "device_class": device_class,
                "basis": f"first guess: {SECONDS_PER_VARIANT:.0f}s per variant + fine-tuning at "
                         f"{TRAIN_WORK_PER_S:.0e} sample-params/s, range ×{GUESS_RANGE[0]}–×{GUESS_RANGE[1]}"}

    def submit(self, caller: Caller, *, source: tuple[str, int, str], recipe: dict | None, candidates: list[dict],
               auto: dict | None, eval_dataset: str, quality_metric: str, device_class: str, budget_micros: int,
               idempotency_key: str) -> Job:
        """An explicit recipe (``recipe``) or an AutoCompress search (``auto`` + ``candidates``)."""
        check_request(budget_micros, idempotency_key)
        existing = self.jobs.existing(caller, idempotency_key)
        if existing is not None:
            return existing
        quality_metric = quality_metric or "accuracy"
        if quality_metric not in QUALITY_METRICS:
            raise InvalidArgument(f"quality_metric must be one of {list(QUALITY_METRICS)}, got {quality_metric!r}")
        src, arch = self._source(caller, *source)
        rows = self._dataset(eval_dataset, arch)
        device_class = self._device(device_class)
        if recipe is not None:
            candidates = [self._recipe(recipe, arch)]
        else:
            candidates = [self._recipe(c, arch) for c in (candidates or SEARCH_SPACE)]
        spec = {"source": src, "architecture": arch, "eval_dataset": eval_dataset or "sklearn:digits",
                "quality_metric": quality_metric, "device_class": device_class, "candidates": candidates,
                "recipe": candidates[0] if recipe is not None else None, "auto": auto}
        return self.jobs.admit(caller, Admission(spec, device_class, self.estimate(arch, rows, candidates,
                                                                                     device_class)),
                               budget_micros, idempotency_key)
