"""Unit tests for margin.common.costs against hand-computed examples.

All money is integer micros (1 USD = 1_000_000 micros); every expected value
below is worked out by hand in the comment next to it.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
from margin.common.costs import (
    CATALOG_ENV_VAR,
    CostRange,
    DevicePrice,
    PriceCatalog,
    RunCost,
    UnknownDeviceClass,
    compression_ratio,
    cost_per_million_micros,
    distributed_efficiency,
    estimate_range,
    format_money,
    request_cost_micros,
    run_cost,
    to_micros,
)

REQUIRED_CLASSES = {
    "cpu",
    "nvidia-t4",
    "nvidia-l4",
    "nvidia-a10g",
    "nvidia-a100",
    "nvidia-h100",
    "nvidia-h200",
}


@pytest.fixture()
def catalog() -> PriceCatalog:
    """A fixed catalog so the expectations do not depend on the shipped defaults."""
    return PriceCatalog.from_mapping(
        {
            "currency": "USD",
            "electricity_usd_per_kwh": "0.15",  # -> 150_000 micros/kWh
            "devices": {
                "nvidia-a100": {"usd_per_hour": "4.096575", "watts": 400},  # -> 4_096_575 micros/h
                "nvidia-h100": {"usd_per_hour": "12.29", "watts": 700},  # -> 12_290_000 micros/h
                "tie-even": {"usd_per_hour": "1.000001", "watts": 0},  # -> 1_000_001 micros/h
                "tie-odd": {"usd_per_hour": "1.000003", "watts": 0},  # -> 1_000_003 micros/h
            },
        }
    )


@pytest.fixture(autouse=True)
def _no_env_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CATALOG_ENV_VAR, raising=False)


# --------------------------------------------------------------------------- catalog


def test_catalog_conversion_to_micros(catalog: PriceCatalog) -> None:
    assert catalog.currency == "USD"
    assert catalog.electricity_micros_per_kwh == 150_000
    a100 = catalog.device("nvidia-a100")
    assert a100 == DevicePrice("nvidia-a100", 4_096_575, 400.0)
    assert type(a100.micros_per_hour) is int
    assert catalog.device("nvidia-h100").micros_per_hour == 12_290_000


def test_to_micros_rounds_half_even() -> None:
    assert to_micros("0.15") == 150_000
    assert to_micros(0.15) == 150_000  # float goes through its shortest repr, not 0.1499999...
    # 0.0000005 USD = 0.5 micros -> half-even -> 0; 0.0000015 USD = 1.5 micros -> 2
    assert to_micros("0.0000005") == 0
    assert to_micros("0.0000015") == 2
    assert to_micros("0.0000025") == 2


def test_default_catalog_loads_with_all_classes() -> None:
    cat = PriceCatalog.load()
    assert cat.currency == "USD"
    # electricity_usd_per_kwh: "0.15" -> 150_000 micros
    assert cat.electricity_micros_per_kwh == 150_000
    assert REQUIRED_CLASSES <= set(cat.device_classes)
    for name in REQUIRED_CLASSES:
        price = cat.device(name)
        assert type(price.micros_per_hour) is int
        assert price.micros_per_hour > 0
        assert price.watts > 0
    # p4d.24xlarge $32.7726/h / 8 GPUs = $4.096575 -> 4_096_575 micros, A100 SXM4 400 W
    assert cat.device("nvidia-a100") == DevicePrice("nvidia-a100", 4_096_575, 400.0)
    # GPUs ordered by price: T4 < L4 < A10G < A100 < H100
    order = ["nvidia-t4", "nvidia-l4", "nvidia-a10g", "nvidia-a100", "nvidia-h100"]
    prices = [cat.device(n).micros_per_hour for n in order]
    assert prices == sorted(prices)


def test_catalog_is_immutable(catalog: PriceCatalog) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalog.currency = "EUR"  # type: ignore[misc]
    with pytest.raises(TypeError):
        catalog.devices["cpu"] = DevicePrice("cpu", 1, 1.0)  # type: ignore[index]


def test_unknown_device_message_lists_known_classes(catalog: PriceCatalog) -> None:
    with pytest.raises(UnknownDeviceClass) as info:
        catalog.device("nvidia-b200")
    err = info.value
    assert isinstance(err, ValueError)
    msg = str(err)
    assert "'nvidia-b200'" in msg
    assert "known classes: nvidia-a100, nvidia-h100, tie-even, tie-odd" in msg
    with pytest.raises(UnknownDeviceClass):
        run_cost(catalog, "tpu-v5e", 1.0)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "prices.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


OVERRIDE_YAML = """\
    electricity_usd_per_kwh: "0.10"
    devices:
      nvidia-a100:
        usd_per_hour: "3.00"
      tpu-v5e:
        usd_per_hour: 1.2
        watts: 200
"""


def _check_overridden(cat: PriceCatalog, defaults: PriceCatalog) -> None:
    # overridden price, watts kept from the defaults (deep merge)
    assert cat.device("nvidia-a100") == DevicePrice("nvidia-a100", 3_000_000, 400.0)
    # added device class
    assert cat.device("tpu-v5e") == DevicePrice("tpu-v5e", 1_200_000, 200.0)
    # untouched classes are the defaults
    assert cat.device("nvidia-h100") == defaults.device("nvidia-h100")
    assert cat.device("cpu") == defaults.device("cpu")
    assert cat.currency == "USD"
    assert cat.electricity_micros_per_kwh == 100_000
    # a100 now 3_000_000 micros/h for 2 h = 6_000_000; E = 400 W * 2 h / 1000 = 0.8 kWh
    # * 100_000 micros/kWh = 80_000; total 6_080_000
    cost = run_cost(cat, "nvidia-a100", 2.0)
    assert (cost.compute_micros, cost.energy_micros, cost.total_micros) == (6_000_000, 80_000, 6_080_000)


def test_yaml_override_via_path(tmp_path: Path) -> None:
    defaults = PriceCatalog.load()
    cat = PriceCatalog.load(_write(tmp_path, OVERRIDE_YAML))
    _check_overridden(cat, defaults)


def test_yaml_override_via_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = PriceCatalog.load()
    monkeypatch.setenv(CATALOG_ENV_VAR, _write(tmp_path, OVERRIDE_YAML))
    _check_overridden(PriceCatalog.load(), defaults)


def test_env_names_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CATALOG_ENV_VAR, str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError):
        PriceCatalog.load()


def test_overrides_dict_applies_last(tmp_path: Path) -> None:
    cat = PriceCatalog.load(
        _write(tmp_path, OVERRIDE_YAML),
        overrides={"devices": {"nvidia-a100": {"watts": 250}, "tpu-v5e": {"usd_per_hour": "0.000001"}}},
    )
    assert cat.device("nvidia-a100") == DevicePrice("nvidia-a100", 3_000_000, 250.0)
    assert cat.device("tpu-v5e") == DevicePrice("tpu-v5e", 1, 200.0)


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ('devices:\n  nvidia-a100:\n    usd_per_hour: "-1.00"\n', "devices.nvidia-a100.usd_per_hour"),
        ("devices:\n  nvidia-t4:\n    watts: -70\n", "devices.nvidia-t4.watts"),
        ('devices:\n  new-gpu:\n    usd_per_hour: "2.00"\n', "devices.new-gpu.watts"),
        ("devices:\n  new-gpu:\n    watts: 100\n", "devices.new-gpu.usd_per_hour"),
        ('devices:\n  cpu:\n    usd_per_hour: "abc"\n', "devices.cpu.usd_per_hour"),
        ('devices:\n  cpu:\n    usd_per_hr: "0.20"\n', "usd_per_hr"),
        ('electricity_usd_per_kwh: "-0.01"\n', "electricity_usd_per_kwh"),
        ("electricity_usd_per_kwh: .nan\n", "electricity_usd_per_kwh"),
        ("currency: ''\n", "currency"),
    ],
)
def test_invalid_override_names_field(tmp_path: Path, yaml_text: str, field: str) -> None:
    with pytest.raises(ValueError) as info:
        PriceCatalog.load(_write(tmp_path, yaml_text))
    assert field in str(info.value)


def test_missing_top_level_field() -> None:
    with pytest.raises(ValueError, match="missing field currency"):
        PriceCatalog.from_mapping(
            {"electricity_usd_per_kwh": "0.15", "devices": {"cpu": {"usd_per_hour": 1, "watts": 1}}}
        )
    with pytest.raises(ValueError, match="missing field devices"):
        PriceCatalog.from_mapping({"currency": "USD", "electricity_usd_per_kwh": "0.15"})


def test_device_price_rejects_negative() -> None:
    with pytest.raises(ValueError, match="usd_per_hour"):
        DevicePrice("x", -1, 10.0)
    with pytest.raises(ValueError, match="watts"):
        DevicePrice("x", 1, -10.0)


# --------------------------------------------------------------------------- run cost


def test_run_cost_a100_hand_computed(catalog: PriceCatalog) -> None:
    # A100 at $4.096575/h for 2.5 h, 400 W, $0.15/kWh:
    #   compute = 4_096_575 * 2.5 = 10_241_437.5 micros -> half-even -> 10_241_438
    #   E = 400 W * 2.5 h / 1000 = 1.0 kWh; energy = 150_000 * 1.0 = 150_000
    #   total = 10_391_438 micros ($10.39)
    cost = run_cost(catalog, "nvidia-a100", 2.5)
    assert cost == RunCost(
        device_class="nvidia-a100",
        device_hours=2.5,
        energy_kwh=1.0,
        compute_micros=10_241_438,
        energy_micros=150_000,
        total_micros=10_391_438,
    )
    assert all(type(v) is int for v in (cost.compute_micros, cost.energy_micros, cost.total_micros))


def test_run_cost_multi_device(catalog: PriceCatalog) -> None:
    # H100 $12.29/h, 700 W, 0.75 h on 8 devices: P = 6 device-hours
    #   compute = 12_290_000 * 6 = 73_740_000
    #   E = 700 * 6 / 1000 = 4.2 kWh; energy = 150_000 * 4.2 = 630_000
    #   total = 74_370_000
    cost = run_cost(catalog, "nvidia-h100", 0.75, devices=8)
    assert cost.device_hours == 6.0
    assert cost.energy_kwh == pytest.approx(4.2)
    assert (cost.compute_micros, cost.energy_micros, cost.total_micros) == (73_740_000, 630_000, 74_370_000)


def test_run_cost_half_even_ties(catalog: PriceCatalog) -> None:
    # 1_000_001 * 0.5 = 500_000.5 -> 500_000 (even); 1_000_003 * 0.5 = 500_001.5 -> 500_002 (even)
    assert run_cost(catalog, "tie-even", 0.5).total_micros == 500_000
    assert run_cost(catalog, "tie-odd", 0.5).total_micros == 500_002


def test_run_cost_zero_hours_and_validation(catalog: PriceCatalog) -> None:
    zero = run_cost(catalog, "nvidia-a100", 0)
    assert (zero.compute_micros, zero.energy_micros, zero.total_micros) == (0, 0, 0)
    with pytest.raises(ValueError, match="device_hours"):
        run_cost(catalog, "nvidia-a100", -1.0)
    with pytest.raises(ValueError, match="devices"):
        run_cost(catalog, "nvidia-a100", 1.0, devices=0)
    with pytest.raises(ValueError, match="device_hours"):
        run_cost(catalog, "nvidia-a100", float("nan"))


def test_estimate_range_hand_computed(catalog: PriceCatalog) -> None:
    # expected 2.5 h on A100 (see test_run_cost_a100_hand_computed): total 10_391_438
    # low  = 2.5 * 0.7 = 1.75 h: compute 4_096_575 * 1.75 = 7_169_006.25 -> 7_169_006
    #        E = 400 * 1.75 / 1000 = 0.7 kWh -> 105_000; total 7_274_006
    # high = 2.5 * 1.5 = 3.75 h: compute 4_096_575 * 3.75 = 15_362_156.25 -> 15_362_156
    #        E = 1.5 kWh -> 225_000; total 15_587_156
    rng = estimate_range(catalog, "nvidia-a100", 2.5)
    assert isinstance(rng, CostRange)
    assert rng.expected.total_micros == 10_391_438
    assert (rng.low.device_hours, rng.low.compute_micros, rng.low.energy_micros, rng.low.total_micros) == (
        1.75,
        7_169_006,
        105_000,
        7_274_006,
    )
    assert (
        rng.high.device_hours,
        rng.high.compute_micros,
        rng.high.energy_micros,
        rng.high.total_micros,
    ) == (
        3.75,
        15_362_156,
        225_000,
        15_587_156,
    )


def test_estimate_range_devices_and_custom_factors(catalog: PriceCatalog) -> None:
    # H100, 1 h expected on 2 devices, factors 0.5 / 2:
    # low P = 1: 12_290_000 + 0.7 kWh*150_000 = 12_290_000 + 105_000 = 12_395_000
    # expected P = 2: 24_580_000 + 210_000 = 24_790_000
    # high P = 4: 49_160_000 + 420_000 = 49_580_000
    rng = estimate_range(catalog, "nvidia-h100", 1.0, low_factor=0.5, high_factor=2.0, devices=2)
    assert [rng.low.total_micros, rng.expected.total_micros, rng.high.total_micros] == [
        12_395_000,
        24_790_000,
        49_580_000,
    ]


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.5), (-0.1, 1.5), (1.1, 1.5), (0.7, 0.9)])
def test_estimate_range_rejects_bad_factors(catalog: PriceCatalog, low: float, high: float) -> None:
    with pytest.raises(ValueError, match="factor"):
        estimate_range(catalog, "nvidia-a100", 1.0, low_factor=low, high_factor=high)


def test_estimate_range_degenerate_factors_allowed(catalog: PriceCatalog) -> None:
    rng = estimate_range(catalog, "nvidia-a100", 2.5, low_factor=1.0, high_factor=1.0)
    assert rng.low == rng.expected == rng.high


# --------------------------------------------------------------------------- ratios


def test_compression_ratio() -> None:
    # 100 MB fp32 -> 25 MB int8: R = 4
    assert compression_ratio(100_000_000, 25_000_000) == 4.0
    assert compression_ratio(3, 2) == 1.5
    assert compression_ratio(10, 40) == 0.25  # a "compression" that grew the file
    for bad in [(0, 10), (10, 0), (-5, 10), (10, -5)]:
        with pytest.raises(ValueError):
            compression_ratio(*bad)


def test_distributed_efficiency() -> None:
    # 120 s on one device, 40 s on 4: eta = 3.0, scaling efficiency = 3 / 4 = 0.75
    assert distributed_efficiency(120.0, 40.0, 4) == (3.0, 0.75)
    # perfect scaling on 8: 800 / 100 = 8, 8 / 8 = 1
    assert distributed_efficiency(800.0, 100.0, 8) == (8.0, 1.0)
    for bad in [(0.0, 1.0, 2), (1.0, 0.0, 2), (1.0, 1.0, 0), (-1.0, 1.0, 2)]:
        with pytest.raises(ValueError):
            distributed_efficiency(*bad)


# --------------------------------------------------------------------------- serving


def test_cost_per_million() -> None:
    # $0.50/h = 500_000 micros/h at 100 rps:
    #   500_000 / (100 * 3600) * 10^6 = 1_388_888.88... micros -> 1_388_889 ($1.39 per million)
    assert cost_per_million_micros(500_000, 100) == 1_388_889
    # $12.29/h at 250 rps: 12_290_000 / 900_000 * 10^6 = 13_655_555.55... -> 13_655_556
    assert cost_per_million_micros(12_290_000, 250.0) == 13_655_556
    # 0.5 rps: 500_000 / 1_800 * 10^6 = 277_777_777.77... -> 277_777_778
    assert cost_per_million_micros(500_000, 0.5) == 277_777_778
    # half-even ties: 9 * 10^6 / (1000 * 3600) = 2.5 -> 2; 126 * 10^6 / (10_000 * 3600) = 3.5 -> 4
    assert cost_per_million_micros(9, 1000) == 2
    assert cost_per_million_micros(126, 10_000) == 4
    assert type(cost_per_million_micros(500_000, 100)) is int
    for rps in (0, -1.0):
        with pytest.raises(ValueError, match="requests_per_second"):
            cost_per_million_micros(500_000, rps)
    with pytest.raises(ValueError):
        cost_per_million_micros(-1, 100)


def test_request_cost() -> None:
    # $12.29/h for 0.25 s: 12_290_000 * 0.25 / 3600 = 853.47... -> 853
    assert request_cost_micros(12_290_000, 0.25) == 853
    # $0.50/h for 36 ms: 500_000 * 0.036 / 3600 = 5 exactly
    assert request_cost_micros(500_000, 0.036) == 5
    # ties: 1800 * 1 / 3600 = 0.5 -> 0; 5400 * 1 / 3600 = 1.5 -> 2
    assert request_cost_micros(1_800, 1) == 0
    assert request_cost_micros(5_400, 1) == 2
    # a full hour of compute costs the replica-hour
    assert request_cost_micros(4_096_575, 3600) == 4_096_575
    assert request_cost_micros(500_000, 0) == 0
    assert type(request_cost_micros(12_290_000, 0.25)) is int
    with pytest.raises(ValueError, match="compute_seconds"):
        request_cost_micros(500_000, -0.1)


# --------------------------------------------------------------------------- display


@pytest.mark.parametrize(
    ("micros", "currency", "text"),
    [
        (1_234, "USD", "$0.001234"),
        (1, "USD", "$0.000001"),
        (0, "USD", "$0.00"),
        (500_000, "USD", "$0.50"),
        (10_000, "USD", "$0.01"),
        (999_999, "USD", "$0.999999"),
        (123_400, "USD", "$0.1234"),
        (1_000_000, "USD", "$1.00"),
        (12_345_678, "USD", "$12.35"),
        (12_345_000, "USD", "$12.34"),  # 12.345 -> half-even -> 12.34
        (12_355_000, "USD", "$12.36"),  # 12.355 -> half-even -> 12.36
        (1_234_567_890, "USD", "$1,234.57"),
        (-1_234, "USD", "-$0.001234"),
        (-12_345_678, "USD", "-$12.35"),
        (500_000, "EUR", "€0.50"),
        (2_500_000, "chf", "2.50 CHF"),
    ],
)
def test_format_money(micros: int, currency: str, text: str) -> None:
    assert format_money(micros, currency) == text


def test_format_money_default_currency_and_type() -> None:
    assert format_money(1_388_889) == "$1.39"
    with pytest.raises(ValueError):
        format_money(1.5)  # type: ignore[arg-type]
