"""The cost-budget autoscaler's decisions and its reading of Triton's counters."""
from __future__ import annotations

import dataclasses

import pytest
from margin.budget.autoscaler import triton_metrics
from margin.budget.autoscaler.controller import Controller, Inputs, Settings, affordable_replicas, demand_replicas

BASE = Inputs(now_s=0.0, observed_rps=0.0, queue_us_per_request=0.0, capacity_rps_per_replica=100.0,
              current_replicas=2, min_replicas=1, max_replicas=20, replica_micros_per_hour=100_000,
              remaining_micros=None, seconds_left=7200.0)


def at(**fields) -> Inputs:
    return dataclasses.replace(BASE, **fields)


@pytest.mark.parametrize(("rps", "queue_us", "expected"), [
    (0.0, 0.0, 0), (70.0, 0.0, 1), (70.1, 0.0, 2), (700.0, 0.0, 10),
    (10.0, 50_000.0, 3),  # queueing beyond the target asks for one more than the current 2
])
def test_demand_from_rate_and_queueing(rps, queue_us, expected):
    assert demand_replicas(at(observed_rps=rps, queue_us_per_request=queue_us), Settings()) == expected


def test_affordable_is_exact_integer_money_after_the_other_deployments_burn():
    # 1,000,000 µ$ left, 2 h left, 100,000 µ$ per replica-hour: 5 replicas for the rest of the period
    assert affordable_replicas(at(remaining_micros=1_000_000)) == 5
    assert affordable_replicas(at(remaining_micros=999_999)) == 4           # never rounds up into an overrun
    assert affordable_replicas(at(remaining_micros=1_000_000, others_micros_per_hour=200_000)) == 3
    assert affordable_replicas(at(remaining_micros=-5)) == 0
    assert affordable_replicas(at(remaining_micros=None)) is None


def test_the_slack_beyond_the_burn_rate_pays_for_a_burst_and_never_more_than_what_is_left():
    burning_one = at(remaining_micros=1_000_000, own_micros_per_hour=100_000)  # 1 replica's worth so far, 2 h left
    # the rest of the period at that rate needs 175,000 µ$; the other 825,000 µ$ buy 33 replicas for 15 minutes
    assert affordable_replicas(burning_one) == 33 > affordable_replicas(at(remaining_micros=1_000_000)) == 5
    assert 33 * 100_000 * 900 / 3600 <= 1_000_000
    assert affordable_replicas(at(remaining_micros=1_000_000, own_micros_per_hour=900_000)) == 5   # even pace wins
    # in the last 10 minutes the even pace itself spends what is left: 60 replicas × 10 min = 1,000,000 µ$
    assert affordable_replicas(at(remaining_micros=1_000_000, own_micros_per_hour=0, seconds_left=600)) == 60


def test_chosen_is_demand_clamped_to_minimum_and_affordable_with_the_reason():
    c = Controller()
    d = c.decide(at(observed_rps=700.0, remaining_micros=1_000_000))
    assert (d.demand, d.affordable, d.chosen) == (10, 5, 5) and d.reason.startswith("budget")
    d = Controller().decide(at(observed_rps=0.0, min_replicas=3, current_replicas=3))
    assert d.chosen == 3 and d.reason.startswith("minimum")
    d = Controller().decide(at(observed_rps=7000.0, max_replicas=8))
    assert d.chosen == 8 and d.reason.startswith("maximum")
    d = Controller().decide(at(observed_rps=300.0))
    assert d.chosen == 5 and d.reason.startswith("demand 5") and d.affordable is None


def test_scale_down_waits_for_the_window_but_the_budget_bound_applies_at_once():
    c = Controller(Settings(scale_down_window_s=300))
    assert c.decide(at(now_s=0, observed_rps=50.0, current_replicas=6)).chosen == 6    # wants 1: hold
    held = c.decide(at(now_s=200, observed_rps=50.0, current_replicas=6))
    assert held.chosen == 6 and held.reason.startswith("holding 6")
    assert c.decide(at(now_s=301, observed_rps=50.0, current_replicas=6)).chosen == 1  # the window passed
    c = Controller(Settings(scale_down_window_s=300))
    cut = c.decide(at(now_s=0, observed_rps=50.0, current_replicas=6, remaining_micros=400_000))
    assert cut.chosen == 2 and cut.reason.startswith("budget")                       # no waiting to stay in budget
    up = Controller().decide(at(now_s=0, observed_rps=500.0, current_replicas=2))
    assert up.chosen == 8                                                              # up at once


SCRAPE_1 = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="t1--digits-v2",version="2"} 100
nv_inference_request_success{model="t1--digits-v3",version="3"} 10
nv_inference_queue_duration_us{model="t1--digits-v2",version="2"} 50000
nv_inference_queue_duration_us{model="t1--digits-v3",version="3"} 1000
"""
SCRAPE_2 = SCRAPE_1.replace("} 100\n", "} 300\n").replace("} 50000\n", "} 70000\n")


def test_queue_time_per_request_is_the_ratio_of_the_deltas():
    before, after = triton_metrics.parse(SCRAPE_1, 0.0), triton_metrics.parse(SCRAPE_2, 10.0)
    rates = triton_metrics.rates(before, after, "t1--digits-v2")
    assert rates.rps == pytest.approx(20.0)
    assert rates.queue_us_per_request == pytest.approx(100.0)  # 20,000 µs over 200 requests, not 70,000/300
    idle = triton_metrics.rates(before, after, "t1--digits-v3")
    assert idle.rps == 0.0 and idle.queue_us_per_request == 0.0
    assert triton_metrics.rates(after, before, "t1--digits-v2") is None                 # no time passed backwards
    restarted = triton_metrics.parse(SCRAPE_1.replace("} 100\n", "} 5\n"), 20.0)
    assert triton_metrics.rates(after, restarted, "t1--digits-v2") is None             # a counter reset
    assert triton_metrics.rates(before, after, "missing") is None


def test_each_step_down_waits_a_whole_window_and_goes_to_the_most_wanted_in_it():
    c = Controller(Settings(scale_down_window_s=300))
    replicas = 8

    def tick(t: float, rps: float) -> int:
        nonlocal replicas
        replicas = c.decide(at(now_s=t, observed_rps=rps, current_replicas=replicas)).chosen
        return replicas

    assert tick(0, 140.0) == 8     # wants 2
    assert tick(150, 280.0) == 8   # wants 4, still inside the window
    assert tick(310, 70.0) == 4    # the window passed: down to the most wanted in it (4), not this tick's 1
    assert tick(320, 70.0) == 4    # a further step down waits a whole new window (the bug: it went to 1 at once)
    assert tick(600, 70.0) == 4
    assert tick(621, 70.0) == 1
