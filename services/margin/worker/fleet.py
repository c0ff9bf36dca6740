"""A worker's own fleet report: every metering interval it tells the budget service that it was up — one replica of
its pool (``worker/<queue>``, the replica named ``<host>/<pid>``: two workers on one node, or a restarted one, are
two replicas), priced as its device class — and which jobs' attempts ran on it and for how long.

The budget service bills the worker's replica time and allocates it (:mod:`margin.budget.fleet.metering`): each job
its busy time (the tenants pay that through the jobs' own entries: device-seconds × price + energy), the idle rest
to the platform's line. The busy time comes from the jobs' attempts held by this worker's own processes (the job
store records when each attempt started and ended, and its owner ``<host>/<pid>/<task>``; the worker remembers every
pool process it has had), so a job is counted on the worker that ran it, whichever of its pool processes that was.
Runs in the Celery main process (``worker_ready`` starts it); reports are kept until the budget service takes them.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import psutil

from margin.common import protoconv
from margin.common.errors import InvalidArgument, MarginError
from margin.common.jobs import JobStore
from margin.common.tenancy import from_epoch
from margin.sdk.budgets import BudgetsClient
from margin.v1 import budget_pb2

log = logging.getLogger(__name__)
MAX_PENDING = 6000


def device_class_of(queue: str) -> str:
    """``train.<device class>`` -> the device class (see :func:`margin.common.dispatch.device_queue`)."""
    return queue.removeprefix("train.")


class WorkerFleetReporter:
    def __init__(self, queue: str, jobs: JobStore, budgets: BudgetsClient, interval_s: float = 15.0,
                 replica: str | None = None, clock: Callable[[], float] = time.time):
        self.queue, self.device_class = queue, device_class_of(queue)
        self.replica = replica or f"{socket.gethostname()}/{os.getpid()}"
        self._pids: set[int] = {os.getpid()}  # this worker's processes, all it has had (pool processes get replaced)
        self._jobs, self._budgets, self.interval_s, self._clock = jobs, budgets, interval_s, clock
        self._pending: list[budget_pb2.ReportFleetRequest] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-fleet", daemon=True)
        self._since = clock()

    def start(self) -> WorkerFleetReporter:
        self._thread.start()
        return self

    def report(self, start: float, end: float) -> budget_pb2.ReportFleetRequest:
        """The report of [start, end): this worker up all of it, and the jobs that ran on this node in it."""
        return self._request(start, end, self._jobs_between(start, end))

    def own_pids(self) -> set[int]:
        """This worker's process and every pool process (and their children) it has had so far."""
        try:
            self._pids |= {p.pid for p in psutil.Process().children(recursive=True)}
        except psutil.Error as err:
            log.warning("cannot list this worker's processes: %s", err)
        return self._pids

    def _jobs_between(self, start: float, end: float) -> list[budget_pb2.FleetJob]:
        busy: dict[tuple[str, str, str], float] = defaultdict(float)
        pids = self.own_pids()
        for job_id, tenant, kind, owner, seconds in self._jobs.attempts_between(
                f"{socket.gethostname()}/", from_epoch(start), from_epoch(end)):
            pid = owner.split("/")[1] if owner.count("/") >= 2 else ""
            if pid.isdigit() and int(pid) in pids:
                busy[(job_id, tenant, kind)] += seconds
        return [budget_pb2.FleetJob(tenant=tenant, job_id=job_id, kind=kind, busy_us=round(seconds * 1e6))
                for (job_id, tenant, kind), seconds in sorted(busy.items())]

    def _request(self, start: float, end: float, jobs: list[budget_pb2.FleetJob]) -> budget_pb2.ReportFleetRequest:
        pool = budget_pb2.FleetPool(pool=f"worker/{self.queue}", kind="worker", device_class=self.device_class,
                                    replica=self.replica, replica_us=round((end - start) * 1e6), replicas=1,
                                    jobs=jobs)
        return budget_pb2.ReportFleetRequest(interval_start=protoconv.timestamp(from_epoch(start)),
                                             interval_end=protoconv.timestamp(from_epoch(end)), pools=[pool],
                                             observer=f"worker:{self.replica}")

    def _run(self) -> None:
        start = self._since
        while True:
            boundary = (int(start / self.interval_s) + 1) * self.interval_s
            stopped = self._stop.wait(max(0.0, boundary - self._clock()))
            end = self._clock() if stopped else boundary
            self._queue(start, end)
            self._send()
            start = end
            if stopped:
                return

    def _queue(self, start: float, end: float) -> None:
        if end <= start:
            return
        try:
            jobs = self._jobs_between(start, end)
        except Exception:  # the job store away for a moment: the interval is billed as idle rather than not at all
            log.exception("cannot read this worker's attempts; reporting the interval without jobs")
            jobs = []
        self._pending.append(self._request(start, end, jobs))
        del self._pending[:-MAX_PENDING]

    def _send(self) -> None:
        while self._pending:
            try:
                self._budgets.report_fleet(self._pending[0])
            except InvalidArgument as err:
                log.error("the budget service refuses this worker's fleet report: %s (not billed)", err)
            except MarginError as err:
                log.warning("fleet report not taken (%s); %d kept for the next interval", err, len(self._pending))
                return
            self._pending.pop(0)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Report the interval so far and stop."""
        self._stop.set()
        self._thread.join(timeout_s)

