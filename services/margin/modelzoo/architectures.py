"""Model families built from a JSON architecture spec, so a version is weights (safetensors) + spec.

- ``mlp``: ``{"family": "mlp", "input_dim": 64, "hidden": [128], "num_classes": 10, "dropout": 0.0}``
- ``cnn``: ``{"family": "cnn", "image_size": 8, "channels": [16, 32], "num_classes": 10}`` on 1-channel images
  given flat (batch, image_size²) like sklearn's digits; it reshapes internally.

:func:`signature` is what either family takes and returns, as registered with its versions. The sizes are read and
checked by :mod:`margin.modelzoo.sizes` (which also counts parameters and applies the configured limits without
building anything).
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn

from margin.common.errors import InvalidArgument
from margin.common.tensors import Signature, TensorSpec
from margin.modelzoo import sizes


def build_mlp(spec: dict) -> nn.Module:
    s = sizes.mlp_sizes(spec)
    layers: list[nn.Module] = []
    for a, b in pairwise(s.dims):
        layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(s.dropout)] if s.dropout else [])
    layers.append(nn.Linear(s.dims[-1], s.num_classes))
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
    s = sizes.cnn_sizes(spec)
    return SmallCNN(s.image_size, list(s.channels), s.num_classes)


FAMILIES: dict[str, Callable[[dict], nn.Module]] = {"mlp": build_mlp, "cnn": build_cnn}


def build_model(spec: dict) -> nn.Module:
    family = spec.get("family")
    if family not in FAMILIES:
        raise InvalidArgument(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family](spec)


def parameter_names(spec: dict) -> list[str]:
    """The names of the parameters of the model ``spec`` builds, from a build on the meta device (shapes only,
    no memory): callers check the spec's sizes (:func:`margin.modelzoo.sizes.check`) first."""
    with torch.device("meta"):
        return [name for name, _ in build_model(spec).named_parameters()]


def signature(arch: dict) -> Signature:
    """A classifier's signature from its architecture: (batch, features) FP32 in, (batch, classes) logits out."""
    features = arch.get("input_dim") or arch["image_size"] ** 2
    return Signature((TensorSpec("input", "FP32", (-1, features)),),
                     (TensorSpec("logits__0", "FP32", (-1, arch["num_classes"])),))
