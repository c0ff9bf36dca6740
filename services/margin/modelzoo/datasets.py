"""Built-in datasets (shipped by packages, nothing downloaded) and a seeded train/validation split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from margin.common.errors import InvalidArgument


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def load_builtin(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32, scaled to [0, 1]) and integer labels of a built-in dataset."""
    if name == "sklearn:digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    raise InvalidArgument(f"unknown built-in dataset {name!r}; known: ['sklearn:digits']")


def split(x: np.ndarray, y: np.ndarray, validation_fraction: float = 0.2, seed: int = 0) -> Split:
    if not 0.0 < validation_fraction < 1.0:
        raise InvalidArgument("validation_fraction must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, round(len(x) * validation_fraction))
    val, train = order[:n_val], order[n_val:]
    return Split(x[train], y[train], x[val], y[val])
