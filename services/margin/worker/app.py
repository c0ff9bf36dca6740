"""The Celery app of Margin's workers.

    celery -A margin.worker.app worker -Q train.cpu --concurrency 1

consumes the CPU training queue; a GPU pool runs the same image with ``-Q train.nvidia-a100`` (one queue per
device class, see :mod:`margin.common.dispatch`). torch is imported before the pool forks, so a task starts in
milliseconds.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import sklearn.datasets  # noqa: F401 - imported before the pool forks, so each task starts warm
import torch  # noqa: F401
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from margin.cluster.processes import READY_FILE_ENV
from margin.common import config
from margin.common.dispatch import COMPRESS_TASK, TRAIN_TASK, make_celery
from margin.common.logs import setup_logging
from margin.sdk.budgets import BudgetsClient
from margin.worker import context, runner
from margin.worker.fleet import WorkerFleetReporter

log = logging.getLogger(__name__)

app = make_celery()


@app.task(name=TRAIN_TASK, bind=True)
def train(self, job_id: str) -> str:
    return runner.run_job(job_id, task_id=self.request.id or job_id, ctx=context.from_env())


@app.task(name=COMPRESS_TASK, bind=True)
def compress(self, job_id: str) -> str:
    from margin.worker.compress import run_compression

    return run_compression(job_id, task_id=self.request.id or job_id, ctx=context.from_env())


@worker_process_init.connect
def _child_started(**_) -> None:
    setup_logging("worker", stream=sys.__stderr__)
    context.from_env.cache_clear()  # database and Redis connections are made afresh in each pool process


_fleet: list[WorkerFleetReporter] = []


@worker_ready.connect
def _ready(**_) -> None:
    path = os.environ.get(READY_FILE_ENV)
    if path:
        Path(path).write_text(str(os.getpid()))
    _fleet.append(fleet_reporter().start())


def fleet_reporter() -> WorkerFleetReporter:
    """This worker's fleet report (the main process's): one replica of the pool of its first queue."""
    ctx = context.from_env()
    queue = config.WORKER_QUEUES.get().split(",")[0].strip()
    return WorkerFleetReporter(queue, ctx.store, BudgetsClient(config.BUDGET_ADDR.get(), ctx.admin_key),
                               config.FLEET_INTERVAL_SECONDS.get_float())


@worker_shutdown.connect
def _shutdown(**_) -> None:
    path = os.environ.get(READY_FILE_ENV)
    if path:
        Path(path).unlink(missing_ok=True)
    for reporter in _fleet:
        reporter.stop()
