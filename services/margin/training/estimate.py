"""What a training run will cost, before it runs.

Work is counted in *sample-parameters* (training samples seen × trainable parameters), which scales with both
the data and the model. Throughput in sample-parameters per second comes from history — the median of the last
runs of the same family, device class, precision and world size — or, with no history, from a documented first
guess per device kind with a wide range (×0.25 to ×4). Device-hours = seconds × world_size; money and energy
come from the price catalog (C = Cp × P + Ce × E).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from margin.common.costs import PriceCatalog, RunCost, run_cost
from margin.common.jobs import JobStore
from margin.modelzoo.spec import TrainSpec, parameter_count

# First guesses, sample-parameters per second for one device, when there is no history (measured once on a
# 2-core CPU VM for the digits MLP/CNN; GPUs assumed 20× that for these small models), and start-up seconds.
FIRST_GUESS_WORK_PER_S = {"cpu": 1.0e9}
FIRST_GUESS_GPU_WORK_PER_S = 2.0e10
FIRST_GUESS_OVERHEAD_S = 3.0
FIRST_GUESS_RANGE = (0.25, 4.0)
HISTORY_MARGIN = (0.8, 1.25)
DDP_FIRST_GUESS_EFFICIENCY = 0.8
# A package's size is unknown until its code runs, so its work is counted in samples: first guesses in samples/s
# (a ResNet-style CNN on 3x32x32 images on the 2-core CPU VM; GPUs assumed 20x), with a wider range. After one run
# of the same package version and config, its measured throughput is the basis.
FIRST_GUESS_PACKAGE_SAMPLES_PER_S = {"cpu": 300.0}
FIRST_GUESS_GPU_PACKAGE_SAMPLES_PER_S = 6000.0
FIRST_GUESS_PACKAGE_RANGE = (0.1, 10.0)


@dataclass(frozen=True)
class Estimate:
    seconds: float
    seconds_low: float
    seconds_high: float
    low: RunCost
    expected: RunCost
    high: RunCost
    basis: str

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "seconds_low": self.seconds_low, "seconds_high": self.seconds_high,
                "low_micros": self.low.total_micros, "expected_micros": self.expected.total_micros,
                "high_micros": self.high.total_micros, "device_hours": self.expected.device_hours,
                "device_hours_low": self.low.device_hours, "device_hours_high": self.high.device_hours,
                "energy_kwh": self.expected.energy_kwh, "device_class": self.expected.device_class,
                "basis": self.basis}


class Estimator:
    def __init__(self, store: JobStore, catalog: PriceCatalog):
        self._store = store
        self._catalog = catalog

    def estimate(self, spec: TrainSpec, rows: int) -> Estimate:
        train_rows = max(1, round(rows * (1 - spec.validation_fraction)))
        work = train_rows * spec.epochs * parameter_count(spec)
        history = self._store.throughput_history(spec.history_family, spec.device_class, spec.precision,
                                                 spec.world_size)
        what = f"package {spec.package.model} v{spec.package.number}" if spec.package else spec.family
        if history:
            rates = [rate for rate, _ in history]
            overhead = statistics.median(o for _, o in history)
            seconds = work / statistics.median(rates) + overhead
            low = work / max(rates) * HISTORY_MARGIN[0] + overhead
            high = work / min(rates) * HISTORY_MARGIN[1] + overhead
            unit = "samples/s" if spec.package else "sample-params/s"
            basis = (f"history: {len(history)} run(s) of {what} on {spec.device_class} "
                     f"({spec.precision}, world size {spec.world_size}), median "
                     f"{statistics.median(rates):.3g} {unit}")
        else:
            if spec.package:
                rate = FIRST_GUESS_PACKAGE_SAMPLES_PER_S.get(spec.device_class, FIRST_GUESS_GPU_PACKAGE_SAMPLES_PER_S)
                spread, unit = FIRST_GUESS_PACKAGE_RANGE, "samples/s"
            else:
                rate = FIRST_GUESS_WORK_PER_S.get(spec.device_class, FIRST_GUESS_GPU_WORK_PER_S)
                spread, unit = FIRST_GUESS_RANGE, "sample-params/s"
            if spec.world_size > 1:
                rate *= spec.world_size * DDP_FIRST_GUESS_EFFICIENCY
            compute = work / rate
            seconds = compute + FIRST_GUESS_OVERHEAD_S
            low = compute * spread[0] + FIRST_GUESS_OVERHEAD_S * spread[0]
            high = compute * spread[1] + FIRST_GUESS_OVERHEAD_S * spread[1]
            basis = (f"first guess (no history for {what} on {spec.device_class}): {rate:.3g} {unit} + "
                     f"{FIRST_GUESS_OVERHEAD_S:.0f}s start-up, range ×{spread[0]}–×{spread[1]}")

        def cost(s: float) -> RunCost:
            return run_cost(self._catalog, spec.device_class, s / 3600.0, devices=spec.world_size)

        return Estimate(seconds, low, high, cost(low), cost(seconds), cost(high), basis)
