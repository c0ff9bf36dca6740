"""The cost-budget autoscaler's decisions, pure: no clock, no I/O, integer money.

Per serving deployment, every tick:

- **demand** — the replicas the traffic needs: ``ceil(observed rps / (capacity per replica × target
  utilization))``; when requests queue in Triton longer than the target (queue µs per request, computed from the
  deltas of Triton's counters, see :mod:`margin.budget.autoscaler.triton_metrics`), at least one more than now.
- **affordable** — the replicas the serving budget can pay for: the larger of
  - the *even pace*: what is left, less what the tenant's other deployments will spend at their current burn rate,
    divided by the replica price × the hours left, rounded down — this many could run until the period ends;
  - the *burst*: when the deployment's own burn rate so far this period is known, the money beyond what the rest of
    the period needs at that rate (and the others' rate) may be spent within a short horizon (15 minutes by
    default), so a spike gets the replicas the slack pays for instead of an even share of the budget.
  Either way no more than what is left is committed before the next tick; recomputed every tick, so the spend lands
  at or under the budget even as prices, traffic or the budget change.
- **chosen** = ``min(max(demand, minimum), affordable, maximum)`` with hysteresis: up at once, down only once a
  lower count has been wanted for the whole stabilization window (like the HPA's scale-down window) — except that
  the budget bound applies at once. The reason names the bound that decided.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MICROS_PER_HOUR_SECOND = 3600


@dataclass(frozen=True)
class Inputs:
    now_s: float                      # the tick's time (seconds, any epoch; used for the stabilization window)
    observed_rps: float               # requests per second over the last interval
    queue_us_per_request: float       # Δ queue µs / Δ requests over the last interval (0 without requests)
    capacity_rps_per_replica: float   # measured: what one replica serves at the target latency
    current_replicas: int
    min_replicas: int
    max_replicas: int                 # the hard cap of the deployment's configuration
    replica_micros_per_hour: int      # price of one replica
    remaining_micros: int | None      # the serving budget left this period; None: no serving budget
    seconds_left: float               # until the period ends
    others_micros_per_hour: int = 0   # the tenant's other deployments' current serving burn
    own_micros_per_hour: int | None = None  # this deployment's average burn so far this period (None: unknown)


@dataclass(frozen=True)
class Settings:
    target_utilization: float = 0.7
    queue_target_us: float = 20_000.0         # queueing above this per request asks for one more replica
    scale_down_window_s: float = 300.0
    burst_horizon_s: float = 900.0            # slack beyond the burn rate's needs may be spent within this


@dataclass(frozen=True)
class Decision:
    demand: int
    affordable: int | None                    # None: no serving budget
    chosen: int
    reason: str


def demand_replicas(inputs: Inputs, settings: Settings) -> int:
    if inputs.capacity_rps_per_replica <= 0:
        return max(inputs.current_replicas, inputs.min_replicas)
    need = math.ceil(inputs.observed_rps / (inputs.capacity_rps_per_replica * settings.target_utilization) - 1e-9)
    if inputs.queue_us_per_request > settings.queue_target_us:
        need = max(need, inputs.current_replicas + 1)
    return need


def affordable_replicas(inputs: Inputs, settings: Settings | None = None) -> int | None:
    """Replicas the budget pays for (the even pace or, with a known burn rate, the burst); None: no budget."""
    if inputs.remaining_micros is None:
        return None
    if inputs.replica_micros_per_hour <= 0:
        return inputs.max_replicas
    settings = settings or Settings()
    seconds = max(inputs.seconds_left, 1.0)
    price = inputs.replica_micros_per_hour
    even = inputs.remaining_micros * 3600 - inputs.others_micros_per_hour * seconds
    affordable = max(0, math.floor(even / (price * seconds)))
    if inputs.own_micros_per_hour is not None and seconds > settings.burst_horizon_s:
        horizon = settings.burst_horizon_s
        reserve = (inputs.own_micros_per_hour + inputs.others_micros_per_hour) * (seconds - horizon)
        slack = inputs.remaining_micros * 3600 - reserve - inputs.others_micros_per_hour * horizon
        affordable = max(affordable, math.floor(slack / (price * horizon)))
    return affordable


@dataclass
class Controller:
    """One deployment's controller; it remembers when a lower replica count was first wanted, and the highest
    count wanted since."""
    settings: Settings = field(default_factory=Settings)
    _lower_since: float | None = None
    _lower_max: int = 0

    def decide(self, inputs: Inputs) -> Decision:
        demand = demand_replicas(inputs, self.settings)
        affordable = affordable_replicas(inputs, self.settings)
        wanted = max(demand, inputs.min_replicas)
        reason = f"demand {demand} ({inputs.observed_rps:.1f} rps at {inputs.capacity_rps_per_replica:.1f} rps per " \
                 f"replica × {self.settings.target_utilization:g}" + \
                 (f"; queue {inputs.queue_us_per_request:.0f} µs per request > target)" if
                  inputs.queue_us_per_request > self.settings.queue_target_us else ")")
        if wanted == inputs.min_replicas and demand < inputs.min_replicas:
            reason = f"minimum {inputs.min_replicas} (demand {demand})"
        if wanted > inputs.max_replicas:
            wanted, reason = inputs.max_replicas, f"maximum {inputs.max_replicas} (demand {demand})"
        if wanted < inputs.current_replicas:  # hysteresis: scale down only after the whole window
            if self._lower_since is None:
                self._lower_since, self._lower_max = inputs.now_s, wanted
            self._lower_max = max(self._lower_max, wanted)
            if inputs.now_s - self._lower_since < self.settings.scale_down_window_s:
                wanted, reason = inputs.current_replicas, (
                    f"holding {inputs.current_replicas}: demand {demand} for "
                    f"{inputs.now_s - self._lower_since:.0f}s of the {self.settings.scale_down_window_s:.0f}s "
                    "scale-down window")
            else:  # down to the highest count wanted over the window; a further step down waits a window again
                if self._lower_max > wanted:
                    reason = f"down to {self._lower_max}, the most wanted over the scale-down window (demand {demand})"
                wanted, self._lower_since = self._lower_max, None
        else:
            self._lower_since = None
        if affordable is not None and wanted > affordable:
            wanted, reason = affordable, f"budget: {affordable} replicas affordable (demand {demand})"
        return Decision(demand, affordable, wanted, reason)
