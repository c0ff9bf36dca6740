"""What a deployment costs per request *as served*: the figure routing compares and Predict reports.

Two measurements of the model served through Triton on its pool, never the compression worker's figure for the bare
model (which leaves out everything around the model that a served request pays for):

- **deploy** — Deploy's calibration: replica price per hour / (measured requests per second × 3600), per million;
- **triton** — live, from Triton's own per-model statistics over the recent past (what the fleet observer reads
  every metering interval, the same figures the bill is allocated by): execution time per request × the replica
  price. It moves only when the deployment serves, and it does not depend on how busy the pool is.

Routing compares like with like: the live figures when every candidate has one (``min_requests`` in the window),
else every candidate's Deploy figure.

Next to it, :meth:`ServedCost.allocated` is what a request actually cost lately: the deployment's allocated share of
its pool's bill (idle time included) per request it served — what a tenant pays, reported on GetDeployment; it
depends on traffic (an idle deployment's few requests carry its whole reservation), so routing does not steer on it.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from margin.inference.deployments import Deployment
from margin.inference.fleet import ClosedInterval
from margin.v1 import budget_pb2

WINDOW_S = 900.0
MIN_REQUESTS = 200
NS_PER_HOUR_PER_MILLION = 3_600_000_000_000 // 1_000_000  # ns·h⁻¹ → per million requests


class _Window:
    """Per key, (time, amount, requests) entries over the last ``window_s`` and their running sums: reading a key's
    totals is O(1) (Predict reads one per request). Old entries are dropped when the key gets a new one, so a key
    that stopped getting entries keeps the figures of its last window of activity."""

    def __init__(self, window_s: float, clock: Callable[[], float]):
        self._window, self._clock = window_s, clock
        self._lines: dict[object, deque[tuple[float, int, int]]] = {}
        self._sums: dict[object, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def add(self, key, amount: int, requests: int) -> None:
        now = self._clock()
        with self._lock:
            line = self._lines.setdefault(key, deque())
            line.append((now, amount, requests))
            total, count = self._sums.get(key, (0, 0))
            total, count = total + amount, count + requests
            while line and line[0][0] < now - self._window:
                _, old_amount, old_requests = line.popleft()
                total, count = total - old_amount, count - old_requests
            self._sums[key] = (total, count)

    def totals(self, key) -> tuple[int, int]:
        return self._sums.get(key, (0, 0))


class ServedCost:
    def __init__(self, window_s: float = WINDOW_S, min_requests: int = MIN_REQUESTS,
                 clock: Callable[[], float] = time.time):
        self._min = min_requests
        self._usage = _Window(window_s, clock)      # Triton name -> (execution ns, inferences: rows)
        self._allocated = _Window(window_s, clock)  # (tenant, deployment) -> (allocated micros, requests)

    def add_interval(self, closed: ClosedInterval) -> None:
        """The fleet observer closed an interval: each deployment's execution time and inferences (rows) on Triton —
        rows, not Triton's request count, which falls when the gateway coalesces requests into one batch."""
        for name, usage in closed.usage.items():
            if usage.inferences:
                self._usage.add(name, usage.compute_ns, usage.inferences)

    def add_allocations(self, reply: budget_pb2.ReportFleetResponse) -> None:
        """The budget service billed intervals: what each deployment was allocated, and its requests there."""
        for a in reply.allocations:
            self._allocated.add((a.tenant, a.deployment), a.amount.micros, a.inferences)

    def live(self, d: Deployment) -> int | None:
        """Execution time per inference (a batch-1 request's row) on Triton × the replica price, per million; None
        with too few."""
        compute_ns, requests = self._usage.totals(d.triton_name)
        if requests < self._min:
            return None
        return compute_ns * d.price_micros_per_hour // (NS_PER_HOUR_PER_MILLION * requests)

    def allocated(self, d: Deployment) -> int | None:
        """Allocated micros per million requests served lately; None with too few requests."""
        micros, requests = self._allocated.totals((d.tenant, d.name))
        return micros * 1_000_000 // requests if requests >= self._min else None

    def per_million(self, d: Deployment) -> tuple[int, str]:
        """The deployment's served cost per million requests and where it comes from."""
        live = self.live(d)
        return (live, "triton") if live is not None else (d.cost_per_million_micros, "deploy")

    def for_routing(self, candidates: Sequence[Deployment]) -> Callable[[Deployment], int]:
        """The cost routing compares: live for all when all have it, else Deploy's for all."""
        live = {d.name: self.live(d) for d in candidates}
        if candidates and all(v is not None for v in live.values()):
            return lambda d: live[d.name]
        return lambda d: d.cost_per_million_micros
