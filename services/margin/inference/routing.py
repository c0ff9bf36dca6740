"""Cost-aware routing: among a model's deployments, the cheapest *as served* that meets the caller's policy.

"As served" is what the deployment costs per request through Triton (:mod:`margin.inference.served_cost`): the
live allocated cost per request once every candidate has served enough lately, else each one's Deploy measurement
(price / measured capacity) — never the compression worker's figure for the bare model, which leaves out
everything around the model that a served request pays for. A READY deployment is preferred to one scaled to
zero (which would make the request wait for a cold start) when both meet the policy.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from margin.common.costs import format_money
from margin.common.errors import FailedPrecondition, InvalidArgument, NotFound
from margin.inference.deployments import READY, Deployment


@dataclass(frozen=True)
class Policy:
    metric: str = ""          # e.g. "accuracy"; empty = no quality floor
    minimum: float = 0.0
    max_latency_ms: float = 0.0  # 0 = no ceiling

    def __post_init__(self) -> None:
        if self.max_latency_ms < 0:
            raise InvalidArgument("routing.max_latency_ms must be >= 0")


def meets(d: Deployment, policy: Policy) -> bool:
    if policy.metric and d.metrics.get(policy.metric, float("-inf")) < policy.minimum:
        return False
    return not (policy.max_latency_ms and d.latency_p50_ms > policy.max_latency_ms)


def deploy_cost(d: Deployment) -> int:
    return d.cost_per_million_micros


def choose(model: str, candidates: Sequence[Deployment], policy: Policy,
           cost: Callable[[Deployment], int] = deploy_cost) -> Deployment:
    """The cheapest candidate (by ``cost`` per million requests) meeting the policy, READY ones first; ties go to
    the higher quality, then the newer version."""
    if not candidates:
        raise NotFound(f"model {model!r} has no ready deployment")
    passing = [d for d in candidates if meets(d, policy)]
    if passing:
        return min(passing, key=lambda d: (d.state != READY, cost(d), -d.metrics.get(policy.metric, 0.0),
                                           -d.version))
    best = max(candidates, key=lambda d: (d.metrics.get(policy.metric, float("-inf")), -d.latency_p50_ms))
    quality = (f"{policy.metric}={best.metrics[policy.metric]:.4g}" if policy.metric in best.metrics
               else f"no {policy.metric!r} metric")
    raise FailedPrecondition(
        f"no deployment of {model!r} meets the policy ({_describe(policy)}); the best available is {best.name} "
        f"with {quality}, p50 {best.latency_p50_ms:.2f} ms, "
        f"{format_money(cost(best))} per million requests as served")


def _describe(policy: Policy) -> str:
    parts = [f"{policy.metric} >= {policy.minimum:g}"] if policy.metric else []
    if policy.max_latency_ms:
        parts.append(f"p50 <= {policy.max_latency_ms:g} ms")
    return ", ".join(parts) or "any"
