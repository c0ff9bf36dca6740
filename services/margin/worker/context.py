"""What a worker process needs, built from the environment once per process (after Celery forks it)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from margin.common import config
from margin.common.costs import PriceCatalog
from margin.common.db import make_engine, make_sessionmaker
from margin.common.jobevents import JobEvents
from margin.common.jobs import JobStore
from margin.worker.checkpoints import CheckpointStore


@dataclass
class WorkerContext:
    store: JobStore
    events: JobEvents
    checkpoints: CheckpointStore
    catalog: PriceCatalog
    registry_addr: str
    admin_key: str
    lease_seconds: float
    max_attempts: int
    heartbeat_seconds: float = 1.0


@functools.cache
def from_env() -> WorkerContext:
    catalog = PriceCatalog.load()
    sessions = make_sessionmaker(make_engine(config.database_url()))
    admin_key = config.admin_key()
    return WorkerContext(
        store=JobStore(sessions, catalog, ledger_key=config.ledger_id_key(admin_key)),
        events=JobEvents.from_url(config.REDIS_URL.get()),
        checkpoints=CheckpointStore(config.checkpoint_dir()), catalog=catalog,
        registry_addr=config.REGISTRY_ADDR.get(), admin_key=admin_key,
        lease_seconds=config.JOB_LEASE_SECONDS.get_float(), max_attempts=config.JOB_MAX_ATTEMPTS.get_int())
