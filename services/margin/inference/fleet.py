"""The fleet observer: what the gateway sees of its Triton pools, reported to the budget service every metering
interval — the bill's evidence (:rpc:`Budgets.ReportFleet`).

Every watcher tick (a fraction of a second, after the pools are probed) it adds to the open interval:

- each pool's *billable* replicas × the time since the last tick: the replica time the platform pays for, busy or
  idle (:attr:`~margin.inference.replicas.TritonReplicas.billable`);
- each loaded deployment's reserved replicas — ``max(min_replicas, 1)`` while READY or LOADING, none when scaled
  to zero — × that time: the weights of the ``reservation`` idle policy.

When the interval ends (intervals are aligned to the clock, every ``interval_s`` from the epoch, so two gateways
observing one pool report the same interval and the second is ignored), it reads Triton's per-model statistics on
every replica of every pool — compute time, executions and requests since the last read: the usage the bill is
split by, calibration and direct traffic included because they used the replica — takes the gateway's own request
counts, and queues the report. A sender thread delivers the reports in order and keeps each until the budget
service has taken it (the budget service bills a pool interval once, so a retry costs nothing).

Triton forgets an unloaded model's counters, so before a deployment is unloaded (scale to zero, undeploy, a move
between pools) :meth:`FleetObserver.settle` reads them into the open interval. The first read of a replica that
was up before the observer started is a baseline (its history is not this interval's); a replica or model seen
later, or whose counters went back (a restart), counts from zero.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from margin.common import protoconv
from margin.common.errors import InvalidArgument, MarginError
from margin.common.tenancy import from_epoch
from margin.inference.deployments import LOADING, READY, Deployment, DeploymentManager
from margin.inference.metering import Meter
from margin.inference.pools import Pool, TritonPools
from margin.inference.triton_client import ModelCounters, TritonClient
from margin.sdk.budgets import BudgetsClient
from margin.v1 import budget_pb2

log = logging.getLogger(__name__)
SNAPSHOT_REFRESH_S = 1.0
MAX_PENDING = 6000  # reports kept while the budget service is away (25 hours of 15 s intervals)


@dataclass
class Usage:
    compute_ns: int = 0
    executions: int = 0
    inferences: int = 0

    def add(self, delta: ModelCounters) -> None:
        self.compute_ns += delta.compute_ns
        self.executions += delta.executions
        self.inferences += delta.inferences


@dataclass
class OpenInterval:
    start: float
    end: float
    replica_us: dict[str, float] = field(default_factory=lambda: defaultdict(float))     # pool name
    reserved_us: dict[str, float] = field(default_factory=lambda: defaultdict(float))    # Triton name
    usage: dict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))          # Triton name
    departed: dict[str, Deployment] = field(default_factory=dict)  # unloaded during the interval, still billed


@dataclass(frozen=True)
class ClosedInterval:
    """What listeners (scale to zero, served cost) learn when an interval closes."""
    start: float
    end: float
    usage: dict[str, Usage]                    # Triton name -> what Triton did for it
    requests: dict[str, int]                   # Triton name -> requests through this gateway


class UsageCounter:
    """Δ of Triton's cumulative per-model counters, per replica."""

    def __init__(self):
        self._last: dict[str, dict[str, ModelCounters]] = {}  # replica url -> model -> counters at the last read

    def read(self, replica: TritonClient, baseline: bool = False) -> dict[str, ModelCounters]:
        now = replica.model_statistics()
        last = self._last.get(replica.url)
        self._last[replica.url] = now
        if baseline and last is None:
            return {}
        deltas = {}
        for model, counters in now.items():
            before = (last or {}).get(model)
            if before is None or counters.compute_ns < before.compute_ns or counters.executions < before.executions \
                    or counters.inferences < before.inferences:
                before = ModelCounters(0, 0, 0)  # new on this replica (loaded since), or its counters restarted
            deltas[model] = ModelCounters(counters.compute_ns - before.compute_ns,
                                          counters.executions - before.executions,
                                          counters.inferences - before.inferences)
        return deltas


class FleetObserver:
    def __init__(self, pools: TritonPools, deployments: DeploymentManager, meter: Meter,
                 budgets: BudgetsClient | None, interval_s: float = 15.0, clock: Callable[[], float] = time.time):
        if interval_s <= 0:
            raise ValueError("the metering interval must be positive")
        self._pools, self._deployments, self._meter, self._budgets = pools, deployments, meter, budgets
        self.interval_s, self._clock = interval_s, clock
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.RLock()
        self._usage = UsageCounter()
        self._open: OpenInterval | None = None
        self._last_tick: float | None = None
        self.last_closed_end = -float("inf")  # the end of the last interval closed (and queued)
        self._snapshot: list[Deployment] = []
        self._snapshot_at = -float("inf")
        self._listeners: list[Callable[[ClosedInterval], None]] = []
        self._on_allocated: list[Callable[[budget_pb2.ReportFleetResponse], None]] = []
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="fleet-report", daemon=True)
        if budgets is not None:
            self._sender.start()

    # -- listeners ---------------------------------------------------------------------------------------------
    def on_closed(self, listener: Callable[[ClosedInterval], None]) -> None:
        self._listeners.append(listener)

    def on_allocated(self, listener: Callable[[budget_pb2.ReportFleetResponse], None]) -> None:
        self._on_allocated.append(listener)

    # -- measuring ---------------------------------------------------------------------------------------------
    def observe(self, now: float | None = None) -> list[ClosedInterval]:
        """A watcher tick: add replica and reserved time since the last tick; close the intervals that ended."""
        now = self._clock() if now is None else now
        closed = []
        with self._lock:
            if self._open is None:
                self._begin(now)
                return []
            deployments = self._deployments_now(now)
            t = self._last_tick
            while now >= self._open.end:
                self._accrue(self._open, deployments, self._open.end - t)
                t = self._open.end
                closed.append(self._close(self._open))
                self.last_closed_end = t
                self._open = OpenInterval(t, t + self.interval_s)
            self._accrue(self._open, deployments, now - t)
            self._last_tick = now
        for interval in closed:
            for listener in self._listeners:
                try:
                    listener(interval)
                except Exception:
                    log.exception("a fleet interval listener failed")
        return closed

    def _begin(self, now: float) -> None:
        """The first tick: baseline every live replica's counters; the first interval is the rest of this one."""
        for pool in self._pools.pools:
            for replica in pool.client.live:
                try:
                    self._usage.read(replica, baseline=True)
                except MarginError as err:
                    log.warning("no baseline statistics from %s: %s", replica.url, err)
        start = now - now % self.interval_s
        self._open = OpenInterval(start, start + self.interval_s)
        self._last_tick = now

    def _accrue(self, interval: OpenInterval, deployments: list[Deployment], seconds: float) -> None:
        if seconds <= 0:
            return
        for pool in self._pools.pools:
            interval.replica_us[pool.name] += pool.client.billable * seconds * 1e6
        for d in deployments:
            if d.state in (READY, LOADING):
                interval.reserved_us[d.triton_name] += max(d.min_replicas, 1) * seconds * 1e6

    def _deployments_now(self, now: float) -> list[Deployment]:
        if now - self._snapshot_at >= SNAPSHOT_REFRESH_S:
            try:
                self._snapshot = self._deployments.fleet()
            except Exception:  # the database away for a moment: keep the last snapshot
                log.exception("cannot read the deployments")
            self._snapshot_at = now
        return self._snapshot

    def settle(self, pool: Pool | None = None, departing: Deployment | None = None) -> None:
        """Read the statistics of ``pool`` (every pool) into the open interval now — before an unload, which makes
        Triton forget a model's counters; ``departing`` is the deployment about to go (still billed its usage)."""
        with self._lock:
            if self._open is None:
                return
            for p in [pool] if pool is not None else self._pools.pools:
                self._read_usage(p, self._open)
            if departing is not None:
                self._open.departed[departing.triton_name] = departing

    def _read_usage(self, pool: Pool, interval: OpenInterval) -> None:
        for replica in pool.client.live:
            try:
                deltas = self._usage.read(replica)
            except MarginError as err:  # the replica went away: what it did since the last read is not known
                log.warning("no statistics from %s: %s", replica.url, err)
                continue
            for model, delta in deltas.items():
                interval.usage[model].add(delta)

    def _close(self, interval: OpenInterval) -> ClosedInterval:
        for pool in self._pools.pools:
            self._read_usage(pool, interval)
        requests = self._meter.take()
        deployments = self._deployments_now(self._clock())
        if self._budgets is not None:
            self._enqueue(self._report(interval, deployments, requests))
        return ClosedInterval(interval.start, interval.end, dict(interval.usage), requests)

    # -- reporting ---------------------------------------------------------------------------------------------
    def changed(self) -> None:
        """Deployments changed (deploy, undeploy, scale to zero, a cold start): refresh the snapshot now and tell
        the budget service (its autoscaler plans for them) without waiting for the interval's end."""
        with self._lock:
            self._snapshot_at = -float("inf")
            deployments = self._deployments_now(self._clock())
            now = self._clock()
        if self._budgets is not None:
            report = self._report(OpenInterval(now - 1, now), deployments, {}, snapshot_only=True)
            self._enqueue(report)

    def _report(self, interval: OpenInterval, deployments: list[Deployment], requests: dict[str, int],
                snapshot_only: bool = False) -> budget_pb2.ReportFleetRequest:
        by_pool: dict[str, list[budget_pb2.FleetDeployment]] = defaultdict(list)
        listed = {d.triton_name: d for d in deployments}
        for name, d in interval.departed.items():
            if name not in listed:
                listed[name] = d
        for d in listed.values():
            pool = self._pools.pool_of(d.device_class)
            if pool is None:
                continue
            usage = interval.usage.get(d.triton_name, Usage())
            state = d.state if d.triton_name not in interval.departed or d.state in (READY, LOADING) else "UNLOADED"
            by_pool[pool.name].append(budget_pb2.FleetDeployment(
                tenant=d.tenant, deployment=d.name, model=d.model, version=d.version, triton_name=d.triton_name,
                state=state, device_class=d.device_class, compute_ns=usage.compute_ns,
                executions=usage.executions, inferences=usage.inferences,
                gateway_requests=requests.get(d.triton_name, 0),
                reserved_replica_us=round(interval.reserved_us.get(d.triton_name, 0.0)),
                min_replicas=d.min_replicas, max_replicas=max(d.max_replicas, d.min_replicas),
                capacity_rps=d.capacity_rps, price_micros_per_hour=d.price_micros_per_hour))
        pools = [budget_pb2.FleetPool(
            pool=f"triton/{pool.name}", kind="serving", device_class=pool.device_class,
            replica_us=round(interval.replica_us.get(pool.name, 0.0)), replicas=pool.client.billable,
            deployments=by_pool.get(pool.name, [])) for pool in self._pools.pools]
        return budget_pb2.ReportFleetRequest(
            interval_start=protoconv.timestamp(from_epoch(interval.start)), interval_end=protoconv.timestamp(from_epoch(
                interval.end)), pools=pools, observer=self.name, snapshot_only=snapshot_only)

    def _enqueue(self, report: budget_pb2.ReportFleetRequest) -> None:
        if self._queue.qsize() >= MAX_PENDING:
            dropped = self._queue.get_nowait()
            log.error("the budget service has not taken fleet reports for a long time: dropping the one of %s",
                      dropped.interval_end.ToJsonString())
        self._idle.clear()
        self._queue.put(report)

    def _send_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                report = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._idle.set()
                continue
            while not self._stop.is_set():
                try:
                    reply = self._budgets.report_fleet(report)
                    backoff = 0.5
                    break
                except InvalidArgument as err:  # never taken, however often sent: say so loudly, go on
                    log.error("the budget service refuses the fleet report for %s: %s (the interval is not billed)",
                              report.interval_end.ToJsonString(), err)
                    reply = budget_pb2.ReportFleetResponse()
                    break
                except MarginError as err:
                    log.warning("fleet report for %s not taken (%s); retrying", report.interval_end.ToJsonString(),
                                err)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
            else:
                return
            for listener in self._on_allocated:
                try:
                    listener(reply)
                except Exception:
                    log.exception("a fleet allocation listener failed")
            if self._queue.empty():
                self._idle.set()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued report was taken (tests, shutdown); False when that took longer."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.is_set():
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        """Close the open interval (what was measured so far is billed) and deliver what is queued."""
        with self._lock:
            if self._open is not None and self._budgets is not None:
                now = self._clock()
                self._accrue(self._open, self._snapshot, now - self._last_tick)
                self._open.end = max(now, self._open.start + 1e-6)
                self._close(self._open)
                self._open = None
        self.flush(5.0)
        self._stop.set()

