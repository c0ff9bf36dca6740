"""The training control plane, free of gRPC: resolve and validate specs, estimate, admit under budget,
queue, report, cancel, stream progress, and re-queue jobs whose worker vanished."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from margin.common.costs import PriceCatalog, format_money
from margin.common.dispatch import Dispatcher
from margin.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from margin.common.jobevents import JobEvents
from margin.common.jobs import TERMINAL, Job, JobStore, NewJob
from margin.modelzoo import spec as specs
from margin.modelzoo.datasets import BUILTIN_SHAPES
from margin.modelzoo.spec import BaseRef, TrainSpec
from margin.sdk.registry_source import RegistrySource
from margin.training.estimate import Estimate, Estimator

log = logging.getLogger(__name__)
KIND = "training"


@dataclass(frozen=True)
class Caller:
    tenant_id: int
    tenant: str
    api_key: str


class TrainingCore:
    def __init__(self, store: JobStore, events: JobEvents, dispatcher: Dispatcher, registry: RegistrySource,
                 catalog: PriceCatalog, max_world_size: int):
        self.store, self.events, self.dispatcher, self.registry = store, events, dispatcher, registry
        self.catalog = catalog
        self.estimator = Estimator(store, catalog)
        self.max_world_size = max_world_size
        self._requeued: dict[str, float] = {}

    # -- specs ------------------------------------------------------------------------------------
    def resolve(self, caller: Caller, spec: TrainSpec) -> tuple[TrainSpec, int]:
        """Validate ``spec`` and pin what it names in the registry (base and dataset versions, as the caller
        sees them: another tenant's version is NOT_FOUND). Returns the spec and the dataset's row count."""
        if spec.base:
            base = self.registry.version(caller.api_key, spec.base.model, spec.base.number, spec.base.alias)
            if base.format != "safetensors" or not base.architecture.get("family"):
                raise InvalidArgument(f"base version {base.model} v{base.number} is {base.format}; fine-tuning "
                                      "needs a safetensors version with an architecture")
            family = base.architecture["family"]
            if spec.family and spec.family != family:
                raise InvalidArgument(f"spec.family {spec.family!r} differs from the base version's {family!r}")
            arch = {k: v for k, v in base.architecture.items() if k != "family"}
            arch.update({k: v for k, v in spec.architecture.items() if k == "num_classes"})
            spec = replace(spec, family=family, architecture=arch, base=BaseRef(base.model, base.number))
        rows = BUILTIN_SHAPES[spec.dataset].rows if spec.dataset in BUILTIN_SHAPES else 0
        if spec.dataset_version:
            ref = spec.dataset_version
            data = self.registry.version(caller.api_key, ref.model, ref.number, ref.alias)
            if data.format != "dataset-npz":
                raise InvalidArgument(f"dataset {data.model} v{data.number} is {data.format}, not dataset-npz")
            spec = replace(spec, dataset_version=BaseRef(data.model, data.number))
            features = spec.architecture.get("input_dim") or spec.architecture.get("image_size", 8) ** 2
            rows = max(2, data.size_bytes // (4 * int(features) + 8))
        spec = specs.validate(spec, max_world_size=self.max_world_size, device_classes=self.catalog.device_classes)
        return spec, rows

    def estimate(self, caller: Caller, spec: TrainSpec) -> tuple[TrainSpec, Estimate]:
        spec, rows = self.resolve(caller, spec)
        return spec, self.estimator.estimate(spec, rows)

    # -- jobs -------------------------------------------------------------------------------------
    def submit(self, caller: Caller, spec: TrainSpec, budget_micros: int, idempotency_key: str = "") -> Job:
        if budget_micros < 0:
            raise InvalidArgument("budget must be >= 0 (0 = no job budget)")
        if len(idempotency_key) > 200:
            raise InvalidArgument("idempotency_key is longer than 200 characters")
        if idempotency_key:
            existing = self.store.find_by_key(caller.tenant_id, KIND, idempotency_key)
            if existing is not None:
                return existing
        spec, estimate = self.estimate(caller, spec)
        if budget_micros and estimate.low.total_micros > budget_micros:
            raise ResourceExhausted(
                f"the estimate {format_money(estimate.low.total_micros)}–{format_money(estimate.high.total_micros)} "
                f"(expected {format_money(estimate.expected.total_micros)}, {estimate.basis}) exceeds the job "
                f"budget {format_money(budget_micros)} even at its low end")
        job, created = self.store.create(NewJob(
            kind=KIND, tenant_id=caller.tenant_id, tenant=caller.tenant, spec=spec.to_dict(),
            device_class=spec.device_class, world_size=spec.world_size, budget_micros=budget_micros,
            estimate=estimate.to_dict(), idempotency_key=idempotency_key, total_epochs=spec.epochs))
        if not created:
            return job
        try:
            self.dispatcher.train(job.id, spec.device_class)
        except Exception as err:
            self.store.fail_undispatched(job.id, f"could not queue the job: {err}")
            raise Unavailable(f"the job broker is unavailable; job {job.id} was not queued") from None
        self._publish_state(job)
        log.info("queued %s for %s on %s (estimate %s)", job.id, caller.tenant, spec.device_class,
                 format_money(estimate.expected.total_micros))
        return job

    def get(self, tenant_id: int, job_id: str) -> Job:
        return self.store.get(tenant_id, job_id, KIND)

    def list(self, tenant_id: int, state: str | None, size: int, token: str) -> tuple[list[Job], str]:
        return self.store.list(tenant_id, KIND, state, size, token)

    def cancel(self, tenant_id: int, job_id: str, reason: str) -> Job:
        self.get(tenant_id, job_id)
        job = self.store.request_cancel(tenant_id, job_id, reason[:500])
        if job.terminal:
            self._publish_state(job)
        return job

    def watch(self, tenant_id: int, job_id: str, active: Callable[[], bool] = lambda: True,
              recheck_s: float = 2.0) -> Iterator[Job | dict]:
        """The job as it is now (a :class:`Job`), then its events (dicts) until it ends or ``active`` is false."""
        after = self.events.last_id(job_id)
        job = self.get(tenant_id, job_id)
        yield job
        if job.terminal:
            return
        last_check = time.monotonic()
        while active():
            for event_id, event in self.events.follow(job_id, after, block_ms=500):
                after = event_id
                yield event
                if event.get("state") in TERMINAL:
                    return
            if time.monotonic() - last_check > recheck_s:  # a state change nobody published (e.g. a lost worker)
                last_check = time.monotonic()
                job = self.get(tenant_id, job_id)
                if job.terminal:
                    yield job
                    return

    def requeue_expired(self, grace_seconds: float) -> list[str]:
        """Re-queue RUNNING jobs whose lease lapsed: their whole worker died without Celery redelivering."""
        now, requeued = time.monotonic(), []
        for job in self.store.expired_leases(grace_seconds):
            if now - self._requeued.get(job.id, -1e9) < max(grace_seconds, 5.0):
                continue
            self._requeued[job.id] = now
            self.dispatcher.train(job.id, job.device_class, task_id=f"{job.id}.requeue{job.fence}")
            log.warning("re-queued %s: its worker stopped renewing the lease (attempt %d)", job.id, job.fence)
            requeued.append(job.id)
        return requeued

    def _publish_state(self, job: Job) -> None:
        try:
            self.events.publish(job.id, {"state": job.state, "message": job.message, "cost_micros": job.cost_micros,
                                         "total_epochs": job.progress.get("total_epochs", 0)}, job.terminal)
        except Exception:
            log.warning("could not publish the state of %s", job.id, exc_info=True)
