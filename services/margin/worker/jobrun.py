"""One attempt at any job (training or compression), from the worker's side: the lease it holds, the meter
(wall clock × devices, priced by the catalog), progress events, and the fenced end with its bill."""
from __future__ import annotations

import logging
import time

from margin.common.costs import run_cost
from margin.common.jobs import FAILED, Job, Lease, LeaseLost
from margin.worker.context import WorkerContext

log = logging.getLogger(__name__)


class JobRun:
    def __init__(self, ctx: WorkerContext, lease: Lease, device_class: str, devices: int, started: float):
        self.ctx, self.lease, self.device_class, self.devices = ctx, lease, device_class, devices
        self.job_id = lease.job.id
        self.started = started  # time.time() when this attempt began

    # -- the meter --------------------------------------------------------------------------------
    def device_seconds(self, extra_wall_s: float = 0.0) -> float:
        return (time.time() - self.started + extra_wall_s) * self.devices

    def micros(self, device_seconds: float) -> int:
        """The job's cost if this attempt ends after ``device_seconds`` (earlier attempts included)."""
        return self.lease.prior_micros + run_cost(self.ctx.catalog, self.device_class,
                                                  device_seconds / 3600.0).total_micros

    def spent_micros(self) -> int:
        return self.micros(self.device_seconds())

    def cost_dict(self) -> dict:
        """The job's cost so far, all attempts, as total/compute/energy micros, device-hours and kWh."""
        now = run_cost(self.ctx.catalog, self.device_class, self.device_seconds() / 3600.0)
        prior = [a for a in self.ctx.store.get(None, self.job_id).attempt_costs if a.attempt != self.lease.fence]
        return {"total_micros": sum(a.total_micros for a in prior) + now.total_micros,
                "compute_micros": sum(a.compute_micros for a in prior) + now.compute_micros,
                "energy_micros": sum(a.energy_micros for a in prior) + now.energy_micros,
                "device_hours": sum(a.device_seconds for a in prior) / 3600.0 + now.device_hours,
                "energy_kwh": sum(a.energy_kwh for a in prior) + now.energy_kwh,
                "device_class": self.device_class}

    # -- reporting and the end ----------------------------------------------------------------------
    def publish(self, event: dict, terminal: bool = False) -> None:
        try:
            self.ctx.events.publish(self.job_id, event, terminal)
        except Exception:  # progress events are best effort; SQL has the truth
            log.warning("could not publish an event for %s", self.job_id, exc_info=True)

    def end(self, state: str, message: str, event: dict, **fields) -> Job:
        """Finish the job (fenced), bill it, and publish the terminal event with the final cost."""
        job = self.ctx.store.finish(self.lease, state, device_seconds=self.device_seconds(), message=message,
                                    **fields)
        self.publish({**event, "state": state, "message": message, "cost_micros": job.cost_micros}, terminal=True)
        log.info("job %s ended %s: %s (cost %d micros over %d attempts)", self.job_id, state, message,
                 job.cost_micros, job.attempts)
        return job

    def fail(self, message: str) -> None:
        try:
            self.end(FAILED, message, {})
        except LeaseLost:
            log.warning("job %s: not marking FAILED, a newer attempt holds it", self.job_id)
