"""A training run's spec as plain data, checked before a job is queued and read again by the worker.

The training service validates what it can without the data (sizes and their limits, names, the layers to freeze)
without building the model (:mod:`margin.modelzoo.sizes`);
the worker re-reads the same dict, so what ran is exactly what was accepted and recorded as the recipe.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from margin.common.errors import InvalidArgument
from margin.common.names import validate_name
from margin.modelzoo import sizes
from margin.modelzoo.architectures import FAMILIES, parameter_names
from margin.modelzoo.datasets import BUILTIN_SHAPES

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "sgd")
MAX_EPOCHS = 10_000


@dataclass(frozen=True)
class BaseRef:
    model: str
    number: int = 0
    alias: str = ""


@dataclass(frozen=True)
class TrainSpec:
    model: str
    family: str
    architecture: dict
    dataset: str = ""                        # a built-in dataset, e.g. "sklearn:digits" ...
    dataset_version: BaseRef | None = None   # ... or a dataset-npz version in the registry
    base: BaseRef | None = None              # fine-tune from this safetensors version
    freeze_layers: tuple[str, ...] = ()
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    validation_fraction: float = 0.2
    seed: int = 0
    precision: str = "fp32"
    world_size: int = 1
    device_class: str = "cpu"
    extra: dict = field(default_factory=dict)
    package: BaseRef | None = None           # a tenant's model package, instead of a built-in family
    config: dict = field(default_factory=dict)  # its build_model(**config)
    max_seconds: int = 0                     # wall-clock cap on an attempt of a package job (0: the operator's)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainSpec:
        data = dict(data)
        for key in ("base", "dataset_version", "package"):
            if data.get(key):
                data[key] = BaseRef(**data[key])
        data["freeze_layers"] = tuple(data.get("freeze_layers") or ())
        return cls(**data)

    def model_spec(self) -> dict:
        """The architecture dict ``build_model`` takes (family included)."""
        return {**self.architecture, "family": self.family}

    @property
    def on_gpu(self) -> bool:
        return self.device_class != "cpu"

    @property
    def history_family(self) -> str:
        """The key of this run's throughput history: the family, or for a package its version and config (the
        same code with another config is another model)."""
        if not self.package:
            return self.family
        key = json.dumps([self.package.model, self.package.number, self.config], sort_keys=True)
        return "pkg:" + hashlib.sha256(key.encode()).hexdigest()[:20]


def complete_architecture(spec: TrainSpec) -> TrainSpec:
    """Fill sizes a built-in dataset determines (input_dim/image_size, num_classes) when the spec leaves them out."""
    shape = BUILTIN_SHAPES.get(spec.dataset)
    if shape is None:
        return spec
    arch = dict(spec.architecture)
    arch.setdefault("num_classes", shape.num_classes)
    if spec.family == "mlp":
        arch.setdefault("input_dim", shape.features)
    elif spec.family == "cnn":
        arch.setdefault("image_size", shape.image_size)
    return TrainSpec(**{**spec.__dict__, "architecture": arch})


def validate(spec: TrainSpec, *, max_world_size: int, device_classes: list[str],
             limits: sizes.SizeLimits | None = None) -> TrainSpec:
    """Everything that can be checked without the data; returns the spec with its architecture completed.
    ``limits``: the architecture's size limits (default: the configured ones)."""
    validate_name(spec.model, "spec.model")
    if spec.package:
        if spec.family:
            raise InvalidArgument("name a built-in family or a model package (spec.package), not both")
    elif spec.family not in FAMILIES:
        raise InvalidArgument(f"unknown model family {spec.family!r}; known: {sorted(FAMILIES)}; or train your own "
                              "code: upload it with `margin models upload-package` and name it in spec.package")
    elif spec.config:
        raise InvalidArgument("spec.config is the keyword arguments of a package's build_model; a built-in family "
                              "takes spec.architecture")
    if not 0 <= spec.max_seconds <= 30 * 86_400:
        raise InvalidArgument(f"spec.max_seconds must be between 0 (the operator's limit) and 2592000, "
                              f"got {spec.max_seconds}")
    if bool(spec.dataset) == bool(spec.dataset_version):
        raise InvalidArgument("spec.dataset: name a built-in dataset or a registry dataset version (one of them)")
    if spec.dataset and spec.dataset not in BUILTIN_SHAPES:
        raise InvalidArgument(f"unknown built-in dataset {spec.dataset!r}; known: {sorted(BUILTIN_SHAPES)}")
    if not 0 < spec.epochs <= MAX_EPOCHS:
        raise InvalidArgument(f"spec.epochs must be between 1 and {MAX_EPOCHS}, got {spec.epochs}")
    if not 0 < spec.batch_size <= 65_536:
        raise InvalidArgument(f"spec.batch_size must be between 1 and 65536, got {spec.batch_size}")
    if not (math.isfinite(spec.learning_rate) and 0 < spec.learning_rate <= 10):
        raise InvalidArgument(f"spec.learning_rate must be in (0, 10], got {spec.learning_rate}")
    if spec.optimizer not in OPTIMIZERS:
        raise InvalidArgument(f"spec.optimizer must be one of {list(OPTIMIZERS)}, got {spec.optimizer!r}")
    if not 0 < spec.validation_fraction < 1:
        raise InvalidArgument(f"spec.validation_fraction must be in (0, 1), got {spec.validation_fraction}")
    if spec.precision not in PRECISIONS:
        raise InvalidArgument(f"spec.precision must be one of {list(PRECISIONS)}, got {spec.precision!r}")
    if spec.device_class not in device_classes:
        raise InvalidArgument(f"unknown device class {spec.device_class!r}; known: {sorted(device_classes)}")
    if spec.precision == "fp16" and not spec.on_gpu:
        raise InvalidArgument("spec.precision fp16 needs a CUDA device class (use bf16 on cpu)")
    if not 1 <= spec.world_size <= max_world_size:
        raise InvalidArgument(f"spec.world_size must be between 1 and the configured maximum {max_world_size}, "
                              f"got {spec.world_size}")
    if spec.package:
        return validate_package(spec)
    spec = complete_architecture(spec)
    sizes.check(spec.model_spec(), limits)
    check_freeze(spec.freeze_layers, parameter_names(spec.model_spec()))
    return spec


def check_freeze(prefixes: tuple[str, ...], names: list[str]) -> None:
    """Every prefix must match a parameter, and at least one parameter must stay trainable."""
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise InvalidArgument(f"freeze_layers: {prefix!r} matches no parameter; parameters are {names}")
    if prefixes and all(any(n.startswith(p) for p in prefixes) for n in names):
        raise InvalidArgument("freeze_layers freezes every parameter: nothing would be trained")


def validate_package(spec: TrainSpec) -> TrainSpec:
    """A package job: its data must be a registry dataset, and its config plain JSON keyword arguments. The model's
    sizes are the package's business (it runs only in the worker's sandbox, under the sandbox's limits); layers to
    freeze are checked by the training service against a base version's recorded parameter names, or else by the
    sandbox before the first step."""
    if spec.dataset:
        raise InvalidArgument("a package job trains on a registry dataset (spec.dataset.registry: a dataset-npz "
                              "version), not a built-in one")
    if spec.architecture:
        raise InvalidArgument("a package job takes spec.config (build_model's keyword arguments), not "
                              "spec.architecture")
    if len(json.dumps(spec.config)) > 64 * 1024:
        raise InvalidArgument("spec.config is larger than 64 KiB")
    return spec


def parameter_count(spec: TrainSpec) -> int:
    """Trainable parameters of the spec's model, from its sizes (nothing is built); 1 for a package, whose size
    is not known before its code runs: its estimates count work in samples."""
    return 1 if spec.package else sizes.parameter_count(spec.model_spec())
