"""Declarative tenant budgets: a YAML file (``MARGIN_BUDGETS_FILE``; the Helm chart renders it from its ``tenants``
values) applied when the budget service starts. Free of gRPC.

The file is a list of tenants::

    - name: acme            # tenant name (the rules of CreateTenant)
      period: monthly       # daily | monthly
      currency: USD         # optional, default USD
      total: "3000"         # decimal string or number, in currency units
      limits: {training: "1000", compression: "200", serving: "1500"}   # optional, each optional
      policy: degrade       # reject | degrade | throttle, optional (default reject, as SetBudget's)
      thresholds: [0.5, 0.8, 1.0]   # optional (default 0.5, 0.8, 1.0, as SetBudget's)

Each tenant is created when missing and its budget set: the file owns every field it can express; a webhook set
through SetBudget is kept (the file has no webhook fields — its secret does not belong in a ConfigMap). Amounts
convert to integer micros exactly (:class:`~decimal.Decimal`; YAML numbers are read as decimals, never floats;
more than 6 decimal places is an error, not a rounding). Budgets go through the same validation as SetBudget
(:func:`margin.budget.store.validate`, which :meth:`BudgetStore.set_budget` applies) and names through
CreateTenant's (:func:`margin.common.names.validate_name`).

The whole file is parsed and validated before anything is written, so a malformed file changes nothing: it is a
:class:`~margin.common.config.ConfigError` naming the file and the entry (its number, line and tenant), and the
service refuses to start. Applying the same file again writes nothing (a budget already equal is not rewritten).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from decimal import Decimal, Inexact, InvalidOperation, localcontext
from pathlib import Path
from typing import Any

import yaml

from margin.budget.store import DEFAULT_THRESHOLDS, Budget, BudgetStore, validate
from margin.common.config import ConfigError
from margin.common.errors import AlreadyExists, MarginError, NotFound
from margin.common.names import validate_name
from margin.common.tenancy import Tenant, TenantStore

log = logging.getLogger(__name__)

FIELDS = ("name", "period", "currency", "total", "limits", "policy", "thresholds")
REQUIRED = ("name", "period", "total")
MICROS_PER_UNIT = 1_000_000
MAX_MICROS = 2**63 - 1  # the budgets table's BIGINT, and Money.micros' int64


class _Invalid(ValueError):
    """One entry's problem; :func:`parse` adds the file and the entry."""


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that reads floats as :class:`Decimal` (no binary rounding of money) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # an unhashable key: the base constructor reports it
                if duplicate:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _decimal_float(loader: _StrictLoader, node: yaml.ScalarNode) -> Decimal | float:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        return Decimal(text)
    except InvalidOperation:  # .inf, .nan, sexagesimal 1:30.5: not amounts; rejected where a number is wanted
        return loader.construct_yaml_float(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:float", _decimal_float)


@dataclass(frozen=True)
class TenantBudget:
    """One entry of the file: the tenant's name and its budget (``tenant_id`` 0 until applied)."""

    name: str
    budget: Budget
    line: int = 0


@dataclass(frozen=True)
class Applied:
    created: tuple[str, ...]   # tenants created
    updated: tuple[str, ...]   # budgets set (new or changed)
    unchanged: tuple[str, ...]  # budgets already as in the file


def _shown(value: Any) -> str:
    return str(value) if isinstance(value, Decimal | int) else repr(value)


def to_micros(value: Any, what: str) -> int:
    """A decimal amount in currency units (an int, a Decimal or a decimal string) as integer micros, exactly."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise _Invalid(f"{what} must be a decimal amount (a number or a string like \"12.50\"), got {value!r}")
    try:
        amount = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise _Invalid(f"{what} must be a decimal amount, got {value!r}") from None
    if not amount.is_finite():
        raise _Invalid(f"{what} must be a finite amount, got {value!r}")
    with localcontext() as ctx:
        ctx.prec, ctx.traps[Inexact] = 200, True
        try:
            micros = amount * MICROS_PER_UNIT
        except Inexact:
            micros = Decimal("0.5")  # more digits than anyone means: reported as too precise below
    if micros != micros.to_integral_value():
        raise _Invalid(f"{what} {_shown(value)} has more than 6 decimal places: amounts are whole micros")
    if abs(micros) > MAX_MICROS:
        raise _Invalid(f"{what} {_shown(value)} is too large")
    return int(micros)


def _threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | float):
        raise _Invalid(f"thresholds must be numbers (fractions of the total, e.g. 0.8), got {value!r}")
    return float(value)


def _entry(item: Any) -> TenantBudget:
    if not isinstance(item, dict):
        raise _Invalid(f"each entry must be a mapping with {list(REQUIRED)} and optional "
                       f"{[f for f in FIELDS if f not in REQUIRED]}, got {type(item).__name__} {item!r}")
    unknown = [str(k) for k in item if k not in FIELDS]
    if unknown:
        raise _Invalid(f"unknown key(s) {unknown}; known: {list(FIELDS)}")
    missing = [k for k in REQUIRED if item.get(k) is None]
    if missing:
        raise _Invalid(f"missing {missing}")
    name = item["name"]
    if not isinstance(name, str):
        raise _Invalid(f"name must be a string, got {name!r}")
    currency = item.get("currency")
    if currency is None:
        currency = "USD"
    elif not isinstance(currency, str):
        raise _Invalid(f"currency must be a string like USD, got {currency!r}")
    limits = item.get("limits")
    if limits is None:
        limits = {}
    elif not isinstance(limits, dict):
        raise _Invalid(f"limits must be a mapping of spend category to amount, got {limits!r}")
    thresholds = item.get("thresholds")
    if thresholds is None:
        thresholds = []
    elif not isinstance(thresholds, list):
        raise _Invalid(f"thresholds must be a list of fractions of the total, got {thresholds!r}")
    policy = item.get("policy")
    budget = Budget(
        tenant_id=0, period=item["period"], total_micros=to_micros(item["total"], "total"),
        category_limits={str(c): to_micros(v, f"limits.{c}") for c, v in limits.items()},
        policy="reject" if policy is None else policy,
        thresholds=tuple(sorted(_threshold(t) for t in thresholds)) or DEFAULT_THRESHOLDS, currency=currency)
    try:  # the rules of CreateTenant and SetBudget, the same functions
        validate_name(name, "tenant name")
        validate(budget)
    except MarginError as err:
        raise _Invalid(str(err)) from None
    return TenantBudget(name, budget)


def parse(text: str, source: str) -> list[TenantBudget]:
    """The entries of a budgets file's ``text``; :class:`ConfigError` naming ``source`` and the entry if malformed."""
    loader = _StrictLoader(text)
    loader.name = source  # YAML errors point at the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        raise ConfigError(f"budgets file {source}: not valid YAML: {err}") from None
    finally:
        loader.dispose()
    if not isinstance(data, list):
        shown = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"budgets file {source}: expected a YAML list of tenants (write [] for none), "
                          f"but the file is {shown}")
    lines = [item.start_mark.line + 1 for item in node.value]
    entries: list[TenantBudget] = []
    first_line: dict[str, int] = {}
    for index, (item, line) in enumerate(zip(data, lines, strict=True), start=1):
        name = item.get("name") if isinstance(item, dict) else None
        where = f"budgets file {source}: entry {index} (line {line}" + \
                (f", tenant {name!r})" if isinstance(name, str) and name else ")")
        try:
            entry = replace(_entry(item), line=line)
        except _Invalid as err:
            raise ConfigError(f"{where}: {err}") from None
        if entry.name in first_line:
            raise ConfigError(f"{where}: tenant {entry.name!r} is listed twice (first at line "
                              f"{first_line[entry.name]})")
        first_line[entry.name] = line
        entries.append(entry)
    return entries


def load(path: str | Path) -> list[TenantBudget]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"budgets file {path}: cannot read it: {err}") from None
    return parse(text, str(path))


def _tenant(tenants: TenantStore, name: str) -> tuple[Tenant, bool]:
    """The tenant, created (as CreateTenant does) when missing; True when this call created it."""
    try:
        return tenants.get_tenant(name), False
    except NotFound:
        pass
    try:
        return tenants.create_tenant(name), True
    except AlreadyExists:  # another replica of the budget service created it just now
        return tenants.get_tenant(name), False


def apply(entries: list[TenantBudget], tenants: TenantStore, budgets: BudgetStore, source: str = "") -> Applied:
    """Create the missing tenants and set the budgets that differ from the entries; idempotent."""
    created, updated, unchanged = [], [], []
    for index, entry in enumerate(entries, start=1):
        try:
            tenant, new = _tenant(tenants, entry.name)
            if new:
                created.append(entry.name)
            current = budgets.get_budget(tenant.id)
            wanted = replace(entry.budget, tenant_id=tenant.id,
                             webhook_url=current.webhook_url if current else "",
                             webhook_secret=current.webhook_secret if current else "")
            if current == wanted:
                unchanged.append(entry.name)
                continue
            budgets.set_budget(wanted)
            updated.append(entry.name)
        except MarginError as err:
            raise ConfigError(f"budgets file {source}: entry {index} (line {entry.line}, tenant {entry.name!r}): "
                              f"{err}") from None
    return Applied(tuple(created), tuple(updated), tuple(unchanged))


def apply_file(path: str | Path, tenants: TenantStore, budgets: BudgetStore) -> Applied:
    """Parse and validate the whole file, then apply it (see the module docstring)."""
    result = apply(load(path), tenants, budgets, str(path))
    log.info("budgets file %s: %d tenant(s) created, %d budget(s) set, %d unchanged", path, len(result.created),
             len(result.updated), len(result.unchanged))
    return result
