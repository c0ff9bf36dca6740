"""Cost-aware routing: among a model's ready deployments, the cheapest that meets the caller's policy."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from margin.common.costs import format_money
from margin.common.errors import FailedPrecondition, InvalidArgument, NotFound
from margin.inference.deployments import Deployment


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


def choose(model: str, candidates: Sequence[Deployment], policy: Policy) -> Deployment:
    """The cheapest candidate meeting the policy; ties go to the higher quality, then the newer version."""
    if not candidates:
        raise NotFound(f"model {model!r} has no ready deployment")
    passing = [d for d in candidates if meets(d, policy)]
    if passing:
        return min(passing, key=lambda d: (d.routing_cost_per_million, -d.metrics.get(policy.metric, 0.0),
                                           -d.version))
    best = max(candidates, key=lambda d: (d.metrics.get(policy.metric, float("-inf")), -d.latency_p50_ms))
    quality = (f"{policy.metric}={best.metrics[policy.metric]:.4g}" if policy.metric in best.metrics
               else f"no {policy.metric!r} metric")
    raise FailedPrecondition(
        f"no deployment of {model!r} meets the policy ({_describe(policy)}); the best available is {best.name} "
        f"with {quality}, p50 {best.latency_p50_ms:.2f} ms, "
        f"{format_money(best.routing_cost_per_million)} per million requests")


def _describe(policy: Policy) -> str:
    parts = [f"{policy.metric} >= {policy.minimum:g}"] if policy.metric else []
    if policy.max_latency_ms:
        parts.append(f"p50 <= {policy.max_latency_ms:g} ms")
    return ", ".join(parts) or "any"
