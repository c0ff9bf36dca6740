"""Quality of a variant's outputs on held-out data, by the metric a floor names.

The outputs compared are a model's first output, row by row, against the fp32 source's on the same rows (or, for
``accuracy``, against the dataset's labels ``y``):

- ``accuracy``: the share of rows whose argmax over the last axis equals the label;
- ``agreement``: the share of argmax positions (rows × any middle axes) equal to the source's;
- ``cosine``: per row, the cosine similarity of the flattened output to the source's; the mean, and the worst row;
- ``relative_error``: per row, ``‖output − source‖ / ‖source‖``; the mean, and the worst row. Lower is better: a floor
  on it is a ceiling (a variant meets it when its error is at most the floor's ``minimum``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from margin.common.errors import InvalidArgument

METRICS = ("accuracy", "agreement", "cosine", "relative_error")
LOWER_IS_BETTER = frozenset({"relative_error"})
EPS = 1e-12


@dataclass(frozen=True)
class Quality:
    mean: float  # the quality metric (the floor compares this)
    minimum: float | None = None  # the worst single example, where the metric has one (cosine, relative error)


def meets(metric: str, value: float, floor: float) -> bool:
    """Whether ``value`` of ``metric`` meets a floor of ``floor`` (a ceiling for a lower-is-better metric)."""
    return value <= floor if metric in LOWER_IS_BETTER else value >= floor


def goodness(metric: str, value: float) -> float:
    """``value`` turned so that higher is better, for comparing variants."""
    return -value if metric in LOWER_IS_BETTER else value


def _rows(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(len(a), -1)


def score(metric: str, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None) -> Quality:
    """``metric`` of ``outputs`` against the source's ``reference`` outputs (or ``labels``), as :class:`Quality`."""
    if outputs.shape != reference.shape:
        raise InvalidArgument(f"the variant's output has shape {list(outputs.shape)}, the source's "
                              f"{list(reference.shape)}")
    if metric == "accuracy":
        if labels is None:
            raise InvalidArgument("accuracy needs labels: the dataset has no array 'y'")
        return Quality(float(np.mean(outputs.reshape(len(outputs), -1).argmax(-1) == labels)))
    if metric == "agreement":
        return Quality(float(np.mean(outputs.argmax(-1) == reference.argmax(-1))))
    out, ref = _rows(outputs), _rows(reference)
    if metric == "cosine":
        cos = (out * ref).sum(1) / np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1), EPS)
        return Quality(float(cos.mean()), float(cos.min()))
    if metric == "relative_error":
        err = np.linalg.norm(out - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), EPS)
        return Quality(float(err.mean()), float(err.max()))
    raise InvalidArgument(f"unknown quality metric {metric!r}; known: {list(METRICS)}")
