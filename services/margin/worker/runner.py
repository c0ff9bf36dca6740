"""Run one delivery of a training task: take the job's lease, train (one process or DDP ranks), end it.

Everything here is plain Python (no Celery): the task in :mod:`margin.worker.app` is a one-line call, and tests
and benchmarks can run a job in-process.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import torch

from margin.common import config
from margin.common.jobs import Lease, LeaseLost, Refusal
from margin.modelzoo.architectures import build_model
from margin.modelzoo.spec import TrainSpec
from margin.sdk.channel import Connection, connect
from margin.worker import data as inputs
from margin.worker.attempt import Attempt
from margin.worker.context import WorkerContext
from margin.worker.loop import Position, Trainer, device_for

log = logging.getLogger(__name__)


def registry_for(ctx: WorkerContext, lease: Lease) -> Connection:
    """A registry connection acting for the job's tenant (admin key + x-margin-tenant)."""
    return connect(ctx.registry_addr, ctx.admin_key, on_behalf_of=lease.job.tenant)


def build_trainer(spec: TrainSpec, registry: Connection, rank: int = 0, world_size: int = 1) -> Trainer:
    """Data, model (with a base version's weights and frozen layers when fine-tuning) and optimizer."""
    torch.manual_seed(spec.seed)
    split = inputs.load_split(spec, registry)
    inputs.check_fits(spec, split)
    model = build_model(spec.model_spec())
    if spec.base:
        reinitialized = inputs.load_base_weights(model, spec, registry)
        if reinitialized:
            log.info("fine-tuning: re-initialized %s (shapes differ from the base)", reinitialized)
    inputs.freeze(model, spec.freeze_layers)
    device = device_for(spec, rank if spec.on_gpu else 0)
    return Trainer(spec, model, inputs.tensors(split, device), device, rank, world_size)


def resume_position(ctx: WorkerContext, lease: Lease, trainer: Trainer) -> Position:
    checkpoint = ctx.checkpoints.load(lease.job.id) if lease.job.checkpoint else None
    if checkpoint is None:
        return Position(0, 0, 0)
    pos = trainer.restore(checkpoint)
    log.info("job %s: resuming attempt %d from epoch %d, step %d", lease.job.id, lease.fence, pos.epoch, pos.step)
    return pos


def lease_owner(task_id: str) -> str:
    """Who holds a lease: node, process and task, so a worker can tell that a holder on its node is dead."""
    return f"{socket.gethostname()}/{os.getpid()}/{task_id}"


def holder_gone(owner: str) -> bool:
    """True only when the lease holder ran on this node and its process no longer exists (e.g. a pool process
    that was SIGKILLed, whose task Celery redelivered at once)."""
    host, _, rest = owner.partition("/")
    pid = rest.partition("/")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def take_lease(job_id: str, owner: str, ctx: WorkerContext) -> Lease | Refusal:
    """Take the job's lease for a new attempt; when refused because the job ended, tell its watchers so."""
    lease = ctx.store.acquire(job_id, owner, ctx.lease_seconds, ctx.max_attempts, holder_gone)
    if isinstance(lease, Refusal):
        job = ctx.store.get(None, job_id) if "does not exist" not in lease.reason else None
        if job is not None and job.terminal:
            ctx.events.publish(job_id, {"state": job.state, "message": job.message,
                                        "cost_micros": job.cost_micros}, terminal=True)
        log.info("not running %s: %s", job_id, lease.reason)
    return lease


def run_job(job_id: str, task_id: str, ctx: WorkerContext) -> str:
    """One delivery of job ``job_id``. Returns what happened, for the log."""
    started = time.time()
    owner = lease_owner(task_id)
    lease = take_lease(job_id, owner, ctx)
    if isinstance(lease, Refusal):
        return lease.reason
    spec = TrainSpec.from_dict(lease.job.spec)
    registry = registry_for(ctx, lease)
    if spec.package:
        from margin.worker import package_job

        attempt = package_job.PackageAttempt(ctx, lease, spec, registry, started)
        attempt.publish(attempt.event("RUNNING", None, message=f"attempt {lease.fence} on {owner} (sandboxed)"))
        return guarded(job_id, lambda: package_job.run(ctx, lease, spec, registry, attempt), attempt.fail, registry)
    attempt = Attempt(ctx, lease, spec, registry, started)
    attempt.publish(attempt.event("RUNNING", None, message=f"attempt {lease.fence} on {owner}"))
    def train() -> str:
        if spec.world_size > 1:
            from margin.worker import ddp

            ddp.launch(ctx, lease, spec, started)
        else:
            torch.set_num_threads(config.torch_threads())
            trainer = build_trainer(spec, registry)
            trainer.run(attempt, resume_position(ctx, lease, trainer))
        return "ran"

    return guarded(job_id, train, attempt.fail, registry)


def guarded(job_id: str, body: Callable[[], str], fail: Callable[[str], None], registry: Connection) -> str:
    """Run an attempt's ``body``: a lost lease ends it quietly (a newer attempt owns the job), any other error
    ends the job FAILED with its reason; the registry connection is closed either way."""
    try:
        return body()
    except LeaseLost as err:
        log.warning("job %s: %s", job_id, err)
        return str(err)
    except Exception as err:
        log.exception("job %s failed", job_id)
        fail(failure_reason(err))
        return f"failed: {err}"
    finally:
        registry.close()


def failure_reason(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return f"{type(err).__name__}: {text}"[:1500]
