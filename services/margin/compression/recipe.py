"""Compression recipes: an ordered list of prune / distill / quantize steps, validated before anything runs.

The dataclasses mirror ``margin.v1.Recipe`` (``protos/margin/v1/compression.proto``). :meth:`Recipe.to_dict` gives
the proto's JSON shape (``{"name": ..., "steps": [{"prune": {...}}, ...], "keep_sensitive_layers": k}``, snake_case
field names, prune kinds as ``KIND_UNSTRUCTURED`` / ``KIND_STRUCTURED``), so the same dict serves job specs, the
registry's recipe record and ``google.protobuf.json_format.ParseDict``. :meth:`Recipe.from_dict` also accepts the
camelCase names ``MessageToDict`` writes, short kinds (``"unstructured"``) and the floats a ``Struct`` turns integers
into.

Fields missing from a dict take the dataclass defaults, chosen so that a proto field left at its zero value (which
``MessageToDict`` omits) means the same as in the proto: no prune amount (rejected by :func:`validate`), an
unspecified prune kind = unstructured, ``per_channel`` / ``smoothquant`` false, ``calibration_batches`` /
``group_size`` 0 = the runner's / scheme's default. A distill step's unset temperature, alpha, epochs and learning
rate take the defaults below (so an explicit alpha of 0 must be sent through the Python API or a dict, not a
proto).

:func:`validate` knows three kinds of source: the classifiers (``mlp``, ``cnn``), which take every technique;
the sentence encoder ``minilm``, whose recipes are quantize steps only, with the CPU schemes in
:data:`ENCODER_SCHEMES`; and any ``onnx`` model a team uploaded, whose recipes are ONNX Runtime's: an optional
``optimize`` step (offline graph optimization) and at most one quantize step with a scheme of :data:`ONNX_SCHEMES`,
in that order. Quantize is the last technique of a recipe; quantize steps may follow one another only when they
touch different layers (``embedding_int8`` and one Linear scheme).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from margin.common.errors import InvalidArgument
from margin.modelzoo import sizes
from margin.modelzoo.architectures import FAMILIES

PRUNE_KINDS = ("unstructured", "structured")
STRUCTURED_FAMILIES = ("mlp", "cnn")
ENCODER_FAMILIES = ("minilm",)
ONNX_FAMILY = "onnx"  # any ONNX model a team uploaded, compressed with ONNX Runtime's tools
# ONNX Runtime's schemes: dynamic int8 (MatMul/Gather/Conv weights), static int8 QDQ calibrated on the tenant's
# dataset, int4 weight-only MatMul (MatMulNBits), fp16 with the model's I/O types kept (GPU device classes).
ONNX_SCHEMES = ("dynamic_int8", "static_int8", "weight_only_int4", "fp16")
OPTIMIZE_LEVELS = ("basic", "extended")
INT4_GROUP_SIZES = (16, 32, 64, 128, 256)
# The schemes an encoder takes: int8 on CPU (fp16/bf16/torchao would need a GPU device class).
ENCODER_SCHEMES = ("embedding_int8", "dynamic_int8", "dynamic_int8_per_token", "weight_only_int8")
# The layers each scheme quantizes; a scheme not listed rewrites the whole model.
SCHEME_TARGETS = {"embedding_int8": "embeddings", "dynamic_int8": "linear", "dynamic_int8_per_token": "linear",
                  "weight_only_int8": "linear"}


@dataclass(frozen=True)
class PruneStep:
    kind: str = "unstructured"  # "unstructured" (global magnitude) | "structured" (removes neurons / channels)
    amount: float = 0.0  # fraction of weights (unstructured) or of each hidden layer's units (structured), in (0, 1)
    finetune_epochs: int = 0
    skip_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizeStep:
    scheme: str = "dynamic_int8"
    per_channel: bool = False  # the proto3 default: absent means per-tensor
    calibration_batches: int = 8  # static schemes; 0 = the caller's default
    skip_layers: tuple[str, ...] = ()
    group_size: int = 0  # int4 group size; 0 = the scheme's default
    smoothquant: bool = False  # dynamic_int8_per_token: calibrate SmoothQuant scales first


@dataclass(frozen=True)
class DistillStep:
    student_family: str = "mlp"
    # Architecture of the student without "family"; input_dim / image_size / num_classes may be left out and are
    # then taken from the data (see :func:`student_spec`).
    student_architecture: dict = field(default_factory=dict)
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft-target loss
    epochs: int = 20
    learning_rate: float = 1e-3


@dataclass(frozen=True)
class OptimizeStep:
    level: str = "extended"  # ONNX Runtime's offline graph optimization level: "basic" | "extended"


Step = PruneStep | QuantizeStep | DistillStep | OptimizeStep


@dataclass(frozen=True)
class Recipe:
    name: str = ""
    steps: tuple[Step, ...] = ()
    keep_sensitive_layers: int = 0  # quantize: keep this many most sensitive layers at full precision

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": [_step_to_dict(s) for s in self.steps],
                "keep_sensitive_layers": self.keep_sensitive_layers}

    @classmethod
    def from_dict(cls, data: Mapping) -> Recipe:
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"recipe must be an object, got {type(data).__name__}")
        steps = _get(data, "steps", [])
        if not isinstance(steps, (list, tuple)):
            raise InvalidArgument("recipe.steps must be a list")
        return cls(name=str(_get(data, "name", "")), steps=tuple(_step_from_dict(s, i) for i, s in enumerate(steps)),
                   keep_sensitive_layers=_int(_get(data, "keep_sensitive_layers", 0), "recipe.keep_sensitive_layers"))


def to_dict(recipe: Recipe) -> dict:
    return recipe.to_dict()


def from_dict(data: Mapping) -> Recipe:
    return Recipe.from_dict(data)


# ---------------------------------------------------------------------------------------------------- validation


def known_schemes() -> tuple[str, ...]:
    from margin.compression.quantize import SCHEMES

    return tuple(SCHEMES)


def student_spec(step: DistillStep, *, input_dim: int, num_classes: int) -> dict:
    """The student's full architecture spec: the step's architecture plus its family, with the data's input size and
    number of classes filled in where the step leaves them out (``image_size`` for a cnn)."""
    spec = {**step.student_architecture, "family": step.student_family}
    spec.setdefault("num_classes", num_classes)
    if step.student_family == "cnn":
        spec.setdefault("image_size", math.isqrt(input_dim))
    else:
        spec.setdefault("input_dim", input_dim)
    return spec


def validate(recipe: Recipe, *, family: str, input_dim: int = 0, num_classes: int = 0) -> None:
    """Raise :class:`InvalidArgument` naming the first problem, before any work is done.

    ``family`` is the source model's family; ``input_dim`` and ``num_classes`` describe a classifier's data (an
    encoder has none).
    """
    if not isinstance(recipe, Recipe):
        raise InvalidArgument(f"expected a Recipe, got {type(recipe).__name__}")
    if not recipe.steps:
        raise InvalidArgument(f"recipe {recipe.name!r} has no steps")
    if not isinstance(recipe.keep_sensitive_layers, int) or recipe.keep_sensitive_layers < 0:
        raise InvalidArgument(f"keep_sensitive_layers must be >= 0, got {recipe.keep_sensitive_layers!r}")
    if family == ONNX_FAMILY:
        _validate_onnx(recipe)
        return
    encoder = family in ENCODER_FAMILIES
    if encoder and recipe.keep_sensitive_layers:
        raise InvalidArgument(f"keep_sensitive_layers is not supported for {family}: layer sensitivity is measured "
                              f"as classification accuracy")
    current = family  # the family of the model each step receives
    for i, step in enumerate(recipe.steps):
        where = f"step {i + 1} ({type(step).__name__})"
        if encoder and not isinstance(step, QuantizeStep):
            technique = {PruneStep: "prune", DistillStep: "distill"}.get(type(step), type(step).__name__)
            raise InvalidArgument(f"{where}: {technique} is not supported for {family}: its recipes are quantize "
                                  f"steps only, with schemes {list(ENCODER_SCHEMES)}")
        if i > 0 and isinstance(recipe.steps[i - 1], QuantizeStep):
            _validate_after_quantize(recipe.steps[:i], step, where)
        if isinstance(step, OptimizeStep):
            raise InvalidArgument(f"{where}: optimize is ONNX Runtime's graph optimization: it applies to onnx "
                                  f"sources, not {family!r}")
        if isinstance(step, PruneStep):
            _validate_prune(step, where, current)
        elif isinstance(step, QuantizeStep):
            _validate_quantize(step, where, family)
        elif isinstance(step, DistillStep):
            _validate_distill(step, where, current, input_dim=input_dim, num_classes=num_classes)
            current = step.student_family
        else:
            raise InvalidArgument(f"step {i + 1}: unknown step type {type(step).__name__}")


def _validate_onnx(recipe: Recipe) -> None:
    """An ONNX source's recipe: an optional optimize step, then at most one quantize step of :data:`ONNX_SCHEMES`
    (ONNX Runtime cannot quantize a graph it has already quantized)."""
    if recipe.keep_sensitive_layers:
        raise InvalidArgument("keep_sensitive_layers is not supported for onnx sources; name the nodes to keep in "
                              "float with the quantize step's skip_layers")
    kinds = [type(s) for s in recipe.steps]
    for i, step in enumerate(recipe.steps):
        where = f"step {i + 1} ({type(step).__name__})"
        if isinstance(step, OptimizeStep):
            if step.level not in OPTIMIZE_LEVELS:
                raise InvalidArgument(f"{where}: unknown optimization level {step.level!r}; known: "
                                      f"{list(OPTIMIZE_LEVELS)}")
            if i != 0:
                raise InvalidArgument(f"{where}: optimize must be the first step (the graph is optimized, then "
                                      "quantized)")
        elif isinstance(step, QuantizeStep):
            if kinds.count(QuantizeStep) > 1:
                raise InvalidArgument(f"{where}: an onnx recipe has at most one quantize step: ONNX Runtime cannot "
                                      "quantize a graph it has already quantized")
            if step.scheme not in ONNX_SCHEMES:
                raise InvalidArgument(f"{where}: quantization scheme {step.scheme!r} is not supported for onnx "
                                      f"sources; use one of {list(ONNX_SCHEMES)}")
            if step.smoothquant:
                raise InvalidArgument(f"{where}: smoothquant is not supported for onnx sources")
            _non_negative(step.calibration_batches, f"{where}: calibration_batches")
            _non_negative(step.group_size, f"{where}: group_size")
            if step.group_size and step.group_size not in INT4_GROUP_SIZES:
                raise InvalidArgument(f"{where}: group_size must be one of {list(INT4_GROUP_SIZES)}, got "
                                      f"{step.group_size}")
            _names(step.skip_layers, f"{where}: skip_layers")
        else:
            technique = {PruneStep: "prune", DistillStep: "distill"}.get(type(step), type(step).__name__)
            raise InvalidArgument(f"{where}: {technique} is not supported for onnx sources: their recipes are an "
                                  f"optional optimize step and one quantize step with schemes {list(ONNX_SCHEMES)}")


def _validate_prune(step: PruneStep, where: str, family: str) -> None:
    if step.kind not in PRUNE_KINDS:
        raise InvalidArgument(f"{where}: unknown prune kind {step.kind!r}; known: {list(PRUNE_KINDS)}")
    if not _is_number(step.amount) or not 0.0 < step.amount < 1.0:
        raise InvalidArgument(f"{where}: prune amount must be in (0, 1), got {step.amount!r}")
    _non_negative(step.finetune_epochs, f"{where}: finetune_epochs")
    _names(step.skip_layers, f"{where}: skip_layers")
    if step.kind == "structured" and family not in STRUCTURED_FAMILIES:
        raise InvalidArgument(f"{where}: structured pruning supports families {list(STRUCTURED_FAMILIES)}, "
                              f"not {family!r}")


def _validate_after_quantize(before: Sequence[Step], step: Step, where: str) -> None:
    """Only a quantize step may follow a quantize step, and only one that touches other layers."""
    if not isinstance(step, QuantizeStep):
        raise InvalidArgument(f"{where}: quantize must be the last step: a quantized model cannot be pruned, "
                              f"distilled or quantized again")
    done = [s.scheme for s in before if isinstance(s, QuantizeStep)]
    touched = [SCHEME_TARGETS.get(scheme, "model") for scheme in done]
    target = SCHEME_TARGETS.get(step.scheme, "model")
    if target == "model" or "model" in touched or target in touched:
        raise InvalidArgument(f"{where}: {step.scheme} after {' + '.join(done)}: a quantized model cannot be "
                              f"quantized again; quantize steps combine only when they touch different layers "
                              f"(embedding_int8 with one Linear scheme)")


def _validate_quantize(step: QuantizeStep, where: str, family: str) -> None:
    schemes = known_schemes()
    if step.scheme not in schemes:
        raise InvalidArgument(f"{where}: unknown quantization scheme {step.scheme!r}; known: {list(schemes)}")
    if family in ENCODER_FAMILIES and step.scheme not in ENCODER_SCHEMES:
        raise InvalidArgument(f"{where}: quantization scheme {step.scheme!r} is not supported for {family}; use one "
                              f"of {list(ENCODER_SCHEMES)}")
    if step.smoothquant and step.scheme != "dynamic_int8_per_token":
        raise InvalidArgument(f"{where}: smoothquant applies to dynamic_int8_per_token only, not {step.scheme!r}")
    _non_negative(step.calibration_batches, f"{where}: calibration_batches")
    _non_negative(step.group_size, f"{where}: group_size")
    _names(step.skip_layers, f"{where}: skip_layers")


def _validate_distill(step: DistillStep, where: str, teacher_family: str, *, input_dim: int, num_classes: int) -> None:
    if teacher_family not in FAMILIES:
        raise InvalidArgument(f"{where}: distillation needs a classifier teacher ({sorted(FAMILIES)}), "
                              f"not {teacher_family!r}")
    if step.student_family not in FAMILIES:
        raise InvalidArgument(f"{where}: unknown student family {step.student_family!r}; known: {sorted(FAMILIES)}")
    if not isinstance(step.student_architecture, Mapping):
        raise InvalidArgument(f"{where}: student_architecture must be an object")
    if step.student_architecture.get("family", step.student_family) != step.student_family:
        raise InvalidArgument(f"{where}: student_architecture.family {step.student_architecture['family']!r} "
                              f"contradicts student_family {step.student_family!r}")
    if not _is_number(step.temperature) or step.temperature <= 0:
        raise InvalidArgument(f"{where}: temperature must be > 0, got {step.temperature!r}")
    if not _is_number(step.alpha) or not 0.0 <= step.alpha <= 1.0:
        raise InvalidArgument(f"{where}: alpha must be in [0, 1], got {step.alpha!r}")
    _non_negative(step.epochs, f"{where}: epochs")
    if not _is_number(step.learning_rate) or step.learning_rate <= 0:
        raise InvalidArgument(f"{where}: learning_rate must be > 0, got {step.learning_rate!r}")
    spec = student_spec(step, input_dim=input_dim, num_classes=num_classes)
    problems = []
    if spec["num_classes"] != num_classes:
        problems.append(f"it has {spec['num_classes']} classes, the data {num_classes}")
    if step.student_family == "cnn":
        size = spec["image_size"]
        if not isinstance(size, (int, float)) or size * size != input_dim:
            problems.append(f"its {size!r}x{size!r} images have {size * size if _is_number(size) else '?'} "
                            f"inputs, the data {input_dim} features")
    elif spec["input_dim"] != input_dim:
        problems.append(f"it takes {spec['input_dim']} inputs, the data has {input_dim} features")
    if problems:
        raise InvalidArgument(f"{where}: student {step.student_family} {dict(step.student_architecture)} is "
                              f"incompatible with the data: {'; '.join(problems)}")
    try:
        sizes.check(spec, what="student_architecture")
    except InvalidArgument as err:
        raise InvalidArgument(f"{where}: student architecture: {err}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_negative(value, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"{what} must be a non-negative integer, got {value!r}")


def _names(values, what: str) -> None:
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, str) and v for v in values):
        raise InvalidArgument(f"{what} must be a list of layer names")


# ---------------------------------------------------------------------------------------------------- (de)serialize

_KIND_TO_PROTO = {"unstructured": "KIND_UNSTRUCTURED", "structured": "KIND_STRUCTURED"}
_KIND_FROM_PROTO = {**{v: k for k, v in _KIND_TO_PROTO.items()}, "unstructured": "unstructured",
                    "structured": "structured", "KIND_UNSPECIFIED": "unstructured", 0: "unstructured",
                    1: "unstructured", 2: "structured"}


def _step_to_dict(step: Step) -> dict:
    if isinstance(step, PruneStep):
        return {"prune": {"kind": _KIND_TO_PROTO.get(step.kind, step.kind), "amount": step.amount,
                          "finetune_epochs": step.finetune_epochs, "skip_layers": list(step.skip_layers)}}
    if isinstance(step, QuantizeStep):
        return {"quantize": {"scheme": step.scheme, "per_channel": step.per_channel,
                             "calibration_batches": step.calibration_batches,
                             "skip_layers": list(step.skip_layers), "group_size": step.group_size,
                             "smoothquant": step.smoothquant}}
    if isinstance(step, OptimizeStep):
        return {"optimize": {"level": step.level}}
    if isinstance(step, DistillStep):
        return {"distill": {"student_family": step.student_family,
                            "student_architecture": dict(step.student_architecture),
                            "temperature": step.temperature, "alpha": step.alpha, "epochs": step.epochs,
                            "learning_rate": step.learning_rate}}
    raise InvalidArgument(f"unknown step type {type(step).__name__}")


def _step_from_dict(data, index: int) -> Step:
    where = f"recipe.steps[{index}]"
    if not isinstance(data, Mapping) or len(data) != 1:
        raise InvalidArgument(f"{where} must be an object with exactly one of 'prune', 'quantize', 'distill', "
                              "'optimize'")
    (technique, body), = data.items()
    if not isinstance(body, Mapping):
        raise InvalidArgument(f"{where}.{technique} must be an object")
    if technique == "prune":
        kind = _get(body, "kind", "KIND_UNSPECIFIED")
        if not isinstance(kind, (str, int)) or isinstance(kind, bool) or kind not in _KIND_FROM_PROTO:
            raise InvalidArgument(f"{where}: unknown prune kind {kind!r}; known: {list(PRUNE_KINDS)}")
        return PruneStep(kind=_KIND_FROM_PROTO[kind], amount=_float(_get(body, "amount", 0.0), f"{where}.amount"),
                         finetune_epochs=_int(_get(body, "finetune_epochs", 0), f"{where}.finetune_epochs"),
                         skip_layers=_strs(_get(body, "skip_layers", []), f"{where}.skip_layers"))
    if technique == "quantize":
        return QuantizeStep(scheme=str(_get(body, "scheme", "dynamic_int8")),
                            per_channel=bool(_get(body, "per_channel", False)),
                            calibration_batches=_int(_get(body, "calibration_batches", 8),
                                                     f"{where}.calibration_batches"),
                            skip_layers=_strs(_get(body, "skip_layers", []), f"{where}.skip_layers"),
                            group_size=_int(_get(body, "group_size", 0), f"{where}.group_size"),
                            smoothquant=bool(_get(body, "smoothquant", False)))
    if technique == "distill":
        arch = _get(body, "student_architecture", {})
        if not isinstance(arch, Mapping):
            raise InvalidArgument(f"{where}.student_architecture must be an object")
        defaults = DistillStep()
        return DistillStep(student_family=str(_get(body, "student_family", defaults.student_family)),
                           student_architecture=_integral(dict(arch)),
                           temperature=_float(_get(body, "temperature", defaults.temperature), f"{where}.temperature"),
                           alpha=_float(_get(body, "alpha", defaults.alpha), f"{where}.alpha"),
                           epochs=_int(_get(body, "epochs", defaults.epochs), f"{where}.epochs"),
                           learning_rate=_float(_get(body, "learning_rate", defaults.learning_rate),
                                                f"{where}.learning_rate"))
    if technique == "optimize":
        return OptimizeStep(level=str(_get(body, "level", "") or OptimizeStep.level))
    raise InvalidArgument(f"{where}: unknown technique {technique!r}; known: ['prune', 'quantize', 'distill', "
                          "'optimize']")


def _get(data: Mapping, key: str, default):
    """``data[key]`` under its snake_case or camelCase name."""
    if key in data:
        return data[key]
    head, *rest = key.split("_")
    return data.get(head + "".join(p.title() for p in rest), default)


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidArgument(f"{what} must be an integer, got {value!r}")
    try:
        as_float = float(value)
    except ValueError:
        raise InvalidArgument(f"{what} must be an integer, got {value!r}") from None
    if not math.isfinite(as_float) or as_float != int(as_float):
        raise InvalidArgument(f"{what} must be an integer, got {value!r}")
    return int(as_float)


def _float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidArgument(f"{what} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise InvalidArgument(f"{what} must be a number, got {value!r}") from None


def _strs(values, what: str) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise InvalidArgument(f"{what} must be a list of strings")
    return tuple(values)


def _integral(value):
    """Struct stores every number as a float: turn 128.0 back into 128 (recursively) so architectures rebuild."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value
