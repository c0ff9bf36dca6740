"""Cost-budget autoscaler benchmark: traffic traces replayed through a simulation of serving replicas, under three
scaling policies, over one daily budget period.

**Capacity of one replica, measured.** The per-replica capacity is read from ``bench/results/gateway.json`` (the
gateway benchmark: batch-1 requests through the real Inference gateway into a real Triton serving a TorchScript
MLP, all on one 2-core machine — that machine is the replica). A replica's capacity is the throughput of the
``oip`` path (Triton's own client through the gateway: what a client gets end to end; ``--capacity-path predict``
for Margin's Predict) at the highest measured concurrency whose p99 latency stays within the latency target
(``--latency-target-ms``, default 20 ms, the controller's queueing target). With the recorded run that is
concurrency 8: 1,353 req/s at p99 12.5 ms; concurrency 32 gives more throughput (1,873 req/s) but at p99 43.8 ms,
past the target, so it is not "capacity at the target". The path's
p50 at concurrency 1 is the unloaded latency of a request; the queueing wait a request may have is the target
less that. ``--capacity-path direct`` uses the straight-to-Triton figures instead. A missing file is an error
(run ``make bench-gateway`` first).

**Price.** A replica costs the price catalog's ``cpu`` device class per hour
(``PriceCatalog.load().device("cpu").micros_per_hour``). Traffic is scaled to the replica: the diurnal trace peaks
at ``--peak-load`` replicas' worth of capacity (default 20, i.e. 29 replicas at the 0.7 utilization target).

**Simulation.** Discrete time, ``--step-s`` (10 s) steps over one day (8,640 steps). At the start of each step a
policy picks the number of replicas; new replicas are billed at once and serve after ``--startup-s`` (60 s);
replicas removed stop serving and billing at once (those still starting go first). The queue is a fluid queue per
step with constant arrival rate λ and service rate C = ready replicas × capacity:

- a request that arrives when the backlog is Q waits Q / C (first come, first served); the backlog grows at
  λ − C while λ > C and drains at C − λ otherwise; it is capped at C × ``--queue-timeout-s`` (30 s): requests
  arriving at the cap time out (counted as outside the target); with no ready replica every request fails;
- while there is no backlog (λ < C) the wait is stochastic: M/M/c with c = ready replicas, each serving at the
  per-replica capacity, Erlang C: P(wait > w) = C(c, λ/μ)·exp(−(C − λ)·w), mean wait C(c, λ/μ) / (C − λ);
- a request is *within the latency target* when its wait is at most the target less the unloaded latency. It is
  judged at arrival with the capacity of that step.

Policies see last step's measurements, as a scraper would:

- **static peak**: the replicas the day's highest arrival rate needs at the target utilization
  (``ceil(max λ / (capacity × 0.7))``, perfect foresight), ready all day;
- **plain HPA** on CPU utilization: ``desired = ceil(current × utilization / 0.7)`` where utilization = served
  requests / ready capacity (a replica cannot be more than 100 % busy: saturation hides how much is queued;
  starting replicas count as idle, as the HPA does for unready pods, which gives ``ceil(served rps /
  (capacity × 0.7))``); up at once; down to the highest recommendation of the last 300 s (the HPA's
  scale-down stabilization); no tolerance band, no scale-up rate limit; no budget;
- **Margin**: ``margin.budget.autoscaler.controller.Controller`` as it is, fed every step as the planner feeds
  it: observed rps = requests completed in the last step (Triton's ``nv_inference_request_success`` rate),
  queue µs per request = mean queueing wait of the last step's requests, the measured capacity, current =
  replicas provisioned, the replica price, the serving budget left (budget − spent) and the seconds left in the
  day. ``--margin-signal arrivals`` feeds it the arrival rate instead (what the gateway receives).

All three share min 2 / max 64 replicas, the same 0.7 target, and start the day with the replicas the first
step's traffic needs (static: its peak count).

**Spend comes from the platform's allocation code**, as the budget service bills a serving pool: every step is a
metering interval, billed and split by ``margin.budget.fleet.allocation.allocate``. The pool is the deployment's
provisioned replicas (replica_us = provisioned × step × 10^6, at the replica price); its one consumer is the
deployment, with compute_ns = the requests it served in the step × 10^9 / capacity (a request occupies a replica
for 1 / capacity seconds) and reserved_us = min replicas × step × 10^6; ``--idle-policy`` (usage, the default;
reservation; platform) says how the bill is split; each party's carry and the bill carry are threaded from step to
step as the budget service threads them. The deployment's spend — what its budget, its overrun and the Margin
controller's remaining budget and own burn rate read, for all three policies — is the sum of its allocations; the
platform's idle line is the platform party's. Per trace and policy the ledger total (both) is checked against the
exact replica-seconds × price: the bill carry keeps it at the floor of the exact total.

**Traces** (requests/s over the day; noise: multiplicative log-normal, σ 5 %, seeded):

- ``diurnal``: sinusoid peaking at 16:00, trough 15 % of the peak at 04:00;
- ``bursty``: a diurnal base at 45 % of the peak plus bursts (Poisson, 1 an hour on average; each adds 0.5–1.5 ×
  the base's peak, for 2–15 min, instant rise and fall);
- ``flash``: a diurnal base at 20 % of the peak; from 11:00 to 11:20 traffic is 10× the base;
- ``cut``: diurnal traffic (its own noise); at 12:00 the serving budget is cut to 40 % of the original.

**Budgets.** In ``diurnal``, ``bursty`` and ``flash`` the budget is ``--budget-headroom`` (1.25) × what plain HPA
spends on that trace: a budget that pays for HPA's choices with 25 % to spare, so the SLO comparison with HPA is
fair. In ``cut`` the original budget is set the same way and cut to ``--cut-fraction`` (0.4) at 12:00: then it
does not allow HPA's choices. Per trace the JSON also gives the budget under which every one of HPA's choices
would be affordable at the moment it is made by the controller's own rule (spent so far + the replicas × price ×
time left), and Margin run again with that budget (where it is larger), to show when the controller's pacing,
not the total, decides.

**Figures** per trace and policy: money spent (allocated to the deployment), budget overrun (spent − the
period's final budget, 0 when under), share of requests within the latency target, replica-hours, and reaction
time: for each demand step-up (a burst, the flash crowd) the seconds from its start until ready replicas ×
capacity ≥ the step-up's noise-free arrival rate (mean and worst over the step-ups; "never" when capacity does not
catch up before it ends); for the budget cut, the seconds from the cut until the policy's spend rate fits the cut
budget (replicas × price × time left ≤ what is left); the ledger: the deployment's allocations, the platform's
idle line, their total and the exact replica-seconds × price. Per trace: Margin's saving vs static peak and its
SLO gap to plain HPA (HPA − Margin, points).

Goals: the ledger total = floor(replica-seconds × price) for every trace and policy; zero overrun in every
trace; Margin ≥ 30 % cheaper than static peak in every trace; SLO share within 2 points of plain HPA in the traces
whose budget allows HPA's choices (all but ``cut``). All on allocated spend.

    PYTHONPATH=services python bench/autoscaler_bench.py [--idle-policy usage|reservation|platform] [--png '']
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import datetime as dt
import json
import math
import os
import platform
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from harness import cpu_model, run_and_write
from margin.budget.autoscaler.controller import Controller, Inputs, Settings
from margin.budget.fleet.allocation import MICROSECONDS_PER_HOUR, PLATFORM, Consumer, allocate
from margin.budget.fleet.allocation import POLICIES as IDLE_POLICIES
from margin.common.costs import PriceCatalog
from rich.console import Console
from rich.table import Table

DAY_S = 86_400
HOUR_S = 3_600
POLICIES = ("static", "hpa", "margin")
LABELS = {"static": "static peak", "hpa": "plain HPA", "margin": "Margin"}
TRACES = ("diurnal", "bursty", "flash", "cut")
TITLES = {"diurnal": "diurnal", "bursty": "bursty", "flash": "flash crowd (10× for 20 min at 11:00)",
          "cut": "budget cut to 40 % at 12:00 (diurnal traffic)"}
GOAL_SAVING = 0.30       # Margin at least 30 % cheaper than static peak
GOAL_SLO_GAP_PTS = 2.0   # Margin's share within the target at most 2 points under plain HPA's
REPO = Path(__file__).resolve().parent.parent
DEPLOYMENT = "bench/deployment"   # the one party on the pool besides the platform's idle line


# -- the measured replica --------------------------------------------------------------------------
@dataclass(frozen=True)
class Capacity:
    rps: float                 # one replica, at the latency target
    concurrency: int
    p50_ms: float
    p99_ms: float
    unloaded_ms: float         # p50 at the lowest concurrency: a request's latency without queueing
    path: str
    source: str
    date: str


CAPACITY_MODEL = "mlp"  # the gateway benchmark's model whose figures size a replica


def measured_capacity(path: Path, which: str, target_ms: float) -> Capacity:
    """The highest throughput of ``which`` path among the gateway benchmark's levels whose p99 ≤ the target."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: the per-replica capacity comes from the gateway benchmark's real "
                         "Triton run; run `make bench-gateway` first (or pass --gateway-results)")
    data = json.loads(path.read_text())
    levels = sorted(({"concurrency": lv["concurrency"], **lv["paths"]}
                     for lv in data.get("models", {}).get(CAPACITY_MODEL, {}).get("levels", [])),
                    key=lambda lv: lv["concurrency"])
    if not levels or which not in levels[0]:
        raise SystemExit(f"{path}: no '{which}' figures per concurrency level for the {CAPACITY_MODEL} model")
    within = [lv for lv in levels if lv[which]["p99_ms"] <= target_ms]
    if not within:
        raise SystemExit(f"{path}: no concurrency level of the {which} path has p99 ≤ {target_ms} ms")
    best = max(within, key=lambda lv: lv[which]["rps"])
    unloaded = levels[0][which]["p50_ms"]
    if unloaded >= target_ms:
        raise SystemExit(f"{path}: the unloaded p50 ({unloaded:.2f} ms) is not under the target ({target_ms} ms)")
    return Capacity(best[which]["rps"], best["concurrency"], best[which]["p50_ms"], best[which]["p99_ms"],
                    unloaded, which, str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                    data.get("date", "?"))


# -- traces ----------------------------------------------------------------------------------------
@dataclass
class Trace:
    name: str
    nominal: np.ndarray                 # noise-free requests/s per step
    rps: np.ndarray                     # what arrives: nominal × noise
    step_ups: list[tuple[int, int]]     # demand step-ups: [first step, end step)
    cut_step: int | None = None         # the budget is cut at this step
    budget_micros: int = 0              # the period's budget (before any cut)
    cut_fraction: float = 1.0

    def budget_at(self, step: int) -> int:
        if self.cut_step is not None and step >= self.cut_step:
            return int(self.budget_micros * self.cut_fraction)
        return self.budget_micros

    @property
    def final_budget(self) -> int:
        return self.budget_at(len(self.rps) - 1)


def diurnal_shape(t_s: np.ndarray, trough: float = 0.15, peak_hour: float = 16.0) -> np.ndarray:
    """1 at ``peak_hour``, ``trough`` twelve hours away, a sinusoid between."""
    mid, amp = (1 + trough) / 2, (1 - trough) / 2
    return mid + amp * np.cos(2 * np.pi * (t_s / HOUR_S - peak_hour) / 24)


def noisy(nominal: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return nominal * np.exp(rng.normal(0.0, sigma, nominal.shape) - sigma ** 2 / 2)  # mean 1


def make_traces(peak_rps: float, step_s: int, seed: int, sigma: float, cut_fraction: float) -> dict[str, Trace]:
    n = DAY_S // step_s
    t = np.arange(n) * step_s
    shape = diurnal_shape(t)
    traces: dict[str, Trace] = {}

    rng = np.random.default_rng([seed, 1])
    nominal = peak_rps * shape
    traces["diurnal"] = Trace("diurnal", nominal, noisy(nominal, rng, sigma), [])

    rng = np.random.default_rng([seed, 2])
    base_peak = 0.45 * peak_rps
    nominal = base_peak * shape
    step_ups = []
    for start_s in np.sort(rng.uniform(0, DAY_S - 900, rng.poisson(24))):
        first = int(start_s // step_s)
        end = min(n, first + int(rng.uniform(120, 900) // step_s))
        nominal[first:end] += rng.uniform(0.5, 1.5) * base_peak
        step_ups.append((first, end))
    traces["bursty"] = Trace("bursty", nominal, noisy(nominal, rng, sigma), step_ups)

    rng = np.random.default_rng([seed, 3])
    nominal = 0.2 * peak_rps * shape
    first, end = 11 * HOUR_S // step_s, (11 * HOUR_S + 20 * 60) // step_s
    nominal[first:end] *= 10
    traces["flash"] = Trace("flash", nominal, noisy(nominal, rng, sigma), [(first, end)])

    rng = np.random.default_rng([seed, 4])
    nominal = peak_rps * shape
    traces["cut"] = Trace("cut", nominal, noisy(nominal, rng, sigma), [], cut_step=12 * HOUR_S // step_s,
                          cut_fraction=cut_fraction)
    return traces


# -- the queue -------------------------------------------------------------------------------------
def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in M/M/c (c = ``servers``, a = ``offered`` = λ/μ < c)."""
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1 - rho * (1 - b))


@dataclass
class StepOutcome:
    backlog: float      # at the end of the step
    arrived: float
    served: float       # completed in the step
    within: float       # arrivals whose wait ≤ the allowed wait
    dropped: float      # timed out at the backlog cap, or arrived with no replica ready
    wait_sum_s: float   # total wait of the step's accepted arrivals


def queue_step(backlog: float, lam: float, ready: int, mu: float, dt_s: float, wait_ok_s: float,
               timeout_s: float) -> StepOutcome:
    """One step of the fluid queue (see the module docstring); all figures are request counts."""
    arrived = lam * dt_s
    cap = ready * mu
    if cap <= 0:
        return StepOutcome(0.0, arrived, 0.0, 0.0, arrived + backlog, 0.0)
    q_max = cap * timeout_s
    dropped = max(0.0, backlog - q_max)  # capacity fell under what is queued: the excess times out
    q0 = backlog - dropped
    q_ok = cap * wait_ok_s
    d = lam - cap
    within = wait_sum = 0.0

    def ramp(a: float, b: float, tau: float) -> tuple[float, float]:
        """Arrivals during a linear backlog segment a → b of ``tau`` s: (within the target, total wait)."""
        n = lam * tau
        if max(a, b) <= q_ok:
            share = 1.0
        elif min(a, b) > q_ok:
            share = 0.0
        else:
            share = (q_ok - min(a, b)) / abs(b - a)
        return n * share, n * (a + b) / (2 * cap)

    if d > 0:
        t_cap = min(dt_s, (q_max - q0) / d)
        q1 = q0 + d * t_cap
        w, s = ramp(q0, q1, t_cap)
        within += w
        wait_sum += s
        rest = dt_s - t_cap                 # at the cap: accepted arrivals wait the timeout, the others drop
        wait_sum += cap * rest * timeout_s
        dropped += d * rest
    elif d < 0:
        t_empty = min(dt_s, q0 / -d)
        q1 = q0 + d * t_empty
        w, s = ramp(q0, q1, t_empty)
        within += w
        wait_sum += s
        rest = dt_s - t_empty               # empty: M/M/c waits
        if rest > 0:
            p_wait = erlang_c(ready, lam / mu)
            within += lam * rest * (1 - p_wait * math.exp(-(cap - lam) * wait_ok_s))
            wait_sum += lam * rest * p_wait / (cap - lam)
        q1 = 0.0 if rest > 0 else q1
    else:
        q1 = q0
        w, s = ramp(q0, q0, dt_s)
        within += w
        wait_sum += s
    served = q0 + arrived - (dropped - max(0.0, backlog - q_max)) - q1
    return StepOutcome(q1, arrived, served, within, dropped, wait_sum)


# -- policies --------------------------------------------------------------------------------------
@dataclass
class Observation:
    """What the policy sees at the start of a step: the last step's measurements and the money."""
    t_s: float
    arrived_rps: float
    served_rps: float
    queue_us_per_request: float
    ready: int
    provisioned: int
    remaining_micros: int
    seconds_left: float
    spent_micros: int = 0


def own_burn(obs: Observation) -> int | None:
    """The deployment's average spend per hour so far — what the planner reads from the ledger — once a burst
    horizon of history exists."""
    return int(obs.spent_micros * 3600 / obs.t_s) if obs.t_s >= Settings().burst_horizon_s else None


class Static:
    def __init__(self, replicas: int):
        self.replicas = replicas
        self.reasons: Counter[str] = Counter()

    def decide(self, obs: Observation) -> int:
        return self.replicas


class PlainHpa:
    """The Kubernetes HPA's algorithm on CPU utilization: up at once; down to the highest recommendation of the
    stabilization window."""

    def __init__(self, capacity: float, target: float, window_s: float, minimum: int, maximum: int):
        self.capacity, self.target, self.window_s = capacity, target, window_s
        self.minimum, self.maximum = minimum, maximum
        self.history: list[tuple[float, int]] = []
        self.reasons: Counter[str] = Counter()

    def decide(self, obs: Observation) -> int:
        if obs.ready == 0:
            return obs.provisioned
        utilization = min(1.0, obs.served_rps / (obs.ready * self.capacity))
        desired = math.ceil(obs.ready * utilization / self.target - 1e-9)
        desired = min(max(desired, self.minimum), self.maximum)
        self.history = [(t, r) for t, r in self.history if t > obs.t_s - self.window_s] + [(obs.t_s, desired)]
        if desired >= obs.provisioned:
            return desired
        return min(obs.provisioned, max(r for _, r in self.history))


class Margin:
    """Margin's controller as it is, fed as the planner feeds it."""

    def __init__(self, capacity: float, price_micros_per_hour: int, minimum: int, maximum: int, signal: str):
        self.controller = Controller()
        self.capacity, self.price = capacity, price_micros_per_hour
        self.minimum, self.maximum, self.signal = minimum, maximum, signal
        self.reasons: Counter[str] = Counter()

    def decide(self, obs: Observation) -> int:
        decision = self.controller.decide(Inputs(
            now_s=obs.t_s, observed_rps=obs.served_rps if self.signal == "served" else obs.arrived_rps,
            queue_us_per_request=obs.queue_us_per_request, capacity_rps_per_replica=self.capacity,
            current_replicas=obs.provisioned, min_replicas=self.minimum, max_replicas=self.maximum,
            replica_micros_per_hour=self.price, remaining_micros=obs.remaining_micros,
            seconds_left=obs.seconds_left, own_micros_per_hour=own_burn(obs)))
        self.reasons[decision.reason.split(" ", 1)[0].rstrip(":")] += 1
        return decision.chosen


# -- simulation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimSettings:
    step_s: int
    startup_s: int
    capacity: float
    target: float
    wait_ok_s: float
    timeout_s: float
    price: int
    minimum: int
    maximum: int
    idle_policy: str = "usage"


def replicas_for(rps: float, s: SimSettings) -> int:
    return min(max(math.ceil(rps / (s.capacity * s.target) - 1e-9), s.minimum), s.maximum)


def simulate(trace: Trace, policy, s: SimSettings, initial: int) -> dict:
    """One day of one policy. Every step is a metering interval of the pool (the deployment's provisioned
    replicas), billed and split by the platform's own allocation code, carries threaded as the budget service
    threads them; the deployment's spend is the sum of its allocations."""
    n, dt_s = len(trace.rps), s.step_s
    pods = [-float("inf")] * initial          # ready-at times, sorted
    provisioned, ready_series, spent_series = np.zeros(n, int), np.zeros(n, int), np.zeros(n, np.int64)
    backlog = 0.0
    replica_s = spent = idle = billed = 0
    carries: dict[str, Fraction] = {}
    bill_carry = Fraction(0)
    compute_ns_per_request = 1e9 / s.capacity  # a request occupies a replica for 1 / capacity seconds
    reserved_us = s.minimum * dt_s * 1_000_000
    bases: Counter[str] = Counter()
    within = arrived = dropped = 0.0
    changes = reversals = 0
    last_down_s: float | None = None
    obs = Observation(0.0, trace.rps[0], trace.rps[0], 0.0, initial, initial, trace.budget_at(0), DAY_S)
    for k in range(n):
        t = k * dt_s
        obs.t_s, obs.provisioned = float(t), len(pods)
        obs.ready = bisect.bisect_right(pods, t)
        obs.remaining_micros, obs.seconds_left = trace.budget_at(k) - spent, float(DAY_S - t)
        obs.spent_micros = spent
        target = policy.decide(obs)
        if target != len(pods):
            changes += 1
            if target > len(pods):
                if last_down_s is not None and t - last_down_s <= s.startup_s:
                    reversals += 1
                pods.extend([t + s.startup_s] * (target - len(pods)))
            else:
                del pods[target:]             # the last to be ready go first
                last_down_s = t
        ready = bisect.bisect_right(pods, t)
        out = queue_step(backlog, float(trace.rps[k]), ready, s.capacity, dt_s, s.wait_ok_s, s.timeout_s)
        backlog = out.backlog
        within, arrived, dropped = within + out.within, arrived + out.arrived, dropped + out.dropped
        replica_s += len(pods) * dt_s
        share = allocate(len(pods) * dt_s * 1_000_000, s.price,
                         [Consumer(DEPLOYMENT, round(out.served * compute_ns_per_request), reserved_us)],
                         s.idle_policy, carries, bill_carry)
        carries, bill_carry = share.carries, share.bill_carry
        spent += share.micros[DEPLOYMENT]
        idle += share.micros[PLATFORM]
        billed += share.bill
        bases[share.basis] += 1
        provisioned[k], ready_series[k], spent_series[k] = len(pods), ready, spent
        accepted = out.arrived - out.dropped
        obs.arrived_rps, obs.served_rps = out.arrived / dt_s, out.served / dt_s
        obs.queue_us_per_request = out.wait_sum_s / accepted * 1e6 if accepted > 0 and ready else 0.0
    exact = Fraction(replica_s * 1_000_000 * s.price, MICROSECONDS_PER_HOUR)  # replica-seconds × price, exact
    assert billed == spent + idle, "the allocations do not sum to the bills"
    return {"provisioned": provisioned, "ready": ready_series, "spent": spent_series,
            "spent_micros": int(spent), "platform_idle_micros": int(idle), "ledger_micros": int(spent + idle),
            "exact_bill": exact, "bases": dict(bases), "replica_hours": replica_s / HOUR_S,
            "slo_share": within / arrived, "dropped_share": dropped / arrived,
            "scale_changes": changes, "reversals": reversals, "reasons": dict(policy.reasons)}


def reaction(trace: Trace, run: dict, s: SimSettings) -> dict:
    """Demand step-ups: seconds until ready capacity ≥ the noise-free rate; the cut: until the spend rate fits."""
    out: dict = {"step_ups": None, "cut": None}
    if trace.step_ups:
        times = []
        for first, end in trace.step_ups:
            hit = next((k for k in range(first, end) if run["ready"][k] * s.capacity >= trace.nominal[k]), None)
            times.append(None if hit is None else (hit - first) * s.step_s)
        caught = [x for x in times if x is not None]
        out["step_ups"] = {"count": len(times), "never": len(times) - len(caught),
                           "mean_s": float(np.mean(caught)) if caught else None,
                           "max_s": max(caught) if caught else None, "each_s": times}
    if trace.cut_step is not None:
        budget = trace.budget_at(trace.cut_step)
        hit = None
        for k in range(trace.cut_step, len(trace.rps)):
            spent_before = int(run["spent"][k - 1])
            if run["provisioned"][k] * s.price * (DAY_S - k * s.step_s) <= (budget - spent_before) * HOUR_S:
                hit = (k - trace.cut_step) * s.step_s
                break
        out["cut"] = {"s": hit}
    return out


def budget_affording(run: dict, s: SimSettings) -> int:
    """The smallest budget under which each of a run's replica counts is affordable when chosen, by the
    controller's rule: spent so far + replicas × price × time left."""
    prov, spent = run["provisioned"], run["spent"]
    worst = 0
    for k in range(len(prov)):
        before = int(spent[k - 1]) if k else 0
        worst = max(worst, before + -(-int(prov[k]) * s.price * (DAY_S - k * s.step_s) // HOUR_S))
    return worst


# -- the benchmark ---------------------------------------------------------------------------------
def run(args: argparse.Namespace, console: Console) -> dict:
    cap = measured_capacity(args.gateway_results, args.capacity_path, args.latency_target_ms)
    price = PriceCatalog.load().device(args.device_class).micros_per_hour
    settings = Settings()
    s = SimSettings(step_s=args.step_s, startup_s=args.startup_s, capacity=cap.rps,
                    target=settings.target_utilization,
                    wait_ok_s=(args.latency_target_ms - cap.unloaded_ms) / 1000, timeout_s=args.queue_timeout_s,
                    price=price, minimum=args.min_replicas, maximum=args.max_replicas, idle_policy=args.idle_policy)
    console.print(f"replica: {cap.rps:,.0f} req/s ({cap.path} path, concurrency {cap.concurrency}, p50 "
                  f"{cap.p50_ms:.2f} / p99 {cap.p99_ms:.2f} ms; unloaded p50 {cap.unloaded_ms:.2f} ms; from "
                  f"{cap.source} of {cap.date}); price {price / 1e6:.4f} USD/h ({args.device_class}); spend: "
                  f"every {s.step_s} s step billed and allocated by margin.budget.fleet.allocation.allocate, "
                  f"idle policy {s.idle_policy}")
    traces = make_traces(args.peak_load * cap.rps, args.step_s, args.seed, args.noise, args.cut_fraction)
    results: dict[str, dict] = {}
    series: dict[str, dict] = {}
    for name, trace in traces.items():
        initial = replicas_for(float(trace.rps[0]), s)
        static_n = replicas_for(float(trace.rps.max()), s)

        def policy(kind: str, static_n: int = static_n):
            if kind == "static":
                return Static(static_n)
            if kind == "hpa":
                return PlainHpa(cap.rps, s.target, settings.scale_down_window_s, s.minimum, s.maximum)
            return Margin(cap.rps, price, s.minimum, s.maximum, args.margin_signal)

        hpa = simulate(trace, policy("hpa"), s, initial)       # budget-blind: the budget does not change it
        trace.budget_micros = int(args.budget_headroom * hpa["spent_micros"])
        runs = {"static": simulate(trace, policy("static"), s, static_n), "hpa": hpa,
                "margin": simulate(trace, policy("margin"), s, initial)}
        per_policy = {}
        for kind, r in runs.items():
            per_policy[kind] = {
                "spent_usd": r["spent_micros"] / 1e6, "spent_micros": r["spent_micros"],
                "overrun_usd": max(0, r["spent_micros"] - trace.final_budget) / 1e6,
                "slo_share_pct": 100 * r["slo_share"], "dropped_pct": 100 * r["dropped_share"],
                "replica_hours": r["replica_hours"], "reaction": reaction(trace, r, s),
                "peak_replicas": int(r["provisioned"].max()), "scale_changes": r["scale_changes"],
                "reversals_within_startup": r["reversals"], "reasons": r["reasons"], "ledger": ledger(r)}
        m, st, h = per_policy["margin"], per_policy["static"], per_policy["hpa"]
        affording = budget_affording(hpa, s)
        ample = None
        if trace.cut_step is None:  # the same controller, with a budget that affords HPA's every choice when made
            roomy = dataclasses.replace(trace, budget_micros=max(trace.budget_micros, affording))
            a = simulate(roomy, policy("margin"), s, initial)
            ample = {"budget_usd": roomy.budget_micros / 1e6, "spent_usd": a["spent_micros"] / 1e6,
                     "overrun_usd": max(0, a["spent_micros"] - roomy.final_budget) / 1e6,
                     "slo_share_pct": 100 * a["slo_share"], "replica_hours": a["replica_hours"],
                     "slo_gap_vs_hpa_pts": h["slo_share_pct"] - 100 * a["slo_share"],
                     "saving_vs_static_pct": 100 * (1 - a["spent_micros"] / st["spent_micros"]),
                     "budget_bound_steps": a["reasons"].get("budget", 0), "reasons": a["reasons"],
                     "reaction": reaction(roomy, a, s), "ledger": ledger(a)}
        results[name] = {
            "title": TITLES[name], "budget_usd": trace.budget_micros / 1e6,
            "final_budget_usd": trace.final_budget / 1e6,
            "cut": None if trace.cut_step is None else {"at_s": trace.cut_step * s.step_s,
                                                        "fraction": trace.cut_fraction},
            "budget_allows_hpa": trace.cut_step is None,
            "budget_affording_hpa_each_tick_usd": affording / 1e6,
            "peak_rps": float(trace.rps.max()), "mean_rps": float(trace.rps.mean()),
            "requests": float(trace.rps.sum() * s.step_s), "static_replicas": static_n,
            "policies": per_policy,
            "margin_saving_vs_static_pct": 100 * (1 - m["spent_micros"] / st["spent_micros"]),
            "margin_ledger_saving_vs_static_pct":  # the whole bill (deployment + platform idle), whatever the policy
                100 * (1 - m["ledger"]["ledger_micros"] / st["ledger"]["ledger_micros"]),
            "slo_gap_vs_hpa_pts": h["slo_share_pct"] - m["slo_share_pct"],
            "margin_budget_bound_steps": m["reasons"].get("budget", 0),
            "margin_with_budget_affording_hpa": ample}
        series[name] = {"trace": trace, "runs": runs}
        console.print(f"  {name}: simulated")
    out = {
        "machine": {"node": platform.node(), "cpu_count": os.cpu_count(), "cpu": cpu_model(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "numpy": np.__version__},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {
            "capacity": cap.__dict__, "latency_target_ms": args.latency_target_ms,
            "allowed_wait_ms": s.wait_ok_s * 1000, "device_class": args.device_class,
            "replica_micros_per_hour": price, "period_s": DAY_S, "step_s": s.step_s, "startup_s": s.startup_s,
            "queue_timeout_s": s.timeout_s, "min_replicas": s.minimum, "max_replicas": s.maximum,
            "target_utilization": s.target, "scale_down_window_s": settings.scale_down_window_s,
            "controller_queue_target_us": settings.queue_target_us, "margin_signal": args.margin_signal,
            "peak_load_replicas": args.peak_load, "peak_rps": args.peak_load * cap.rps, "noise_sigma": args.noise,
            "seed": args.seed, "budget_headroom_over_hpa": args.budget_headroom, "cut_fraction": args.cut_fraction,
            "queue_model": "fluid backlog (FIFO, cap = timeout × capacity) + M/M/c Erlang C wait when no backlog",
            "spend": {"code": "margin.budget.fleet.allocation.allocate", "idle_policy": s.idle_policy,
                      "interval_s": s.step_s,
                      "pool": "the deployment's provisioned replicas: replica_us = provisioned × step × 10^6",
                      "consumer": "the deployment: compute_ns = requests served in the step × 10^9 / capacity rps, "
                                  "reserved_us = min replicas × step × 10^6",
                      "carries": "each party's carry and the bill carry threaded from step to step",
                      "deployment_spend": "Σ its allocations (what the budget, the overrun and the controller's "
                                          "remaining budget and own burn rate read)",
                      "platform_idle": "Σ the platform party's allocations"}},
        "traces": results,
    }
    out["goals"] = goals(results)
    if args.png is not None:
        plot(series, s, args.png)
        out["png"] = str(args.png)
    return out


def ledger(run: dict) -> dict:
    """A run's ledger against its bill: Σ allocations (the deployment's and the platform's idle line) vs the
    exact replica-seconds × price."""
    exact: Fraction = run["exact_bill"]
    return {"ledger_micros": run["ledger_micros"], "deployment_micros": run["spent_micros"],
            "platform_idle_micros": run["platform_idle_micros"],
            "exact_bill_micros": f"{exact.numerator}/{exact.denominator}" if exact.denominator > 1
            else str(exact.numerator),
            "exact_bill_micros_float": float(exact), "floor_exact_micros": math.floor(exact),
            "ledger_over_exact": float(run["ledger_micros"] / exact) if exact else 1.0,
            "equal": run["ledger_micros"] == math.floor(exact), "split_by": run["bases"]}


def goals(results: dict) -> list[dict]:
    overruns = {n: r["policies"]["margin"]["overrun_usd"] for n, r in results.items()}
    savings = {n: r["margin_saving_vs_static_pct"] for n, r in results.items()}
    gaps = {n: r["slo_gap_vs_hpa_pts"] for n, r in results.items() if r["budget_allows_hpa"]}
    books = {n: [p["ledger"] for p in r["policies"].values()] for n, r in results.items()}
    return [
        {"name": "ledger = replica-seconds × price", "goal": "every trace and policy: Σ allocations (deployment + "
                                                            "platform idle) = floor(replica-seconds × price)",
         "value": {n: "equal" if all(b["equal"] for b in bs) else
                   f"off by {max(abs(b['ledger_micros'] - b['floor_exact_micros']) for b in bs)} micros"
                   for n, bs in books.items()},
         "met": all(b["equal"] for bs in books.values() for b in bs)},
        {"name": "zero overrun", "goal": "Margin's overrun = 0 in every trace",
         "value": {n: round(v, 6) for n, v in overruns.items()}, "met": all(v == 0 for v in overruns.values())},
        {"name": "cheaper than static peak", "goal": f"Margin ≥ {GOAL_SAVING:.0%} cheaper than static peak in "
                                                     "every trace",
         "value": {n: round(v, 1) for n, v in savings.items()},
         "met": all(v >= 100 * GOAL_SAVING for v in savings.values())},
        {"name": "SLO vs plain HPA", "goal": f"HPA's share within the target − Margin's ≤ {GOAL_SLO_GAP_PTS:g} "
                                             "points where the budget allows HPA's choices",
         "value": {n: round(v, 2) for n, v in gaps.items()}, "met": all(v <= GOAL_SLO_GAP_PTS for v in gaps.values())},
    ]


# -- report ----------------------------------------------------------------------------------------
def fmt_reaction(reaction: dict) -> str:
    parts = []
    if reaction["step_ups"]:
        r = reaction["step_ups"]
        if r["mean_s"] is None:
            parts.append(f"never ({r['count']})")
        else:
            parts.append(f"{r['mean_s']:.0f} s mean / {r['max_s']:.0f} s max"
                         + (f", never {r['never']}/{r['count']}" if r["never"] else ""))
    if reaction["cut"]:
        s = reaction["cut"]["s"]
        parts.append("cut: never" if s is None else f"cut: {s:.0f} s")
    return "; ".join(parts) or "—"


def report(result: dict, console: Console) -> None:
    st = result["settings"]
    cap = st["capacity"]
    table = Table(title=f"Autoscaler over one day: replica {cap['rps']:,.0f} req/s ({cap['path']}, "
                        f"c={cap['concurrency']}, p99 {cap['p99_ms']:.1f} ms), "
                        f"{st['replica_micros_per_hour'] / 1e6:.2f} USD/h, latency target "
                        f"{st['latency_target_ms']:g} ms, start-up {st['startup_s']} s",
                  caption="overrun = spent − the period's final budget; within target = requests whose latency ≤ "
                          "the target; reaction: step-ups until ready capacity covers the rate, the cut until the "
                          "spend rate fits the budget")
    for col in ("trace", "budget $", "policy", "spent $", "overrun $", "within target", "dropped", "reaction",
                "replica-h", "peak", "changes"):
        table.add_column(col, justify="left" if col in ("trace", "policy", "reaction") else "right")
    for name, r in result["traces"].items():
        budget = f"{r['budget_usd']:.2f}" + (f" → {r['final_budget_usd']:.2f}" if r["cut"] else "")
        for i, kind in enumerate(POLICIES):
            p = r["policies"][kind]
            table.add_row(name if i == 0 else "", budget if i == 0 else "", LABELS[kind], f"{p['spent_usd']:.2f}",
                          f"{p['overrun_usd']:.2f}", f"{p['slo_share_pct']:.2f} %", f"{p['dropped_pct']:.2f} %",
                          fmt_reaction(p["reaction"]), f"{p['replica_hours']:.1f}", str(p["peak_replicas"]),
                          str(p["scale_changes"]), end_section=i == len(POLICIES) - 1)
    console.print(table)
    summary = Table(title="Margin per trace",
                    caption="last three columns: Margin again, with a budget under which each of plain HPA's replica "
                            "counts was affordable when HPA chose it (spent so far + replicas × price × time left)")
    for col in ("trace", "saving vs static", "SLO gap vs HPA", "budget-bound steps",
                "reversals ≤ start-up (HPA / Margin)", "budget affording HPA", "SLO gap", "saving vs static "):
        summary.add_column(col, justify="left" if col == "trace" else "right")
    for name, r in result["traces"].items():
        p, a = r["policies"], r["margin_with_budget_affording_hpa"]
        extra = ("—", "—", "—") if a is None else (
            f"{a['budget_usd']:.2f} $ ({a['budget_usd'] / r['budget_usd']:.2f}×)",
            f"{a['slo_gap_vs_hpa_pts']:+.2f} pts", f"{a['saving_vs_static_pct']:.1f} %")
        summary.add_row(name, f"{r['margin_saving_vs_static_pct']:.1f} %", f"{r['slo_gap_vs_hpa_pts']:+.2f} pts",
                        f"{r['margin_budget_bound_steps']} / {DAY_S // st['step_s']}",
                        f"{p['hpa']['reversals_within_startup']} / {p['margin']['reversals_within_startup']}",
                        *extra)
    console.print(summary)
    books = Table(title=f"Ledger vs bill ({st['spend']['idle_policy']} idle policy): every {st['step_s']} s step "
                        "billed and allocated by margin.budget.fleet.allocation.allocate",
                  caption="ledger = Σ allocations to the deployment + the platform's idle line; bill = replica-seconds "
                          "× price, exact (µ$); goal: ledger = floor(bill), ratio 1.000000")
    for col in ("trace", "policy", "deployment µ$", "platform idle µ$", "ledger µ$", "replica-s × price µ$",
                "ledger / bill", "equal"):
        books.add_column(col, justify="left" if col in ("trace", "policy") else "right")
    for name, r in result["traces"].items():
        for i, kind in enumerate(POLICIES):
            b = r["policies"][kind]["ledger"]
            books.add_row(name if i == 0 else "", LABELS[kind], f"{b['deployment_micros']:,}",
                          f"{b['platform_idle_micros']:,}", f"{b['ledger_micros']:,}",
                          f"{b['exact_bill_micros_float']:,.3f}", f"{b['ledger_over_exact']:.6f}",
                          "yes" if b["equal"] else "[red]no[/]", end_section=i == len(POLICIES) - 1)
    console.print(books)
    for goal in result["goals"]:
        mark = "[green]met[/]" if goal["met"] else "[red]missed[/]"
        console.print(f"{mark}  {goal['name']}: {goal['goal']} - measured {goal['value']}")


def plot(series: dict, s: SimSettings, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"static": "tab:gray", "hpa": "tab:blue", "margin": "tab:red"}
    fig, axes = plt.subplots(len(series), 2, figsize=(14, 3.2 * len(series)), squeeze=False)
    for row, (name, data) in enumerate(series.items()):
        trace, runs = data["trace"], data["runs"]
        hours = np.arange(len(trace.rps)) * s.step_s / HOUR_S
        left, right = axes[row]
        left.plot(hours, trace.nominal / (s.capacity * s.target), color="black", lw=0.8,
                  label="demand: noise-free rate / (capacity × 0.7)")
        for kind in POLICIES:
            left.step(hours, runs[kind]["provisioned"], where="post", color=colors[kind], lw=1.0,
                      ls="--" if kind == "static" else "-", label=f"{LABELS[kind]} (provisioned)")
        left.set_title(f"{TITLES[name]}: replicas")
        left.set_xlim(0, 24)
        left.set_ylabel("replicas")
        for kind in POLICIES:
            right.plot(hours, runs[kind]["spent"] / 1e6, color=colors[kind], lw=1.2,
                       label=f"{LABELS[kind]} (allocated)")
        budget = np.array([trace.budget_at(k) for k in range(len(trace.rps))]) / 1e6
        right.step(hours, budget, where="post", color="black", ls="--", lw=1, label="budget")
        right.set_ylim(0, max(budget.max(), runs["hpa"]["spent"][-1] / 1e6) * 1.3)
        right.set_title(f"{name}: cumulative spend allocated to the deployment (USD)")
        right.set_xlim(0, 24)
        right.set_ylabel("USD")
        if row == 0:
            left.legend(loc="upper left", fontsize=8)
            right.legend(loc="upper left", fontsize=8, title=f"allocate(), {s.idle_policy} idle policy",
                         title_fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("hour of the day")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def png_path(text: str) -> Path | None:
    """``--png``: a path ending in .png, or no plot for '' / 'none'. (``Path('')`` is ``Path('.')``, which is
    true, and matplotlib saves ``'.'`` as ``./.png``: an empty argument once left a stray ``.png`` in the
    repository root.)"""
    if text.strip().lower() in ("", "none"):
        return None
    path = Path(text)
    if path.suffix.lower() != ".png" or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a .png file path ('' or 'none' for no plot)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway-results", type=Path, default=REPO / "bench/results/gateway.json",
                        help="the gateway benchmark's results: the per-replica capacity")
    parser.add_argument("--capacity-path", choices=("oip", "predict", "direct"), default="oip")
    parser.add_argument("--latency-target-ms", type=float, default=20.0)
    parser.add_argument("--device-class", default="cpu", help="price catalog device class of a replica")
    parser.add_argument("--peak-load", type=float, default=20.0,
                        help="the diurnal peak, in replicas' worth of capacity")
    parser.add_argument("--step-s", type=int, default=10)
    parser.add_argument("--startup-s", type=int, default=60)
    parser.add_argument("--queue-timeout-s", type=float, default=30.0)
    parser.add_argument("--min-replicas", type=int, default=2)
    parser.add_argument("--max-replicas", type=int, default=64)
    parser.add_argument("--budget-headroom", type=float, default=1.25,
                        help="budget = this × plain HPA's spend on the trace")
    parser.add_argument("--cut-fraction", type=float, default=0.4)
    parser.add_argument("--margin-signal", choices=("served", "arrivals"), default="served",
                        help="the controller's observed rps: completed requests (Triton's counter) or arrivals")
    parser.add_argument("--noise", type=float, default=0.05, help="σ of the log-normal noise on the rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle-policy", choices=IDLE_POLICIES, default="usage",
                        help="how the allocation code splits each step's bill between the deployment and the "
                             "platform's idle line")
    parser.add_argument("--out", type=Path, default=Path("bench/results/autoscaler.json"))
    parser.add_argument("--png", type=png_path, default=Path("bench/results/autoscaler.png"),
                        help="where the plot goes, a path ending in .png; '' or 'none': no plot")
    args = parser.parse_args()
    if DAY_S % args.step_s or args.step_s < 1 or args.startup_s < 0 or args.min_replicas < 0 \
            or args.max_replicas < max(args.min_replicas, 1):
        parser.error("step must divide a day; replicas 0 ≤ min ≤ max, max ≥ 1")
    run_and_write(run, report, args)


if __name__ == "__main__":
    main()
