"""The compression control plane, free of gRPC: resolve the source version, validate recipes, estimate the run,
and admit it under its budget (the shared :class:`~margin.common.jobcontrol.JobControl` queues and reports).

Two kinds of source (:data:`FAMILIES`): the digits classifiers (``mlp``, ``cnn``: quality ``accuracy`` on a
built-in labelled dataset, every technique) and the MiniLM sentence encoder (``minilm``: quality ``cosine`` to the
source's embeddings on ``margin:sentences``, quantize steps only). Each has its built-in AutoCompress search space.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from margin.budget.store import BudgetStore
from margin.common.costs import PriceCatalog
from margin.common.dispatch import Dispatcher
from margin.common.errors import InvalidArgument
from margin.common.jobcontrol import Admission, Caller, JobControl, check_request
from margin.common.jobevents import JobEvents
from margin.common.jobs import Job, JobStore
from margin.compression import minilm
from margin.compression import recipe as recipes
from margin.compression.estimate import CompressionEstimator
from margin.modelzoo import sizes
from margin.modelzoo.datasets import BUILTIN_SHAPES
from margin.sdk.registry_source import RegistrySource

KIND = "compression"
QUALITY_METRICS = ("accuracy", "cosine")
OBJECTIVES = ("min_cost_per_million", "min_latency", "min_size")

# AutoCompress's built-in search space for the classifier families, cheapest to make first.
SEARCH_SPACE: tuple[dict, ...] = (
    {"name": "int8-dynamic-per-channel", "steps": [{"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
    {"name": "int8-weight-only", "steps": [{"quantize": {"scheme": "weight_only_int8"}}]},
    {"name": "int8-static", "steps": [{"quantize": {"scheme": "static_int8", "calibration_batches": 8}}]},
    {"name": "prune-50-structured+int8", "steps": [
        {"prune": {"kind": "KIND_STRUCTURED", "amount": 0.5, "finetune_epochs": 5}},
        {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
    {"name": "prune-50-structured+int8-static", "steps": [
        {"prune": {"kind": "KIND_STRUCTURED", "amount": 0.5, "finetune_epochs": 5}},
        {"quantize": {"scheme": "static_int8", "calibration_batches": 8}}]},
    {"name": "prune-75-structured+int8", "steps": [
        {"prune": {"kind": "KIND_STRUCTURED", "amount": 0.75, "finetune_epochs": 8}},
        {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
    {"name": "distill-mlp-32+int8", "steps": [
        {"distill": {"student_family": "mlp", "student_architecture": {"hidden": [32]}, "epochs": 30,
                     "temperature": 4.0, "alpha": 0.7, "learning_rate": 0.003}},
        {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
)
_EMBEDDINGS_INT8 = {"quantize": {"scheme": "embedding_int8"}}
# AutoCompress's built-in search space for minilm: int8 Linear layers, alone or with int8 embeddings.
MINILM_SEARCH_SPACE: tuple[dict, ...] = (
    {"name": "int8-dynamic", "steps": [{"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
    {"name": "emb-int8+int8-dynamic", "steps": [
        _EMBEDDINGS_INT8, {"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
    {"name": "emb-int8+int8-per-token", "steps": [
        _EMBEDDINGS_INT8, {"quantize": {"scheme": "dynamic_int8_per_token"}}]},
    {"name": "emb-int8+int8-per-token+smoothquant", "steps": [
        _EMBEDDINGS_INT8, {"quantize": {"scheme": "dynamic_int8_per_token", "smoothquant": True}}]},
    {"name": "emb-int8+int8-weight-only", "steps": [_EMBEDDINGS_INT8, {"quantize": {"scheme": "weight_only_int8"}}]},
)


@dataclass(frozen=True)
class Family:
    """How a kind of source is scored and searched."""
    quality_metric: str
    default_dataset: str
    search_space: tuple[dict, ...]


_CLASSIFIER = Family("accuracy", "sklearn:digits", SEARCH_SPACE)
FAMILIES = {"mlp": _CLASSIFIER, "cnn": _CLASSIFIER,
            minilm.FAMILY: Family("cosine", minilm.SENTENCES_DATASET, MINILM_SEARCH_SPACE)}


@dataclass(frozen=True)
class CompressionRequest:
    """An explicit recipe (``recipe``) or an AutoCompress search (``auto``, over ``candidates`` or the built-in
    search space)."""
    source: tuple[str, int, str]  # model, number, alias
    recipe: dict | None = None
    candidates: list[dict] = field(default_factory=list)
    auto: dict | None = None
    eval_dataset: str = ""
    quality_metric: str = ""
    device_class: str = ""
    budget_micros: int = 0
    idempotency_key: str = ""


class CompressionCore:
    def __init__(self, store: JobStore, events: JobEvents, dispatcher: Dispatcher, registry: RegistrySource,
                 catalog: PriceCatalog):
        self.jobs = JobControl(KIND, store, events, dispatcher, tenant_remaining=BudgetStore(store.sessions).remaining)
        self.registry, self.catalog = registry, catalog
        self.estimator = CompressionEstimator(store, catalog)

    def _source(self, caller: Caller, model: str, number: int, alias: str) -> tuple[dict, dict]:
        v = self.registry.version(caller.api_key, model, number, alias)
        family = v.architecture.get("family")
        if v.format != "safetensors" or family not in FAMILIES:
            raise InvalidArgument(f"{v.model} v{v.number} is {v.format} ({family or 'no architecture'}); compression "
                                  f"needs a safetensors version of a {list(FAMILIES)} model")
        self._check_size(v.architecture, f"{v.model} v{v.number}")
        return {"model": v.model, "number": v.number}, dict(v.architecture)

    @staticmethod
    def _check_size(arch: dict, what: str) -> None:
        """The source's sizes (its registry architecture, as uploaded) within the configured limits, before any
        estimate reads them or a worker builds it."""
        limits = sizes.SizeLimits.from_env()
        try:
            if arch["family"] in recipes.ENCODER_FAMILIES:
                params = minilm.encoder_parameters(arch.get("config"))
                if params > limits.max_parameters:
                    raise InvalidArgument(f"it has {params} parameters; the limit is {limits.max_parameters} "
                                          "(MARGIN_MAX_MODEL_PARAMETERS)")
            else:
                sizes.check(arch, limits)
        except InvalidArgument as err:
            raise InvalidArgument(f"source {what}: {err}") from None

    @staticmethod
    def _quality_metric(metric: str, family: str) -> str:
        expected = FAMILIES[family].quality_metric
        if metric and metric != expected:
            raise InvalidArgument(f"quality_metric {metric!r} does not apply to a {family} model: its variants are "
                                  f"scored by {expected!r}")
        return expected

    def _dataset(self, eval_dataset: str, arch: dict) -> tuple[str, int]:
        """The evaluation dataset's name (the family's default when none is given) and its rows."""
        name = eval_dataset or FAMILIES[arch["family"]].default_dataset
        if arch["family"] in recipes.ENCODER_FAMILIES:
            if name != minilm.SENTENCES_DATASET:
                raise InvalidArgument(f"unknown evaluation dataset {name!r} for a {arch['family']} model; known: "
                                      f"[{minilm.SENTENCES_DATASET!r}]")
            return name, 0  # quantize-only recipes: no training rows to estimate
        shape = BUILTIN_SHAPES.get(name)
        if shape is None:
            raise InvalidArgument(f"unknown evaluation dataset {eval_dataset!r}; known: {sorted(BUILTIN_SHAPES)}")
        if arch.get("num_classes") != shape.num_classes:
            raise InvalidArgument(f"the source outputs {arch.get('num_classes')} classes; {name} has "
                                  f"{shape.num_classes}")
        return name, shape.rows

    def _recipe(self, data: dict, arch: dict) -> dict:
        recipe = recipes.Recipe.from_dict(data)
        if arch["family"] in recipes.ENCODER_FAMILIES:
            recipes.validate(recipe, family=arch["family"])
        else:
            s = sizes.sizes(arch)  # checked by _source
            recipes.validate(recipe, family=arch["family"], input_dim=s.input_features, num_classes=s.num_classes)
        return recipe.to_dict()

    def _device(self, device_class: str) -> str:
        device_class = device_class or "cpu"
        if device_class not in self.catalog.device_classes:
            known = sorted(self.catalog.device_classes)
            raise InvalidArgument(f"unknown device class {device_class!r}; known: {known}")
        return device_class

    def _admission(self, caller: Caller, r: CompressionRequest) -> Admission:
        """Everything about the request checked, the candidates resolved, and the run estimated."""
        if r.quality_metric and r.quality_metric not in QUALITY_METRICS:
            raise InvalidArgument(f"quality_metric must be one of {list(QUALITY_METRICS)}, got {r.quality_metric!r}")
        src, arch = self._source(caller, *r.source)
        quality_metric = self._quality_metric(r.quality_metric, arch["family"])
        eval_dataset, rows = self._dataset(r.eval_dataset, arch)
        device_class = self._device(r.device_class)
        if r.recipe is not None:
            candidates = [self._recipe(r.recipe, arch)]
        else:
            candidates = [self._recipe(c, arch) for c in (r.candidates or FAMILIES[arch["family"]].search_space)]
        spec = {"source": src, "architecture": arch, "eval_dataset": eval_dataset,
                "quality_metric": quality_metric, "device_class": device_class, "candidates": candidates,
                "recipe": candidates[0] if r.recipe is not None else None, "auto": r.auto}
        return Admission(spec, device_class, self.estimator.estimate(arch, rows, candidates, device_class))

    def estimate(self, caller: Caller, r: CompressionRequest) -> dict:
        """What submitting ``r`` would be expected to cost (the estimate admission compares with the budget)."""
        admission = self._admission(caller, r)
        return {**admission.estimate, "variants": len(admission.spec["candidates"])}

    def submit(self, caller: Caller, r: CompressionRequest) -> Job:
        """An explicit recipe (``recipe``) or an AutoCompress search (``auto`` + ``candidates``)."""
        check_request(r.budget_micros, r.idempotency_key)
        existing = self.jobs.existing(caller, r.idempotency_key)
        if existing is not None:
            return existing
        return self.jobs.admit(caller, self._admission(caller, r), r.budget_micros, r.idempotency_key)
