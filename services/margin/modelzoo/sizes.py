"""An architecture spec's sizes, checked and counted from the spec alone — no model is built, and no torch.

The services (training, compression) accept a spec only when every size is a positive whole number within
:class:`SizeLimits` (defaults an operator can raise: ``MARGIN_MAX_LAYER_WIDTH``, ``MARGIN_MAX_LAYERS``,
``MARGIN_MAX_MODEL_PARAMETERS``); the parameter count the estimates use is arithmetic on those sizes, the same
number ``sum(p.numel() for p in build_model(spec).parameters())`` gives. Messages name the field
(``architecture.hidden[1]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

from margin.common import config
from margin.common.errors import InvalidArgument

FAMILY_NAMES = ("cnn", "mlp")
DEFAULT_HIDDEN = (128,)
DEFAULT_CHANNELS = (16, 32)
DEFAULT_IMAGE_SIZE = 8
CNN_POOLED = 4  # the cnn's AdaptiveAvgPool2d(2): 2x2 values per channel reach the head


@dataclass(frozen=True)
class SizeLimits:
    max_parameters: int
    max_width: int
    max_layers: int

    @classmethod
    def from_env(cls) -> SizeLimits:
        return cls(config.MAX_MODEL_PARAMETERS.get_int(), config.MAX_LAYER_WIDTH.get_int(),
                   config.MAX_LAYERS.get_int())


@dataclass(frozen=True)
class MlpSizes:
    input_dim: int
    hidden: tuple[int, ...]
    num_classes: int
    dropout: float

    @property
    def dims(self) -> list[int]:
        return [self.input_dim, *self.hidden]

    @property
    def input_features(self) -> int:
        return self.input_dim

    def parameters(self) -> int:
        dims = [*self.dims, self.num_classes]
        return sum(a * b + b for a, b in pairwise(dims))


@dataclass(frozen=True)
class CnnSizes:
    image_size: int
    channels: tuple[int, ...]
    num_classes: int

    @property
    def input_features(self) -> int:
        return self.image_size ** 2  # 1-channel images given flat

    def parameters(self) -> int:
        total, c_in = 0, 1
        for c_out in self.channels:
            total += c_in * c_out * 9 + c_out + 2 * c_out  # Conv2d(3x3) weight + bias, BatchNorm2d weight + bias
            c_in = c_out
        return total + c_in * CNN_POOLED * self.num_classes + self.num_classes


def positive_int(spec: dict, key: str, default: int | None = None, where: str = "") -> int:
    """``spec[key]`` as a positive whole number (Struct numbers arrive as floats: 8.0 is 8); a bool, a string,
    a fraction, NaN or ±inf is INVALID_ARGUMENT naming ``architecture.<key>``."""
    value = spec.get(key, default)
    name = where or f"architecture.{key}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())) or value <= 0:
        raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def int_list(spec: dict, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    values = spec.get(key, list(default))
    if not isinstance(values, (list, tuple)) or not values:
        raise InvalidArgument(f"architecture.{key} must be a non-empty list of positive integers")
    return tuple(positive_int({key: v}, key, where=f"architecture.{key}[{i}]") for i, v in enumerate(values))


def mlp_sizes(spec: dict) -> MlpSizes:
    dropout = spec.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise InvalidArgument(f"architecture.dropout must be a number in [0, 1), got {dropout!r}")
    return MlpSizes(positive_int(spec, "input_dim"), int_list(spec, "hidden", DEFAULT_HIDDEN),
                    positive_int(spec, "num_classes"), float(dropout))


def cnn_sizes(spec: dict) -> CnnSizes:
    return CnnSizes(positive_int(spec, "image_size", DEFAULT_IMAGE_SIZE), int_list(spec, "channels", DEFAULT_CHANNELS),
                    positive_int(spec, "num_classes"))


def sizes(spec: dict) -> MlpSizes | CnnSizes:
    """The sizes of a spec with its ``family``, each checked to be a positive whole number (no limits)."""
    family = spec.get("family")
    if family == "mlp":
        return mlp_sizes(spec)
    if family == "cnn":
        return cnn_sizes(spec)
    raise InvalidArgument(f"unknown model family {family!r}; known: {list(FAMILY_NAMES)}")


def check(spec: dict, limits: SizeLimits | None = None, what: str = "architecture") -> int:
    """Check a spec (with its ``family``) against ``limits`` (default: the configured ones) before anything is
    built; returns its parameter count. ``what`` names the spec in messages (e.g. a distillation student)."""
    limits = limits or SizeLimits.from_env()
    s = sizes(spec)
    layers = s.hidden if isinstance(s, MlpSizes) else s.channels
    key = "hidden" if isinstance(s, MlpSizes) else "channels"
    if len(layers) > limits.max_layers:
        raise InvalidArgument(f"{what}.{key} has {len(layers)} layers; the limit is {limits.max_layers} "
                              f"(MARGIN_MAX_LAYERS)")
    inputs = f"{what}.input_dim" if isinstance(s, MlpSizes) else f"{what}.image_size squared (the input features)"
    widths = [(inputs, s.input_features), *((f"{what}.{key}[{i}]", w) for i, w in enumerate(layers)),
              (f"{what}.num_classes", s.num_classes)]
    for name, width in widths:
        if width > limits.max_width:
            raise InvalidArgument(f"{name} is {width}; the limit is {limits.max_width} (MARGIN_MAX_LAYER_WIDTH)")
    params = s.parameters()
    if params > limits.max_parameters:
        raise InvalidArgument(f"{what} has {params} parameters; the limit is {limits.max_parameters} "
                              f"(MARGIN_MAX_MODEL_PARAMETERS)")
    return params


def parameter_count(spec: dict) -> int:
    """Trainable parameters of the model a spec (with its ``family``) builds, from its sizes."""
    return sizes(spec).parameters()
