"""A plain supervised training loop for classifiers (the job system of issue #4 builds on it)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from margin.modelzoo.datasets import Split


@dataclass(frozen=True)
class TrainResult:
    epochs: int
    seconds: float
    train_loss: float
    val_loss: float
    val_accuracy: float


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) on the given data."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        target = torch.from_numpy(y)
        loss = nn.functional.cross_entropy(logits, target).item()
        accuracy = (logits.argmax(1) == target).float().mean().item()
    return loss, accuracy


def train_classifier(model: nn.Module, data: Split, *, epochs: int, batch_size: int = 64, lr: float = 1e-3,
                     seed: int = 0, max_seconds: float | None = None,
                     after_epoch: Callable[[int], None] | None = None) -> TrainResult:
    """Adam on cross-entropy; stops after ``epochs`` or once ``max_seconds`` have passed. ``after_epoch(n)`` runs
    after each epoch (a caller's cancel or budget check: it may raise to stop the training)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    generator = torch.Generator().manual_seed(seed)
    start, done, train_loss = time.perf_counter(), 0, float("nan")
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        train_loss, done = total / len(x), done + 1
        if after_epoch is not None:
            after_epoch(done)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    val_loss, val_accuracy = evaluate(model, data.x_val, data.y_val)
    return TrainResult(done, time.perf_counter() - start, train_loss, val_loss, val_accuracy)
