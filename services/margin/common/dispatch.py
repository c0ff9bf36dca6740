"""The Celery contract between the job services and the workers: task names, queues, broker settings.

Services only *send* (``send_task`` by name, so they import no worker code); workers consume one queue per
device class, so a GPU pool never takes a CPU job and the other way round. Delivery is at-least-once
(``acks_late`` + ``task_reject_on_worker_lost``): a worker that dies mid-task gets the task redelivered, and
the job's lease and fencing token (:mod:`margin.common.jobs`) make a second delivery harmless.
"""
from __future__ import annotations

from celery import Celery

from margin.common import config

TRAIN_TASK = "margin.train"
COMPRESS_TASK = "margin.compress"
TASKS = {"training": TRAIN_TASK, "compression": COMPRESS_TASK}


def device_queue(device_class: str) -> str:
    """The queue of a device class's workers (training and compression jobs alike)."""
    return f"train.{device_class}"


def celery_settings(visibility_timeout_s: int) -> dict:
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,           # job state lives in SQL, not in a result backend
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_transport_options": {"visibility_timeout": visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "task_default_queue": device_queue("cpu"),
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def make_celery(broker_url: str | None = None) -> Celery:
    app = Celery("margin", broker=broker_url or config.REDIS_URL.get())
    app.conf.update(celery_settings(config.VISIBILITY_TIMEOUT.get_int()))
    return app


class Dispatcher:
    """Queues job ids for the workers of a device class."""

    def __init__(self, broker_url: str):
        self._app = make_celery(broker_url)

    def send(self, kind: str, job_id: str, device_class: str, task_id: str | None = None) -> None:
        """Queue job ``job_id`` of ``kind`` ("training" | "compression") for the workers of ``device_class``."""
        self._app.send_task(TASKS[kind], args=[job_id], queue=device_queue(device_class), task_id=task_id or job_id)

    def close(self) -> None:
        self._app.close()
