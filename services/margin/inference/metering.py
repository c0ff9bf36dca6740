"""The gateway's own count of what it served: requests per deployment, taken once per metering interval.

The money is not here. What a deployment costs is its share of its pool's bill, allocated by the budget service
from Triton's own per-model statistics (:mod:`margin.inference.fleet`); these counts say how many requests came
through the gateway — the ``quantity`` of the deployment's ledger entry, what its price list turns into revenue,
and when it last served (scale to zero). Prometheus counts them too, by tenant and model.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import NamedTuple

from prometheus_client import Counter

REQUESTS = Counter("margin_inference_requests_total", "Predict requests served, by tenant and model.",
                   ["tenant", "model"])
COMPUTE = Counter("margin_inference_compute_seconds_total", "Time spent in Triton, by tenant and model.",
                  ["tenant", "model"])


class MeterKey(NamedTuple):
    tenant_id: int
    tenant: str
    deployment: str
    model: str
    version: int
    triton_name: str = ""


class Meter:
    def __init__(self, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, int] = defaultdict(int)   # triton name -> requests since the last take
        self._last: dict[str, float] = {}               # triton name -> when it last served
        self._served: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # triton name -> [requests, rows], ever
        self._counters: dict[tuple[str, str], tuple] = {}  # Prometheus children, looked up once

    def record(self, key: MeterKey, compute_us: int, rows: int = 1) -> None:
        now = self._clock()
        with self._lock:
            self._open[key.triton_name] += 1
            self._last[key.triton_name] = now
            served = self._served[key.triton_name]
            served[0] += 1
            served[1] += rows
        counters = self._counters.get((key.tenant, key.model))
        if counters is None:
            counters = self._counters[(key.tenant, key.model)] = (
                REQUESTS.labels(key.tenant, key.model), COMPUTE.labels(key.tenant, key.model))
        counters[0].inc()
        counters[1].inc(compute_us / 1e6)

    def take(self) -> dict[str, int]:
        """Requests per deployment (Triton name) since the last take."""
        with self._lock:
            taken, self._open = dict(self._open), defaultdict(int)
        return taken

    def served(self, triton_name: str) -> tuple[int, int]:
        """(requests, rows) this gateway has served for the deployment since it started — each request counted once,
        however it was batched on its way to Triton; rows are what Triton counts as inferences."""
        with self._lock:
            requests, rows = self._served.get(triton_name, (0, 0))
        return requests, rows

    def last_served(self, triton_name: str) -> float | None:
        """When the deployment last served a request through this gateway (clock seconds), or None."""
        return self._last.get(triton_name)
