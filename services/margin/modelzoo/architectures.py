"""Model families built from a JSON architecture spec, so a version is weights (safetensors) + spec.

- ``mlp``: ``{"family": "mlp", "input_dim": 64, "hidden": [128], "num_classes": 10, "dropout": 0.0}``
- ``cnn``: ``{"family": "cnn", "image_size": 8, "channels": [16, 32], "num_classes": 10}`` on 1-channel images
  given flat (batch, image_size²) like sklearn's digits; it reshapes internally.

:func:`signature` is what either family takes and returns, as registered with its versions.
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn

from margin.common.errors import InvalidArgument
from margin.common.tensors import Signature, TensorSpec


def _positive_int(spec: dict, key: str, default: int | None = None) -> int:
    value = spec.get(key, default)
    if not isinstance(value, (int, float)) or int(value) != value or value <= 0:
        raise InvalidArgument(f"architecture.{key} must be a positive integer, got {value!r}")
    return int(value)


def _int_list(spec: dict, key: str, default: list[int]) -> list[int]:
    values = spec.get(key, default)
    if not isinstance(values, list) or not values:
        raise InvalidArgument(f"architecture.{key} must be a non-empty list of positive integers")
    return [_positive_int({key: v}, key) for v in values]


def build_mlp(spec: dict) -> nn.Module:
    dims = [_positive_int(spec, "input_dim"), *_int_list(spec, "hidden", [128])]
    dropout = float(spec.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise InvalidArgument("architecture.dropout must be in [0, 1)")
    layers: list[nn.Module] = []
    for a, b in pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    layers.append(nn.Linear(dims[-1], _positive_int(spec, "num_classes")))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    def __init__(self, image_size: int, channels: list[int], num_classes: int):
        super().__init__()
        self.image_size = image_size
        convs: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            convs += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*convs)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(c_in * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, self.image_size, self.image_size)
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def build_cnn(spec: dict) -> nn.Module:
    return SmallCNN(_positive_int(spec, "image_size", 8), _int_list(spec, "channels", [16, 32]),
                    _positive_int(spec, "num_classes"))


FAMILIES: dict[str, Callable[[dict], nn.Module]] = {"mlp": build_mlp, "cnn": build_cnn}


def build_model(spec: dict) -> nn.Module:
    family = spec.get("family")
    if family not in FAMILIES:
        raise InvalidArgument(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family](spec)


def signature(arch: dict) -> Signature:
    """A classifier's signature from its architecture: (batch, features) FP32 in, (batch, classes) logits out."""
    features = arch.get("input_dim") or arch["image_size"] ** 2
    return Signature((TensorSpec("input", "FP32", (-1, features)),),
                     (TensorSpec("logits__0", "FP32", (-1, arch["num_classes"])),))
