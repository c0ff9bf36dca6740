"""The compression control plane, free of gRPC: resolve the source version, validate recipes, estimate the run,
and admit it under its budget (the shared :class:`~margin.common.jobcontrol.JobControl` queues and reports).

Three kinds of source (:data:`FAMILIES`): the digits classifiers (``mlp``, ``cnn``: quality ``accuracy`` on a
built-in labelled dataset or the tenant's own ``.npz`` of ``x`` and ``y``, every technique); the MiniLM sentence
encoder (``minilm``: quality ``cosine`` to the source's embeddings on ``margin:sentences``, quantize steps only); and
any ONNX model a team uploaded (``onnx``: ONNX Runtime's optimize and quantize steps, scored on the tenant's own
dataset version by the metric the floor names — ``accuracy`` when the dataset has labels, ``agreement``, ``cosine``
or ``relative_error``). Each has its built-in AutoCompress search space.

Everything a run will read is checked here, at submit, before anything is queued or billed: the source's format and
sizes, the dataset's manifest (recorded by the registry at upload) against the model's inputs, the metric against
what the dataset can give, each recipe against the source, and the device class.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from margin.common import manifest, modelpackage
from margin.common.costs import PriceCatalog
from margin.common.dispatch import Dispatcher
from margin.common.errors import InvalidArgument
from margin.common.jobcontrol import Admission, Caller, JobControl, check_request
from margin.common.jobevents import JobEvents
from margin.common.jobs import Job, JobStore
from margin.common.tensors import Signature
from margin.compression import minilm, quality
from margin.compression import recipe as recipes
from margin.compression.estimate import CompressionEstimator, source_parameters
from margin.modelzoo import sizes
from margin.modelzoo.datasets import BUILTIN_SHAPES
from margin.sdk.registry_source import RegistrySource, VersionInfo

KIND = "compression"
QUALITY_METRICS = quality.METRICS
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


# AutoCompress's built-in search space for an ONNX source (ONNX Runtime's tools), cheapest to make first; GPU
# device classes also try fp16 (:data:`ONNX_GPU_SEARCH_SPACE`).
ONNX_SEARCH_SPACE: tuple[dict, ...] = (
    {"name": "ort-int8-dynamic-per-channel", "steps": [{"quantize": {"scheme": "dynamic_int8", "per_channel": True}}]},
    {"name": "ort-int8-dynamic", "steps": [{"quantize": {"scheme": "dynamic_int8"}}]},
    {"name": "ort-optimized+int8-static-qdq", "steps": [
        {"optimize": {"level": "basic"}},
        {"quantize": {"scheme": "static_int8", "per_channel": True, "calibration_batches": 8}}]},
    {"name": "ort-int4-weight-only", "steps": [{"quantize": {"scheme": "weight_only_int4", "group_size": 32}}]},
    {"name": "ort-optimized", "steps": [{"optimize": {"level": "extended"}}]},
)
ONNX_GPU_SEARCH_SPACE = (*ONNX_SEARCH_SPACE, {"name": "ort-fp16", "steps": [{"quantize": {"scheme": "fp16"}}]})
ONNX_EXPORT_HINT = ("export it to ONNX (torch.onnx.export(model, example, 'model.onnx', input_names=[...], "
                    "output_names=[...], dynamic_axes={name: {0: 'batch'}})) and upload it with --format onnx")


@dataclass(frozen=True)
class Family:
    """How a kind of source is scored and searched."""
    quality_metric: str
    default_dataset: str
    search_space: tuple[dict, ...]


_CLASSIFIER = Family("accuracy", "sklearn:digits", SEARCH_SPACE)
FAMILIES = {"mlp": _CLASSIFIER, "cnn": _CLASSIFIER,
            minilm.FAMILY: Family("cosine", minilm.SENTENCES_DATASET, MINILM_SEARCH_SPACE),
            recipes.ONNX_FAMILY: Family("agreement", "", ONNX_SEARCH_SPACE)}


@dataclass(frozen=True)
class CompressionRequest:
    """An explicit recipe (``recipe``) or an AutoCompress search (``auto``, over ``candidates`` or the built-in
    search space)."""
    source: tuple[str, int, str]  # model, number, alias
    recipe: dict | None = None
    candidates: list[dict] = field(default_factory=list)
    auto: dict | None = None
    eval_dataset: str | tuple[str, int, str] = ""  # a built-in dataset's name, or a registry dataset version
    quality_metric: str = ""
    device_class: str = ""
    budget_micros: int = 0
    idempotency_key: str = ""


class CompressionCore:
    def __init__(self, store: JobStore, events: JobEvents, dispatcher: Dispatcher, registry: RegistrySource,
                 catalog: PriceCatalog, tenant_remaining: Callable[[str, str], int | None]):
        self.jobs = JobControl(KIND, store, events, dispatcher, tenant_remaining=tenant_remaining)
        self.registry, self.catalog = registry, catalog
        self.estimator = CompressionEstimator(store, catalog)

    def _source(self, caller: Caller, model: str, number: int, alias: str) -> tuple[dict, dict]:
        v = self.registry.version(caller.api_key, model, number, alias)
        what = f"{v.model} v{v.number}"
        if v.format == "onnx":
            arch = self._onnx_source(v)
        elif v.format == modelpackage.FORMAT:
            raise modelpackage.package_refusal(what)
        elif v.format == "torchscript":
            raise InvalidArgument(f"{what} is TorchScript, which Margin serves but does not compress: to compress a "
                                  f"model Margin did not build, {ONNX_EXPORT_HINT}")
        elif v.format != "safetensors" or v.architecture.get("family") not in FAMILIES:
            raise InvalidArgument(f"{what} is {v.format} ({v.architecture.get('family') or 'no architecture'}); "
                                  f"compression needs an onnx version, or a safetensors version of a "
                                  f"{[f for f in FAMILIES if f != recipes.ONNX_FAMILY]} model")
        else:
            arch = dict(v.architecture)
        self._check_size(arch, what)
        return {"model": v.model, "number": v.number}, arch

    @staticmethod
    def _onnx_source(v: VersionInfo) -> dict:
        """An ONNX source's architecture for the job: its signature (what the dataset must feed) and file size."""
        if v.signature.empty or not v.signature.batched:
            raise InvalidArgument(f"{v.model} v{v.number} has no batched signature (got {v.signature.describe()}): "
                                  f"compression feeds it batches of the dataset's rows, so every input and output "
                                  f"needs a variable first (batch) dimension; {ONNX_EXPORT_HINT}")
        return {"family": recipes.ONNX_FAMILY, "signature": v.signature.to_dict(), "size_bytes": v.size_bytes}

    @staticmethod
    def _check_size(arch: dict, what: str) -> None:
        """The source's sizes (its registry architecture, as uploaded) within the configured limits, before any
        estimate reads them or a worker builds it."""
        limits = sizes.SizeLimits.from_env()
        try:
            if arch["family"] in (*recipes.ENCODER_FAMILIES, recipes.ONNX_FAMILY):
                params = source_parameters(arch)
                if params > limits.max_parameters:
                    raise InvalidArgument(f"it has {params} parameters; the limit is {limits.max_parameters} "
                                          "(MARGIN_MAX_MODEL_PARAMETERS)")
            else:
                sizes.check(arch, limits)
        except InvalidArgument as err:
            raise InvalidArgument(f"source {what}: {err}") from None

    @staticmethod
    def _quality_metric(metric: str, arch: dict) -> str:
        family = arch["family"]
        expected = FAMILIES[family].quality_metric
        if family != recipes.ONNX_FAMILY:
            if metric and metric != expected:
                raise InvalidArgument(f"quality_metric {metric!r} does not apply to a {family} model: its variants "
                                      f"are scored by {expected!r}")
            return expected
        metric = metric or expected
        first = Signature.from_dict(arch["signature"]).outputs[0]
        if metric in ("accuracy", "agreement") and first.shape[-1] == 1:
            raise InvalidArgument(f"quality_metric {metric!r} compares the argmax of the first output, but "
                                  f"{first.describe()} has one value per row; use 'cosine' or 'relative_error'")
        return metric

    def _dataset(self, caller: Caller, eval_dataset: str | tuple, arch: dict, metric: str) -> tuple[str | dict, int]:
        """The evaluation dataset (a built-in's name, the family's default when none is given, or a registry
        dataset version pinned as ``{"model", "number"}``) and its rows, checked against the source and the
        metric."""
        if isinstance(eval_dataset, tuple):
            return self._registry_dataset(caller, eval_dataset, arch, metric)
        if arch["family"] == recipes.ONNX_FAMILY:
            raise InvalidArgument("eval_dataset: an onnx source is scored on your own data: give a dataset-npz "
                                  "version with one array per model input (its names, dtypes and trailing shapes) "
                                  "and, for accuracy, integer labels 'y'")
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

    def _registry_dataset(self, caller: Caller, ref: tuple[str, int, str], arch: dict,
                          metric: str) -> tuple[dict, int]:
        if arch["family"] in recipes.ENCODER_FAMILIES:
            raise InvalidArgument(f"eval_dataset: a {arch['family']} model is scored on {minilm.SENTENCES_DATASET}")
        v = self.registry.version(caller.api_key, *ref)
        what = f"dataset {v.model} v{v.number}"
        if v.format != "dataset-npz":
            raise InvalidArgument(f"eval_dataset: {v.model} v{v.number} is {v.format}, not dataset-npz")
        if arch["family"] == recipes.ONNX_FAMILY:
            manifest.check_inputs(v.signature, Signature.from_dict(arch["signature"]), what=what)
            if metric == "accuracy":
                manifest.check_labels(v.signature, what=what)
        else:
            manifest.check_features(v.signature, sizes.sizes(arch).input_features, what=what)
            manifest.check_labels(v.signature, what=what)
        rows = manifest.rows(v.signature)
        if rows < 2:
            raise InvalidArgument(f"{what} has {rows} row(s); scoring needs at least 2 (one is held out)")
        return {"model": v.model, "number": v.number}, rows

    def _recipe(self, data: dict, arch: dict, device_class: str) -> dict:
        recipe = recipes.Recipe.from_dict(data)
        if arch["family"] == recipes.ONNX_FAMILY:
            recipes.validate(recipe, family=arch["family"])
            if device_class == "cpu" and any(isinstance(s, recipes.QuantizeStep) and s.scheme == "fp16"
                                             for s in recipe.steps):
                raise InvalidArgument(f"recipe {recipe.name!r}: fp16 runs on GPU device classes; on cpu use an "
                                      "int8 or int4 scheme")
        elif arch["family"] in recipes.ENCODER_FAMILIES:
            recipes.validate(recipe, family=arch["family"])
        else:
            s = sizes.sizes(arch)  # checked by _source
            recipes.validate(recipe, family=arch["family"], input_dim=s.input_features, num_classes=s.num_classes)
        return recipe.to_dict()

    @staticmethod
    def _search_space(family: str, device_class: str) -> tuple[dict, ...]:
        if family == recipes.ONNX_FAMILY and device_class != "cpu":
            return ONNX_GPU_SEARCH_SPACE
        return FAMILIES[family].search_space

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
        quality_metric = self._quality_metric(r.quality_metric, arch)
        eval_dataset, rows = self._dataset(caller, r.eval_dataset, arch, quality_metric)
        device_class = self._device(r.device_class)
        if r.recipe is not None:
            candidates = [self._recipe(r.recipe, arch, device_class)]
        else:
            candidates = [self._recipe(c, arch, device_class)
                          for c in (r.candidates or self._search_space(arch["family"], device_class))]
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
