"""The cost model (ARCHITECTURE.md section 4).

Money is always an integer number of micro-units (1 USD = 1_000_000 micros) in
every public return value. Internal arithmetic uses :class:`decimal.Decimal`;
each money component is rounded once, half-even, to whole micros.

- Run cost: ``C = Cp * P + Ce * E`` with P device-hours and
  E = watts * P / 1000 kWh.
- Compression ratio: ``R = V_original / V_compressed``.
- Distributed efficiency: ``eta = T_single / T_distributed``; scaling
  efficiency ``eta / N``.
- Serving: cost per million requests = price/hour / (rps * 3600) * 10^6; a
  request is charged price/hour * compute_seconds / 3600.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, localcontext
from importlib import resources
from types import MappingProxyType
from typing import Any

import yaml

__all__ = [
    "CATALOG_ENV_VAR",
    "MICROS_PER_UNIT",
    "CostRange",
    "DevicePrice",
    "PriceCatalog",
    "RunCost",
    "UnknownDeviceClass",
    "compression_ratio",
    "cost_per_million_micros",
    "distributed_efficiency",
    "estimate_range",
    "format_money",
    "request_cost_micros",
    "run_cost",
    "to_micros",
]

#: Environment variable naming a YAML file deep-merged over the default catalog.
CATALOG_ENV_VAR = "MARGIN_PRICE_CATALOG"

#: Micro-units in one currency unit.
MICROS_PER_UNIT = 1_000_000

_DEFAULT_PACKAGE = "margin.common"
_DEFAULT_RESOURCE = "prices.yaml"
_TOP_LEVEL_FIELDS = ("currency", "electricity_usd_per_kwh", "devices")
_DEVICE_FIELDS = ("usd_per_hour", "watts")
_MICROS = Decimal(MICROS_PER_UNIT)
_SECONDS_PER_HOUR = Decimal(3600)
_ONE = Decimal(1)
# Enough precision that no intermediate result is rounded before the final
# half-even rounding to whole micros.
_CONTEXT = Context(prec=60)


class UnknownDeviceClass(ValueError):
    """A device class that is not in the price catalog."""

    def __init__(self, device_class: str, known: list[str]) -> None:
        self.device_class = device_class
        self.known = sorted(known)
        super().__init__(
            f"unknown device class {device_class!r}; known classes: "
            + (", ".join(self.known) if self.known else "(none)")
        )


# --------------------------------------------------------------------------- helpers


def _decimal(value: Any, field: str) -> Decimal:
    """Convert an int, float, decimal string or Decimal to a finite Decimal."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{field} must be a number, got {value!r}")
    try:
        if isinstance(value, Decimal):
            result = value
        elif isinstance(value, int):
            result = Decimal(value)
        elif isinstance(value, float):
            # str() gives the shortest repr, so 0.15 becomes exactly 0.15.
            result = Decimal(str(value))
        elif isinstance(value, str):
            result = Decimal(value.strip())
        else:
            raise ValueError(f"{field} must be a number, got {value!r}")
    except InvalidOperation:
        raise ValueError(f"{field} must be a decimal number, got {value!r}") from None
    if not result.is_finite():
        raise ValueError(f"{field} must be finite, got {value!r}")
    return result


def _non_negative(value: Any, field: str) -> Decimal:
    result = _decimal(value, field)
    if result < 0:
        raise ValueError(f"{field} must not be negative, got {value!r}")
    return result


def _positive(value: Any, field: str) -> Decimal:
    result = _decimal(value, field)
    if result <= 0:
        raise ValueError(f"{field} must be positive, got {value!r}")
    return result


def _round_micros(value: Decimal) -> int:
    """Round a Decimal amount of micros half-even to an int."""
    with localcontext(_CONTEXT):
        return int(value.quantize(_ONE, rounding=ROUND_HALF_EVEN))


def to_micros(amount: float | str | Decimal) -> int:
    """Convert a decimal currency amount (e.g. ``"4.096575"``) to int micros, half-even."""
    with localcontext(_CONTEXT):
        return _round_micros(_decimal(amount, "amount") * _MICROS)


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in; nested mappings merge, other values replace."""
    merged: dict[str, Any] = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = _deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"price catalog {source}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"price catalog {source}: top level must be a mapping")
    return dict(data)


# --------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class DevicePrice:
    """Price of one device class: micros per device-hour and board power in watts."""

    device_class: str
    micros_per_hour: int
    watts: float

    def __post_init__(self) -> None:
        if not isinstance(self.micros_per_hour, int) or isinstance(self.micros_per_hour, bool):
            raise ValueError(f"devices.{self.device_class}.micros_per_hour must be an int")
        if self.micros_per_hour < 0:
            raise ValueError(f"devices.{self.device_class}.usd_per_hour must not be negative")
        if not math.isfinite(self.watts) or self.watts < 0:
            raise ValueError(f"devices.{self.device_class}.watts must be a finite, non-negative number")


@dataclass(frozen=True)
class PriceCatalog:
    """Device class -> price per hour and watts, plus the electricity price per kWh."""

    currency: str
    electricity_micros_per_kwh: int
    devices: Mapping[str, DevicePrice]

    def __post_init__(self) -> None:
        if not isinstance(self.currency, str) or not self.currency.strip():
            raise ValueError("currency must be a non-empty string")
        if self.electricity_micros_per_kwh < 0:
            raise ValueError("electricity_usd_per_kwh must not be negative")
        # Freeze the mapping so a shared catalog cannot be mutated.
        object.__setattr__(self, "devices", MappingProxyType(dict(self.devices)))

    @property
    def device_classes(self) -> list[str]:
        """Known device classes, sorted."""
        return sorted(self.devices)

    def device(self, name: str) -> DevicePrice:
        """Return the price of ``name``; raise :class:`UnknownDeviceClass` listing known classes."""
        try:
            return self.devices[name]
        except (KeyError, TypeError):
            raise UnknownDeviceClass(str(name), list(self.devices)) from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<mapping>") -> PriceCatalog:
        """Build a catalog from a YAML-shaped mapping; ValueError names any bad or missing field."""
        prefix = f"price catalog {source}: "
        try:
            unknown = sorted(set(data) - set(_TOP_LEVEL_FIELDS))
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(map(str, unknown))}")
            for field in _TOP_LEVEL_FIELDS:
                if field not in data or data[field] is None:
                    raise ValueError(f"missing field {field}")
            currency = data["currency"]
            if not isinstance(currency, str) or not currency.strip():
                raise ValueError(f"currency must be a non-empty string, got {currency!r}")
            with localcontext(_CONTEXT):
                electricity = _round_micros(
                    _non_negative(data["electricity_usd_per_kwh"], "electricity_usd_per_kwh") * _MICROS
                )
            raw_devices = data["devices"]
            if not isinstance(raw_devices, Mapping) or not raw_devices:
                raise ValueError(
                    "devices must be a non-empty mapping of device class -> {usd_per_hour, watts}"
                )
            devices: dict[str, DevicePrice] = {}
            for name, entry in raw_devices.items():
                key = str(name)
                where = f"devices.{key}"
                if not isinstance(entry, Mapping):
                    raise ValueError(f"{where} must be a mapping with usd_per_hour and watts")
                extra = sorted(set(map(str, entry)) - set(_DEVICE_FIELDS))
                if extra:
                    raise ValueError(f"{where}: unknown field(s) {', '.join(extra)}")
                for field in _DEVICE_FIELDS:
                    if field not in entry or entry[field] is None:
                        raise ValueError(f"missing field {where}.{field}")
                with localcontext(_CONTEXT):
                    micros = _round_micros(
                        _non_negative(entry["usd_per_hour"], f"{where}.usd_per_hour") * _MICROS
                    )
                watts = float(_non_negative(entry["watts"], f"{where}.watts"))
                devices[key] = DevicePrice(device_class=key, micros_per_hour=micros, watts=watts)
        except ValueError as exc:
            raise ValueError(prefix + str(exc)) from None
        return cls(currency=currency.strip(), electricity_micros_per_kwh=electricity, devices=devices)

    @classmethod
    def load(cls, path: str | None = None, overrides: dict[str, Any] | None = None) -> PriceCatalog:
        """Load the packaged defaults, deep-merge a YAML file over them, then ``overrides``.

        The file is ``path`` if given, else the one named by ``$MARGIN_PRICE_CATALOG``
        (if set and non-empty). A named file that does not exist raises
        FileNotFoundError; invalid content raises ValueError naming the field.
        """
        default_text = resources.files(_DEFAULT_PACKAGE).joinpath(_DEFAULT_RESOURCE).read_text("utf-8")
        data = _read_yaml(default_text, f"{_DEFAULT_PACKAGE}/{_DEFAULT_RESOURCE}")
        sources = [f"{_DEFAULT_PACKAGE}/{_DEFAULT_RESOURCE}"]
        file_path = path if path else (os.environ.get(CATALOG_ENV_VAR) or "").strip() or None
        if file_path:
            with open(file_path, encoding="utf-8") as fh:
                data = _deep_merge(data, _read_yaml(fh.read(), file_path))
            sources.append(file_path)
        if overrides:
            if not isinstance(overrides, Mapping):
                raise ValueError("price catalog overrides must be a mapping")
            data = _deep_merge(data, overrides)
            sources.append("<overrides>")
        return cls.from_mapping(data, source=" + ".join(sources))


# --------------------------------------------------------------------------- run cost


@dataclass(frozen=True)
class RunCost:
    """Cost of a run: ``total_micros = compute_micros + energy_micros``.

    ``device_hours`` is P (hours x devices); ``energy_kwh`` is E.
    """

    device_class: str
    device_hours: float
    energy_kwh: float
    compute_micros: int
    energy_micros: int
    total_micros: int


@dataclass(frozen=True)
class CostRange:
    """A pre-run estimate: low / expected / high run costs."""

    low: RunCost
    expected: RunCost
    high: RunCost


def _run_cost(catalog: PriceCatalog, device_class: str, hours: Decimal, devices: int) -> RunCost:
    price = catalog.device(device_class)
    with localcontext(_CONTEXT):
        p = hours * devices
        energy_kwh = _decimal(price.watts, "watts") * p / 1000
        compute = _round_micros(Decimal(price.micros_per_hour) * p)
        energy = _round_micros(Decimal(catalog.electricity_micros_per_kwh) * energy_kwh)
    return RunCost(
        device_class=device_class,
        device_hours=float(p),
        energy_kwh=float(energy_kwh),
        compute_micros=compute,
        energy_micros=energy,
        total_micros=compute + energy,
    )


def _check_devices(devices: int) -> int:
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
    return devices


def run_cost(catalog: PriceCatalog, device_class: str, device_hours: float, devices: int = 1) -> RunCost:
    """C = Cp*P + Ce*E with P = device_hours*devices and E = watts*P/1000 kWh."""
    hours = _non_negative(device_hours, "device_hours")
    return _run_cost(catalog, device_class, hours, _check_devices(devices))


def estimate_range(
    catalog: PriceCatalog,
    device_class: str,
    expected_device_hours: float,
    low_factor: float = 0.7,
    high_factor: float = 1.5,
    devices: int = 1,
) -> CostRange:
    """Run costs at expected_device_hours scaled by low_factor, 1 and high_factor.

    Requires 0 < low_factor <= 1 <= high_factor.
    """
    hours = _non_negative(expected_device_hours, "expected_device_hours")
    low = _decimal(low_factor, "low_factor")
    high = _decimal(high_factor, "high_factor")
    if not (0 < low <= 1):
        raise ValueError(f"low_factor must satisfy 0 < low_factor <= 1, got {low_factor!r}")
    if high < 1:
        raise ValueError(f"high_factor must be >= 1, got {high_factor!r}")
    n = _check_devices(devices)
    with localcontext(_CONTEXT):
        return CostRange(
            low=_run_cost(catalog, device_class, hours * low, n),
            expected=_run_cost(catalog, device_class, hours, n),
            high=_run_cost(catalog, device_class, hours * high, n),
        )


# --------------------------------------------------------------------------- ratios


def compression_ratio(original_bytes: int, compressed_bytes: int) -> float:
    """R = V_original / V_compressed (serialized bytes); both sizes must be positive."""
    _positive(original_bytes, "original_bytes")
    _positive(compressed_bytes, "compressed_bytes")
    return original_bytes / compressed_bytes


def distributed_efficiency(t_single_s: float, t_distributed_s: float, world_size: int) -> tuple[float, float]:
    """Return (eta, eta / N) with eta = T_single / T_distributed and N = world_size."""
    _positive(t_single_s, "t_single_s")
    _positive(t_distributed_s, "t_distributed_s")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    eta = t_single_s / t_distributed_s
    return eta, eta / world_size


# --------------------------------------------------------------------------- serving


def _check_micros(value: int, field: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an int number of micros, got {value!r}")
    if value < 0:
        raise ValueError(f"{field} must not be negative, got {value!r}")
    return Decimal(value)


def cost_per_million_micros(replica_micros_per_hour: int, requests_per_second: float) -> int:
    """Micros per million requests = price/hour / (rps * 3600) * 10^6, half-even; rps > 0."""
    price = _check_micros(replica_micros_per_hour, "replica_micros_per_hour")
    rps = _positive(requests_per_second, "requests_per_second")
    with localcontext(_CONTEXT):
        return _round_micros(price / (rps * _SECONDS_PER_HOUR) * 1_000_000)


def request_cost_micros(replica_micros_per_hour: int, compute_seconds: float) -> int:
    """A request's share of the replica: price/hour * compute_seconds / 3600, half-even."""
    price = _check_micros(replica_micros_per_hour, "replica_micros_per_hour")
    seconds = _non_negative(compute_seconds, "compute_seconds")
    with localcontext(_CONTEXT):
        return _round_micros(price * seconds / _SECONDS_PER_HOUR)


# --------------------------------------------------------------------------- display

_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£"}


def format_money(micros: int, currency: str = "USD") -> str:
    """Format micros for people.

    Amounts of at least 1 unit show 2 decimals (half-even) with thousands
    separators: ``$12.35``, ``$1,234.57``. Smaller amounts show up to all 6
    decimals, trailing zeros trimmed to 2, so sub-cent costs stay visible:
    ``$0.001234``, ``$0.50``, ``$0.00``. Negative amounts get a leading ``-``.
    Currencies without a known symbol are suffixed: ``0.50 CHF``.
    """
    if isinstance(micros, bool) or not isinstance(micros, int):
        raise ValueError(f"micros must be an int, got {micros!r}")
    sign = "-" if micros < 0 else ""
    magnitude = abs(micros)
    with localcontext(_CONTEXT):
        amount = Decimal(magnitude) / _MICROS
        if magnitude >= MICROS_PER_UNIT:
            text = f"{amount.quantize(Decimal('0.01'), rounding=ROUND_HALF_EVEN):,f}"
        else:
            text = f"{amount.quantize(Decimal('0.000001')):f}".rstrip("0")
            whole, _, frac = text.partition(".")
            text = f"{whole}.{frac.ljust(2, '0')}"
    code = currency.upper()
    symbol = _SYMBOLS.get(code)
    if symbol is not None:
        return f"{sign}{symbol}{text}"
    return f"{sign}{text} {code}"
