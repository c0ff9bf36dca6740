"""Inputs of a training run: the dataset (built-in or an uploaded .npz) and a base version's weights,
fetched from the registry on the tenant's behalf."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from margin.common.errors import InvalidArgument
from margin.modelzoo.datasets import Split, load_builtin, load_npz, split
from margin.modelzoo.spec import BaseRef, TrainSpec
from margin.sdk.channel import Connection
from margin.sdk.registry import RegistryClient
from margin.v1 import common_pb2


def _download(registry: RegistryClient, ref: BaseRef, directory: Path) -> Path:
    path = directory / "artifact"
    registry.download_to(common_pb2.VersionRef(model=ref.model, number=ref.number, alias=ref.alias), path)
    return path


def load_split(spec: TrainSpec, registry: Connection) -> Split:
    if spec.dataset:
        x, y = load_builtin(spec.dataset)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            x, y = load_npz(_download(RegistryClient(registry), spec.dataset_version, Path(tmp)))
    return split(x, y, spec.validation_fraction, spec.seed)


def check_fits(spec: TrainSpec, data: Split) -> None:
    arch = spec.architecture
    features = data.x_train.shape[1]
    expected = arch.get("input_dim") or (arch.get("image_size", 0) ** 2)
    if expected and expected != features:
        raise InvalidArgument(f"the dataset has {features} features but the architecture expects {expected}")
    classes = int(max(data.y_train.max(), data.y_val.max())) + 1
    if classes > arch.get("num_classes", classes):
        raise InvalidArgument(f"the dataset has {classes} classes but the architecture outputs "
                              f"{arch['num_classes']}")


def load_base_weights(model: nn.Module, spec: TrainSpec, registry: Connection) -> list[str]:
    """Copy the base version's weights into ``model``; returns the parameters that did not fit (re-initialized,
    e.g. a new classification head)."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_fitting(model, _download(RegistryClient(registry), spec.base, Path(tmp)))


def load_fitting(model: nn.Module, path: Path) -> list[str]:
    """Copy the tensors of the safetensors file ``path`` whose names and shapes fit into ``model``; returns the
    model's tensors that did not fit (left as they were)."""
    weights = load_file(path)
    own = model.state_dict()
    fitting = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return sorted(set(own) - set(fitting))


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Freeze parameters whose names start with any prefix; returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in prefixes):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def tensors(data: Split, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The (training, validation) arrays by name, as a :class:`~margin.worker.loop.Trainer` takes them."""
    return ({"x": tensor(data.x_train, device), "y": tensor(data.y_train, device)},
            {"x": tensor(data.x_val, device), "y": tensor(data.y_val, device)})
