"""The control plane every job service shares (training, compression): admission under a budget, queueing,
reading, cancelling, streaming progress, and re-queueing jobs whose worker vanished. Free of gRPC; each
service adds how it resolves and estimates its own specs."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from margin.common.costs import format_money
from margin.common.dispatch import Dispatcher
from margin.common.errors import InvalidArgument, MarginError, ResourceExhausted, Unavailable
from margin.common.jobevents import JobEvents
from margin.common.jobs import TERMINAL, Job, JobStore, NewJob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    tenant_id: int
    tenant: str
    api_key: str


@dataclass(frozen=True)
class Admission:
    """A resolved job ready to queue: its spec (JSON-able) and the estimate it was admitted on."""

    spec: dict
    device_class: str
    estimate: dict        # low_micros, expected_micros, high_micros, basis, ...
    world_size: int = 1
    total_epochs: int = 0


def check_request(budget_micros: int, idempotency_key: str) -> None:
    if budget_micros < 0:
        raise InvalidArgument("budget must be >= 0 (0 = no job budget)")
    if len(idempotency_key) > 200:
        raise InvalidArgument("idempotency_key is longer than 200 characters")


class JobControl:
    def __init__(self, kind: str, store: JobStore, events: JobEvents, dispatcher: Dispatcher,
                 tenant_remaining: Callable[[str, str], int | None] | None = None):
        """``tenant_remaining(tenant, category)``: what the tenant's (by name) budget still allows this job kind
        this period (None: the tenant has no budget), as the budget service says (it raises when it cannot)."""
        self.kind, self.store, self.events, self.dispatcher = kind, store, events, dispatcher
        self.tenant_remaining = tenant_remaining
        self._requeued: dict[str, float] = {}

    def existing(self, caller: Caller, idempotency_key: str) -> Job | None:
        return self.store.find_by_key(caller.tenant_id, self.kind, idempotency_key) if idempotency_key else None

    def admit(self, caller: Caller, admission: Admission, budget_micros: int, idempotency_key: str) -> Job:
        """Refuse when even the low end of the estimate exceeds the job's budget or what is left of the tenant's
        budget for this kind of job; else store and queue it. A job admitted under a tenant budget is capped at
        what was left: it stops there (BUDGET_EXCEEDED) like at its own budget."""
        e = admission.estimate
        estimate = (f"the estimate {format_money(e['low_micros'])}–{format_money(e['high_micros'])} (expected "
                    f"{format_money(e['expected_micros'])}, {e['basis']})")
        if budget_micros and e["low_micros"] > budget_micros:
            raise ResourceExhausted(f"{estimate} exceeds the job budget {format_money(budget_micros)} even at its "
                                    "low end")
        left = self.tenant_left(caller)
        if left is not None:
            if e["low_micros"] > left:
                raise ResourceExhausted(f"{estimate} exceeds what is left of {caller.tenant}'s budget for "
                                        f"{self.kind} this period: {format_money(max(left, 0))}")
            budget_micros = min(budget_micros, left) if budget_micros else left
        job, created = self.store.create(NewJob(
            kind=self.kind, tenant_id=caller.tenant_id, tenant=caller.tenant, spec=admission.spec,
            device_class=admission.device_class, world_size=admission.world_size, budget_micros=budget_micros,
            estimate=e, idempotency_key=idempotency_key, total_epochs=admission.total_epochs))
        if not created:
            return job
        try:
            self.dispatcher.send(self.kind, job.id, admission.device_class)
        except Exception as err:
            self.store.fail_undispatched(job.id, f"could not queue the job: {err}")
            raise Unavailable(f"the job broker is unavailable; job {job.id} was not queued") from None
        self.publish_state(job)
        log.info("queued %s job %s for %s on %s (estimate %s)", self.kind, job.id, caller.tenant,
                 admission.device_class, format_money(e["expected_micros"]))
        return job

    def tenant_left(self, caller: Caller) -> int | None:
        """What the caller's tenant budget still allows this kind of job (None: no budget). When the budget
        service cannot say, the job is refused UNAVAILABLE: admitting it unchecked could overrun the budget."""
        if self.tenant_remaining is None:
            return None
        try:
            return self.tenant_remaining(caller.tenant, self.kind)
        except MarginError as err:
            log.warning("cannot read what is left of %s's budget for %s: %s", caller.tenant, self.kind, err)
            raise Unavailable(f"cannot read what is left of {caller.tenant}'s budget for {self.kind} ({err}); the "
                              "job was not queued: retry later") from None

    def get(self, tenant_id: int, job_id: str) -> Job:
        return self.store.get(tenant_id, job_id, self.kind)

    def list(self, tenant_id: int, state: str | None, size: int, token: str) -> tuple[list[Job], str]:
        return self.store.list(tenant_id, self.kind, state, size, token)

    def cancel(self, tenant_id: int, job_id: str, reason: str) -> Job:
        self.get(tenant_id, job_id)
        job = self.store.request_cancel(tenant_id, job_id, reason[:500])
        if job.terminal:
            self.publish_state(job)
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
        for job in self.store.expired_leases(grace_seconds, self.kind):
            if now - self._requeued.get(job.id, -1e9) < max(grace_seconds, 5.0):
                continue
            self._requeued[job.id] = now
            self.dispatcher.send(self.kind, job.id, job.device_class, task_id=f"{job.id}.requeue{job.fence}")
            log.warning("re-queued %s: its worker stopped renewing the lease (attempt %d)", job.id, job.fence)
            requeued.append(job.id)
        return requeued

    def publish_state(self, job: Job) -> None:
        try:
            self.events.publish(job.id, {"state": job.state, "message": job.message, "cost_micros": job.cost_micros,
                                         "total_epochs": job.progress.get("total_epochs", 0)}, job.terminal)
        except Exception:
            log.warning("could not publish the state of %s", job.id, exc_info=True)


class Reaper:
    """Every few seconds, re-queue RUNNING jobs whose lease lapsed (their whole worker is gone)."""

    def __init__(self, jobs: JobControl, grace_seconds: float, interval_s: float = 5.0):
        self._jobs, self._grace, self._interval = jobs, grace_seconds, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-reaper", daemon=True)

    def start(self, _server=None) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._jobs.requeue_expired(self._grace)
            except Exception:
                log.warning("reaper pass failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
