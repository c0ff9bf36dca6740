"""Rank 0's side of one attempt at a job: the lease, the meter, budget stops, cancels, checkpoints, events,
and the end (a registered version, or a stop with a checkpoint).

Cost accrues from the attempt's wall clock × devices (``device-seconds × price + energy``, via the price
catalog), so start-up, data loading, checkpoints and registration are all paid for. Before each step the
attempt projects the cost of the next step plus a final checkpoint; if that would cross the job's budget,
it checkpoints and ends BUDGET_EXCEEDED, so spend stays at or under the budget.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque

from margin.common.jobs import BUDGET_EXCEEDED, CANCELLED, RUNNING, SUCCEEDED, Lease
from margin.common.tenancy import utcnow
from margin.modelzoo.spec import TrainSpec
from margin.sdk.channel import Connection
from margin.worker import publish
from margin.worker.context import WorkerContext
from margin.worker.jobrun import JobRun
from margin.worker.loop import BUDGET, CANCEL, Decision, Position, Trainer

log = logging.getLogger(__name__)

FINAL_RESERVE_S = 0.25  # wall seconds kept back for the last checkpoint and the finishing writes


class Attempt(JobRun):
    def __init__(self, ctx: WorkerContext, lease: Lease, spec: TrainSpec, registry: Connection,
                 started: float, single_samples_per_s: float | None = None):
        super().__init__(ctx, lease, spec.device_class, spec.world_size, started)
        self.spec, self.registry = spec, registry
        self.world = spec.world_size
        self.single_samples_per_s = single_samples_per_s
        self.step_times: deque[float] = deque(maxlen=20)
        self.last_step_at = time.perf_counter()
        self.last_beat = 0.0
        self.checkpoint_seconds = 0.05
        self.loss = math.nan
        self.total_epochs = spec.epochs

    def budget_decision(self) -> Decision:
        budget = self.lease.job.budget_micros
        if not budget:
            return Decision()
        next_step = max(self.step_times, default=0.05) * 1.5
        projected = self.micros(self.device_seconds(next_step + self.checkpoint_seconds * 1.5 + FINAL_RESERVE_S))
        if projected > budget:
            return Decision(BUDGET, f"stopped before a step that would cross the budget: spent "
                                    f"{self.spent_micros()} of {budget} micros")
        return Decision()

    # -- reporting --------------------------------------------------------------------------------
    def event(self, state: str, pos: Position | None, steps_left: int = 0, message: str = "",
              metrics: dict | None = None) -> dict:
        mean_step = sum(self.step_times) / len(self.step_times) if self.step_times else 0.0
        event = {"state": state, "total_epochs": self.total_epochs, "loss": self.loss, "metrics": metrics or {},
                 "cost_micros": self.spent_micros(), "eta_seconds": steps_left * mean_step,
                 "time": utcnow().isoformat(), "message": message, "attempt": self.lease.fence}
        if pos is not None:
            event.update(epoch=pos.epoch, step=pos.step)
        return event

    def publish(self, event: dict, terminal: bool = False) -> None:
        try:
            self.ctx.events.publish(self.job_id, event, terminal)
        except Exception:  # progress events are best effort; SQL has the truth
            log.warning("could not publish an event for %s", self.job_id, exc_info=True)

    def beat(self, pos: Position, steps_left: int, metrics: dict | None = None,
             checkpoint: dict | None = None) -> bool:
        """Renew the lease, store progress and cost; returns whether a cancel was requested."""
        self.last_beat = time.perf_counter()
        event = self.event(RUNNING, pos, steps_left, metrics=metrics)
        progress = {"epoch": pos.epoch, "step": pos.step, "total_epochs": self.total_epochs,
                    "loss": None if math.isnan(self.loss) else self.loss, "eta_seconds": event["eta_seconds"]}
        _, cancel = self.ctx.store.heartbeat(self.lease, self.ctx.lease_seconds, device_seconds=self.device_seconds(),
                                             progress=progress, metrics=metrics, checkpoint=checkpoint)
        self.publish(event)
        return cancel

    # -- hooks the loop calls ---------------------------------------------------------------------
    def before_training(self, pos: Position) -> Decision:
        self.last_step_at = time.perf_counter()
        self.beat(pos, 0)
        return self.budget_decision()

    def after_step(self, pos: Position, loss: float, steps_left: int) -> Decision:
        now = time.perf_counter()
        self.step_times.append(now - self.last_step_at)
        self.last_step_at, self.loss = now, loss
        if now - self.last_beat >= self.ctx.heartbeat_seconds and self.beat(pos, steps_left):
            return Decision(CANCEL, "cancelled")
        return self.budget_decision()

    def end_of_epoch(self, pos: Position, metrics: dict[str, float], trainer: Trainer) -> Decision:
        record = trainer.save_checkpoint(self.ctx.checkpoints, self.job_id, pos)
        self.checkpoint_seconds = record["seconds"]
        steps_left = (self.spec.epochs - pos.epoch) * trainer.batches_per_epoch
        if self.beat(pos, steps_left, metrics=metrics, checkpoint=record):
            return Decision(CANCEL, "cancelled")
        self.last_step_at = time.perf_counter()  # evaluation and the checkpoint are not a step
        return self.budget_decision()

    def stopped(self, decision: Decision, pos: Position, trainer: Trainer) -> None:
        record = trainer.save_checkpoint(self.ctx.checkpoints, self.job_id, pos)
        state = CANCELLED if decision.code == CANCEL else BUDGET_EXCEEDED
        reason = decision.message
        if state == CANCELLED:
            requested = self.ctx.store.get(None, self.job_id).message
            reason = requested.replace("cancel requested", "cancelled", 1) if requested else "cancelled"
        message = f"{reason}; checkpoint at epoch {pos.epoch}, step {pos.step}"
        self.finish(state, pos, message, checkpoint=record)

    def completed(self, trainer: Trainer, metrics: dict[str, float], train_seconds: float) -> None:
        efficiency = self.efficiency(trainer, train_seconds)
        all_metrics = {**metrics, "distributed_efficiency": efficiency["eta"],
                       "scaling_efficiency": efficiency["scaling"], "epochs": float(self.spec.epochs)}
        message, result = self.register(trainer, all_metrics, self.cost_dict())
        self.record_throughput(trainer, train_seconds)
        pos = Position(self.spec.epochs, 0, trainer.batches_per_epoch * self.spec.epochs)
        self.ctx.store.heartbeat(self.lease, self.ctx.lease_seconds, device_seconds=self.device_seconds(),
                                 efficiency=efficiency)
        self.finish(SUCCEEDED, pos, message, metrics=all_metrics, result=result)

    def register(self, trainer: Trainer, metrics: dict[str, float], cost: dict) -> tuple[str, dict]:
        """Register the trained model; returns the job's final message and its result record."""
        version = publish.register(self.registry, self.job_id, self.spec, trainer.model, metrics, cost,
                                   self.ctx.catalog.currency)
        result = {"model": version.model, "number": version.number}
        return f"registered {version.model} v{version.number}", result

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, state: str, pos: Position | None, message: str, **fields) -> None:
        progress = {"epoch": pos.epoch, "step": pos.step, "eta_seconds": 0.0} if pos else None
        job = self.end(state, message, self.event(state, pos, message=message, metrics=fields.get("metrics")),
                       progress=progress, **fields)
        log.debug("job %s metrics %s", self.job_id, job.metrics)

    def efficiency(self, trainer: Trainer, train_seconds: float) -> dict:
        """η = T_single / T_distributed in training-step time: T_distributed is what rank 0 spent in steps,
        T_single the same samples at the single-process rate measured just before the ranks started. 1.0 for a
        single process."""
        if self.world == 1 or not self.single_samples_per_s or trainer.step_seconds <= 0:
            return {"eta": 1.0, "scaling": 1.0, "t_distributed_s": trainer.step_seconds}
        t_single = trainer.samples_trained * self.world / self.single_samples_per_s
        eta = t_single / trainer.step_seconds
        return {"eta": eta, "scaling": eta / self.world, "t_single_s": t_single,
                "t_distributed_s": trainer.step_seconds, "single_samples_per_s": self.single_samples_per_s,
                "train_loop_s": train_seconds}

    def work_per_sample(self, trainer: Trainer) -> int:
        """The estimator's unit of work per training sample (:mod:`margin.training.estimate`): the model's
        parameters for a built-in family, 1 for a package (whose size the service cannot know before it runs)."""
        return 1 if self.spec.package else trainer.parameter_count()

    def record_throughput(self, trainer: Trainer, train_seconds: float) -> None:
        if self.lease.fence != 1 or train_seconds <= 0 or trainer.samples_trained == 0:
            return  # only clean first attempts that trained feed the estimator
        work = trainer.samples_trained * self.world * self.work_per_sample(trainer) / train_seconds
        overhead = max(0.0, time.time() - self.started - train_seconds)
        self.ctx.store.record_throughput(self.spec.history_family, self.spec.device_class, self.spec.precision,
                                         self.world, work, overhead)
