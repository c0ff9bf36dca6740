"""Built-in datasets (shipped by packages, nothing downloaded) and a seeded train/validation split."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from margin.common.errors import InvalidArgument


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


@dataclass(frozen=True)
class Shape:
    features: int
    num_classes: int
    rows: int

    @property
    def image_size(self) -> int:
        return round(self.features ** 0.5)


# Built-in datasets and their shapes, known without loading them (the service validates and estimates with it).
BUILTIN_SHAPES = {"sklearn:digits": Shape(features=64, num_classes=10, rows=1797)}


def load_npz(path) -> tuple[np.ndarray, np.ndarray]:
    """An uploaded ``.npz`` dataset: arrays ``x`` (rows × features, numeric) and ``y`` (integer labels).
    Loaded with ``allow_pickle=False``: an object array is refused, never unpickled."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise InvalidArgument(f"dataset needs arrays 'x' and 'y'; it has {sorted(data.files)}")
            x, y = data["x"], data["y"]
    except ValueError as err:
        raise InvalidArgument(f"dataset is not a plain-array .npz: {err}") from None
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) < 2:
        raise InvalidArgument(f"dataset shapes must be x: (n, features), y: (n,) with n >= 2; got {x.shape} and "
                              f"{y.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.integer):
        raise InvalidArgument(f"dataset x must be numeric and y integer; got {x.dtype} and {y.dtype}")
    if y.min() < 0:
        raise InvalidArgument("dataset labels must be >= 0")
    return x.astype(np.float32), y.astype(np.int64)


@functools.cache
def load_builtin(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32, scaled to [0, 1]) and integer labels of a built-in dataset (read once per process;
    callers index it, which copies, and never write to it)."""
    if name == "sklearn:digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    raise InvalidArgument(f"unknown built-in dataset {name!r}; known: ['sklearn:digits']")


def holdout(rows: int, validation_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (training, held out): a seeded permutation, the first ``validation_fraction`` of it held out."""
    if not 0.0 < validation_fraction < 1.0:
        raise InvalidArgument("validation_fraction must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(rows)
    n_val = max(1, round(rows * validation_fraction))
    return order[n_val:], order[:n_val]


def split(x: np.ndarray, y: np.ndarray, validation_fraction: float = 0.2, seed: int = 0) -> Split:
    train, val = holdout(len(x), validation_fraction, seed)
    return Split(x[train], y[train], x[val], y[val])
