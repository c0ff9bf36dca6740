"""Demand signals from Triton's Prometheus metrics (``/metrics`` on its metrics port).

Triton exports cumulative counters per model and version: ``nv_inference_request_success`` (requests) and
``nv_inference_queue_duration_us`` (µs requests spent queued, summed). The queue time *per request* over an
interval is the ratio of their deltas — Δ queue µs / Δ requests — not the cumulative ratio and not the rate of the
queue counter alone (Triton's sample HPA metric divides differently and gets it wrong, triton-inference-server
issue 8979). The request rate is Δ requests / Δ seconds. A counter that went backwards (Triton restarted) gives
an interval with no data rather than a negative rate.
"""
from __future__ import annotations

import re
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

REQUESTS = "nv_inference_request_success"
QUEUE_US = "nv_inference_queue_duration_us"
_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>[-+0-9.eE]+|NaN)(?:\s+\d+)?$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Counters:
    """One scrape: cumulative requests and queue µs per model (summed over its versions), and when."""
    at_s: float
    requests: dict[str, float]
    queue_us: dict[str, float]


@dataclass(frozen=True)
class Rates:
    rps: float
    queue_us_per_request: float  # 0 when no request completed in the interval


def parse(text: str, at_s: float) -> Counters:
    sums: dict[str, dict[str, float]] = {REQUESTS: defaultdict(float), QUEUE_US: defaultdict(float)}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if not match or match["name"] not in sums or match["value"] == "NaN":
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        if "model" in labels:
            sums[match["name"]][labels["model"]] += float(match["value"])
    return Counters(at_s, dict(sums[REQUESTS]), dict(sums[QUEUE_US]))


def rates(before: Counters, after: Counters, model: str) -> Rates | None:
    """The model's request rate and queue µs per request between two scrapes; None when there is no interval to
    measure (the model is missing from a scrape, no time passed, or a counter was reset)."""
    dt = after.at_s - before.at_s
    if dt <= 0 or model not in before.requests or model not in after.requests:
        return None
    d_requests = after.requests[model] - before.requests[model]
    d_queue = after.queue_us.get(model, 0.0) - before.queue_us.get(model, 0.0)
    if d_requests < 0 or d_queue < 0:
        return None
    return Rates(d_requests / dt, d_queue / d_requests if d_requests else 0.0)


def scrape(url: str, at_s: float, timeout_s: float = 2.0) -> Counters:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # Triton's metrics endpoint, an http URL
        return parse(reply.read().decode(), at_s)
