"""The training loop of one rank: epochs of seeded shuffles, mixed precision, DDP when world_size > 1,
and a decision after every step (go on, or stop: cancelled, out of budget) that all ranks follow.

The loop owns no side effects: a :class:`Hooks` object (rank 0's :class:`~margin.worker.attempt.Attempt`,
or nothing on other ranks) renews the lease, accrues cost, checkpoints and reports.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from margin.modelzoo.spec import TrainSpec

CONTINUE, CANCEL, BUDGET = 0, 1, 2


@dataclass(frozen=True)
class Position:
    epoch: int   # epochs completed
    batch: int   # batches done in the current epoch
    step: int    # optimizer steps in all


@dataclass(frozen=True)
class Decision:
    code: int = CONTINUE
    message: str = ""

    @property
    def stop(self) -> bool:
        return self.code != CONTINUE


class Hooks(Protocol):
    def before_training(self, pos: Position) -> Decision: ...
    def after_step(self, pos: Position, loss: float, steps_left: int) -> Decision: ...
    def end_of_epoch(self, pos: Position, metrics: dict[str, float], trainer: Trainer) -> Decision: ...
    def stopped(self, decision: Decision, pos: Position, trainer: Trainer) -> None: ...
    def completed(self, trainer: Trainer, metrics: dict[str, float], train_seconds: float) -> None: ...


class NoHooks:
    """Ranks other than 0: follow rank 0's decisions, report nothing."""

    def before_training(self, pos):
        return Decision()

    def after_step(self, pos, loss, steps_left):
        return Decision()

    def end_of_epoch(self, pos, metrics, trainer):
        return Decision()

    def stopped(self, decision, pos, trainer):
        pass

    def completed(self, trainer, metrics, train_seconds):
        pass


def device_for(spec: TrainSpec, local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if spec.on_gpu else torch.device("cpu")


def autocast(spec: TrainSpec, device: torch.device):
    if spec.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if spec.precision == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Objective:
    """What a step optimizes and an evaluation reports. ``inputs``: the batch's arrays passed to the model,
    positionally in this order; ``loss(outputs, batch)`` (default: cross-entropy against ``batch["y"]``);
    ``metrics(outputs, batch)`` adds to the validation metrics (default: accuracy against ``batch["y"]``)."""
    inputs: tuple[str, ...] = ("x",)
    loss: Callable | None = None
    metrics: Callable | None = None

    def forward(self, net: nn.Module, batch: dict[str, torch.Tensor]):
        return net(*(batch[name] for name in self.inputs))

    def loss_of(self, outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss is not None:
            return self.loss(outputs, batch)
        return nn.functional.cross_entropy(outputs.float(), batch["y"])

    def metrics_of(self, outputs, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Accuracy against integer labels ``y`` when the outputs are (rows, classes) scores, and the package's own
        metrics (prefixed ``val_``)."""
        found: dict[str, float] = {}
        labels = batch.get("y")
        if (isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and labels is not None
                and not labels.is_floating_point() and labels.dim() == 1):
            found["val_accuracy"] = (outputs.float().argmax(1) == labels).float().mean().item()
        if self.metrics is not None:
            found.update({f"val_{k}": float(v) for k, v in self.metrics(outputs, batch).items()})
        return found


CLASSIFIER = Objective()


class Trainer:
    def __init__(self, spec: TrainSpec, model: nn.Module, data: tuple[dict, dict], device: torch.device,
                 rank: int = 0, world_size: int = 1, objective: Objective = CLASSIFIER):
        """``data``: the (training, validation) arrays by name, as tensors on ``device``."""
        self.spec, self.device, self.rank, self.world_size = spec, device, rank, world_size
        self.objective = objective
        self.model = model.to(device)
        self.train_data, self.val_data = data
        self.rows = len(next(iter(self.train_data.values())))
        self.net = nn.parallel.DistributedDataParallel(self.model) if world_size > 1 else self.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        if spec.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=spec.learning_rate, momentum=0.9)
        else:
            self.optimizer = torch.optim.Adam(params, lr=spec.learning_rate)
        self.scaler = torch.amp.GradScaler("cuda") if spec.precision == "fp16" else None
        per_rank = self.rows // world_size  # every rank takes the same number of steps
        self.per_rank = per_rank
        self.batches_per_epoch = max(1, math.ceil(per_rank / spec.batch_size))
        self.samples_trained = 0
        self.step_seconds = 0.0  # time in training steps only (forward, backward, gradient all-reduce, update)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def save_checkpoint(self, store, job_id: str, pos: Position) -> dict:
        """Write this trainer's state at ``pos`` to the job's checkpoint in ``store``; returns its record."""
        return store.save(job_id, self.state(pos))

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self, pos: Position) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state(), "epoch": pos.epoch, "batch": pos.batch, "step": pos.step}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def restore(self, checkpoint: dict) -> Position:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if self.scaler is not None and "scaler" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler"])
        return Position(int(checkpoint["epoch"]), int(checkpoint["batch"]), int(checkpoint["step"]))

    # -- the loop ---------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), autocast(self.spec, self.device):
            outputs = self.objective.forward(self.model, self.val_data)
            loss = self.objective.loss_of(outputs, self.val_data).item()
        return {"val_loss": loss, **self.objective.metrics_of(outputs, self.val_data)}

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + epoch)
        order = torch.randperm(self.rows, generator=generator)
        return order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].to(self.device)

    def _agree(self, decision: Decision) -> Decision:
        """Every rank follows rank 0's decision (one tiny all-reduce per step)."""
        if self.world_size == 1:
            return decision
        flag = torch.tensor([decision.code if self.rank == 0 else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return decision if self.rank == 0 else Decision(int(flag.item()))

    def step(self, idx: torch.Tensor) -> float:
        """One optimizer step on the samples ``idx``; returns the loss."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        batch = {name: values[idx] for name, values in self.train_data.items()}
        with autocast(self.spec, self.device):
            outputs = self.objective.forward(self.net, batch)
        loss = self.objective.loss_of(outputs, batch)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        value = loss.item()
        self.samples_trained += len(idx)
        self.step_seconds += time.perf_counter() - start
        return value

    def run(self, hooks: Hooks, start: Position) -> Decision:
        """Train from ``start`` to the last epoch, or until a hook says stop. Returns the final decision."""
        pos, total_steps = start, self.spec.epochs * self.batches_per_epoch
        train_start = time.perf_counter()
        metrics: dict[str, float] = {}
        decision = self._agree(hooks.before_training(start))
        if decision.stop:
            hooks.stopped(decision, start, self)
            return decision
        for epoch in range(start.epoch, self.spec.epochs):
            self.net.train()
            order = self._order(epoch)
            loss_sum, seen = 0.0, 0
            for batch in range(pos.batch if epoch == start.epoch else 0, self.batches_per_epoch):
                idx = order[batch * self.spec.batch_size:(batch + 1) * self.spec.batch_size]
                loss = self.step(idx)
                loss_sum, seen = loss_sum + loss * len(idx), seen + len(idx)
                pos = Position(epoch, batch + 1, pos.step + 1)
                decision = self._agree(hooks.after_step(pos, loss, total_steps - pos.step))
                if decision.stop:
                    hooks.stopped(decision, pos, self)
                    return decision
            pos = Position(epoch + 1, 0, pos.step)
            metrics = {"train_loss": loss_sum / max(seen, 1), **(self.evaluate() if self.rank == 0 else {})}
            decision = self._agree(hooks.end_of_epoch(pos, metrics, self))
            if decision.stop:
                hooks.stopped(decision, pos, self)
                return decision
        if self.rank == 0:
            metrics = {**metrics, **self.evaluate()}
        hooks.completed(self, metrics, time.perf_counter() - train_start)
        return Decision()
