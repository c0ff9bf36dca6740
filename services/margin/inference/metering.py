"""Metering: what each tenant's requests used and cost, per deployment.

Requests are counted in memory (and in Prometheus, labelled by tenant and model) and flushed to the
spend ledger in batches. Each batch's entries get ids before the write and are kept until the write
succeeds, so a retried flush is idempotent: nothing is lost and nothing billed twice. Costs are summed
exactly (fractional micros) and rounded once per entry, so per-request rounding never drifts.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client import Counter
from sqlalchemy.orm import sessionmaker

from margin.common.ledger import LedgerEntry, append_entries

log = logging.getLogger(__name__)

REQUESTS = Counter("margin_inference_requests_total", "Predict requests served, by tenant and model.",
                   ["tenant", "model"])
COMPUTE = Counter("margin_inference_compute_seconds_total", "Time spent in Triton, by tenant and model.",
                  ["tenant", "model"])
COST = Counter("margin_inference_cost_micros_total", "Serving cost charged, in micro-units, by tenant and model.",
               ["tenant", "model"])


@dataclass
class Usage:
    requests: int = 0
    compute_us: int = 0
    cost_micros: float = 0.0


@dataclass(frozen=True)
class MeterKey:
    tenant_id: int
    tenant: str
    deployment: str
    model: str
    version: int


class Meter:
    def __init__(self, sessions: sessionmaker, flush_every_s: float = 1.0):
        self._sessions = sessions
        self._lock = threading.Lock()
        self._open: dict[MeterKey, Usage] = defaultdict(Usage)
        self._pending: list[LedgerEntry] = []
        self._counters: dict[tuple[str, str], tuple] = {}  # Prometheus children, looked up once
        self._instance = uuid.uuid4().hex[:12]
        self._seq = 0
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(flush_every_s,), name="meter-flush", daemon=True)
        self._thread.start()

    def record(self, key: MeterKey, compute_us: int, cost_micros: float) -> None:
        with self._lock:
            usage = self._open[key]
            usage.requests += 1
            usage.compute_us += compute_us
            usage.cost_micros += cost_micros
        counters = self._counters.get((key.tenant, key.model))
        if counters is None:
            counters = self._counters[(key.tenant, key.model)] = (
                REQUESTS.labels(key.tenant, key.model), COMPUTE.labels(key.tenant, key.model),
                COST.labels(key.tenant, key.model))
        counters[0].inc()
        counters[1].inc(compute_us / 1e6)
        counters[2].inc(cost_micros)

    def flush(self) -> int:
        """Write what was metered since the last flush; returns the number of entries written."""
        with self._flush_lock:
            with self._lock:
                closed, self._open = self._open, defaultdict(Usage)
                self._seq += 1
                for key, usage in closed.items():
                    self._pending.append(LedgerEntry(
                        id=f"serving:{self._instance}:{self._seq}:{key.tenant_id}:{key.deployment}",
                        tenant_id=key.tenant_id, category="serving", micros=round(usage.cost_micros),
                        quantity=usage.requests, model=key.model, version=key.version, deployment=key.deployment,
                        description=f"{usage.requests} requests, {usage.compute_us / 1e6:.3f}s in Triton"))
                batch = list(self._pending)
            if not batch:
                return 0
            written, _ = append_entries(self._sessions, batch)  # raises: kept in _pending for the next try
            with self._lock:
                self._pending = self._pending[len(batch):]
            return written

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.flush()
            except Exception:
                log.exception("ledger flush failed; will retry")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.flush()
