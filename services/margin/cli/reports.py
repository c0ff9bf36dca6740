"""``margin report fleet|margin`` and ``margin prices set|show|remove``: what the fleet cost the platform, where every
micro of it went, and revenue against allocated cost.

The render functions are what the commands print and what the demo reuses:

- :func:`fleet_table` — each pool's replica-seconds, price, bill, allocated, idle and utilization, then the totals;
- :func:`reconciliation_line` — ``fleet $X (replica-seconds × price) = tenants $Y + platform idle $Z — equal to the
  micro`` (rich markup; ``NOT equal`` in red when the ledger does not balance);
- :func:`margin_table` — requests, revenue, allocated cost and gross margin per tenant and model, the totals and, in
  the admin's view, the platform's idle line;
- :func:`margin_png` — cumulative allocated cost against cumulative revenue over the window, as a PNG.

Keys: ``report fleet`` and ``prices`` are the operator's (the admin key: ``--api-key``, else ``$MARGIN_ADMIN_KEY``,
else the local cluster's); ``report margin`` shows the caller's own tenant with its key, and ``--tenant NAME`` or
``--all`` (every tenant plus the platform's idle line) with the admin key.
"""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

import grpc
import typer
from rich.markup import escape
from rich.table import Table

from margin.cli.context import admin_connection, connection
from margin.cli.shared import console, grpc_errors
from margin.common import protoconv
from margin.common.costs import format_money
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2

report_app = typer.Typer(help="Reports across the fleet: the bill and where it went, revenue and gross margin.",
                         no_args_is_help=True)
prices_app = typer.Typer(help="The revenue price list: what a tenant charges per request served (admin key).",
                         no_args_is_help=True)

BudgetOpt = typer.Option(None, "--budget-service", help="budget service address (default: the local cluster's)")
AdminKeyOpt = typer.Option(None, "--api-key", help="API key (default: the admin key — $MARGIN_ADMIN_KEY, else the "
                                                   "local cluster's)")
SinceOpt = typer.Option(None, "--since", help="start of the window: ISO 8601 (UTC unless it has an offset, e.g. "
                                              "2025-05-01 or 2025-05-01T12:00:00+02:00) or a time ago (30m, 24h, 7d); "
                                              "default: the start of this month (or of the tenant's budget period)")
UntilOpt = typer.Option(None, "--until", help="end of the window (exclusive), same forms as --since; default: now")
PriceTenantOpt = typer.Option("", "--tenant", help="the tenant's own list (default: the default list, for tenants "
                                                   "without their own)")

_AGO = re.compile(r"^(?P<amount>\d+(\.\d+)?)\s*(?P<unit>s|m|h|d|w)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
MICROS = 1_000_000
EVERY_MODEL = "(every model)"


def budgets(address: str | None, key: str | None, admin: bool) -> tuple[budget_pb2_grpc.BudgetsStub, tuple]:
    """A Budgets stub with the admin key (``admin``) or the caller's tenant key; ``key`` overrides either."""
    conn = admin_connection(address, key) if admin else connection("budget", address, key)
    return budget_pb2_grpc.BudgetsStub(conn.channel), conn.metadata


# -- money and time --------------------------------------------------------------------------------------------
def exact_money(micros: int, currency: str = "USD") -> str:
    """Every micro shown: ``$1,234.567891``, ``$0.50``, ``$0.001234`` (format_money rounds amounts of a dollar and
    more to the cent, which would hide a micro's difference in a reconciliation)."""
    if abs(micros) < MICROS:
        return format_money(micros, currency)
    text = f"{Decimal(abs(micros)) / MICROS:,.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return ("-" if micros < 0 else "") + format_money(0, currency).replace("0.00", f"{whole}.{frac.ljust(2, '0')}", 1)


def money(m: common_pb2.Money) -> str:
    return format_money(m.micros, m.currency or "USD")


def _exact(m: common_pb2.Money) -> str:
    return exact_money(m.micros, m.currency or "USD")


def _signed(m: common_pb2.Money) -> str:
    """A margin: red when negative."""
    return f"[red]{money(m)}[/]" if m.micros < 0 else money(m)


def parse_time(text: str, option: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (naive: UTC) or a time ago (``30m``, ``24h``, ``7d``) → an aware UTC datetime."""
    now = now or datetime.now(UTC)
    text = text.strip()
    ago = _AGO.match(text.lower())
    if ago:
        return now - timedelta(seconds=float(ago["amount"]) * _UNIT_SECONDS[ago["unit"]])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use ISO 8601 (2025-05-01, 2025-05-01T12:00:00Z) or a time ago "
                                 "(30m, 24h, 7d)", param_hint=option) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def spend_request(view: int, since: str | None, until: str | None, tenant: str = "") -> budget_pb2.GetSpendRequest:
    """A GetSpend request for ``view`` over the window given on the command line (the service's default without)."""
    now = datetime.now(UTC)
    start = parse_time(since, "--since", now) if since else None
    end = parse_time(until, "--until", now) if until else None
    if start and end and end <= start:
        raise typer.BadParameter(f"the window is empty: {end:%Y-%m-%d %H:%M:%S} is not after "
                                 f"{start:%Y-%m-%d %H:%M:%S} UTC", param_hint="--until")
    request = budget_pb2.GetSpendRequest(view=view, tenant=tenant)
    if start:
        request.since.CopyFrom(protoconv.timestamp(start))
    if end:
        request.until.CopyFrom(protoconv.timestamp(end))
    return request


def _utc(ts) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S") if ts.seconds or ts.nanos else "?"


def window_text(report: budget_pb2.SpendReport) -> str:
    return f"{_utc(report.window_start)} → {_utc(report.window_end)} UTC"


# -- the fleet -------------------------------------------------------------------------------------------------
FLEET_COLUMNS = (("pool", "left"), ("kind", "left"), ("device", "left"), ("replicas", "right"),
                 ("replica-s", "right"), ("price/h", "right"), ("bill", "right"), ("allocated", "right"),
                 ("idle", "right"), ("utilization", "right"))


def fleet_table(report: budget_pb2.SpendReport) -> Table:
    """Each pool over the window: live replicas (at its last interval), replica-seconds, the price of a replica-hour,
    the bill (replica-seconds × price), what was allocated (to tenants' deployments, or to the jobs that ran), the
    idle remainder and the utilization (Triton compute or job time / replica time); then the totals, from the
    ledger."""
    fleet = report.fleet
    table = Table(title=f"The fleet's bill, {window_text(report)}")
    for header, justify in FLEET_COLUMNS:
        table.add_column(header, justify=justify, no_wrap=justify == "right")
    for p in fleet.pools:
        table.add_row(escape(p.pool), p.kind, p.device_class, str(p.replicas), f"{p.replica_seconds:,.1f}",
                      money(p.price_per_hour), money(p.bill), money(p.allocated), money(p.idle),
                      f"{p.utilization:.1%}")
    if not fleet.pools:
        table.add_row("[dim]no metering intervals in the window[/]", *[""] * (len(FLEET_COLUMNS) - 1))
    replica_s = sum(p.replica_seconds for p in fleet.pools)
    used = sum(p.utilization * p.replica_seconds for p in fleet.pools)
    allocated = common_pb2.Money(micros=fleet.tenants.micros + fleet.jobs.micros, currency=fleet.bill.currency)
    table.add_section()
    table.add_row("[bold]total[/]", "", "", str(sum(p.replicas for p in fleet.pools)), f"{replica_s:,.1f}", "",
                  f"[bold]{money(fleet.bill)}[/]", money(allocated), money(fleet.platform_idle),
                  f"{used / replica_s:.1%}" if replica_s else "—")
    intervals = sum(p.intervals for p in fleet.pools)
    table.caption = (f"{intervals} metered pool intervals; idle policy {fleet.idle_policy or '?'}; allocated: to "
                     "deployments (serving) or jobs (worker)")
    return table


def tenants_table(fleet: budget_pb2.FleetView) -> Table:
    """Serving allocations per tenant, with each one's share of the bill."""
    table = Table(title="Serving allocations by tenant")
    for header, justify in (("tenant", "left"), ("allocated", "right"), ("entries", "right"),
                            ("share of the bill", "right")):
        table.add_column(header, justify=justify)
    for line in fleet.by_tenant:
        share = line.amount.micros / fleet.bill.micros if fleet.bill.micros else 0.0
        table.add_row(escape(line.key), money(line.amount), str(line.entries), f"{share:.1%}")
    return table


def reconciliation_line(fleet: budget_pb2.FleetView) -> str:
    """``fleet $X (replica-seconds × price) = tenants $Y + platform idle $Z — equal to the micro`` (rich markup).

    Tenants $Y is their serving allocations plus the worker time of their jobs (itemized when there was job time);
    every figure is shown to the micro. When the ledger does not balance the line ends ``NOT equal`` in red, with
    the difference."""
    currency = fleet.bill.currency or "USD"
    tenants = fleet.tenants.micros + fleet.jobs.micros
    detail = (f" (serving {exact_money(fleet.tenants.micros, currency)} + job time "
              f"{exact_money(fleet.jobs.micros, currency)})" if fleet.jobs.micros > 0 else "")
    if fleet.balanced:
        verdict = "[green]equal to the micro[/]"
    else:
        off = fleet.bill.micros - tenants - fleet.platform_idle.micros
        verdict = f"[bold red]NOT equal[/] [red](off by {exact_money(off, currency)})[/]"
    return (f"fleet {exact_money(fleet.bill.micros, currency)} (replica-seconds × price) = tenants "
            f"{exact_money(tenants, currency)}{detail} + platform idle "
            f"{exact_money(fleet.platform_idle.micros, currency)} — {verdict}")


# -- revenue and margin ----------------------------------------------------------------------------------------
MARGIN_COLUMNS = (("tenant", "left"), ("model", "left"), ("requests", "right"), ("revenue", "right"),
                  ("allocated cost", "right"), ("gross margin", "right"), ("margin %", "right"))


def _percent(margin: int, revenue: int) -> str:
    return f"{margin / revenue:.1%}" if revenue > 0 else "—"


def margin_table(report: budget_pb2.SpendReport) -> Table:
    """Per tenant and model: requests served through the gateway, revenue at the price list, allocated serving cost
    and gross margin (red when negative); the totals; and, in the admin's view of every tenant, the platform's idle
    line and the margin net of it."""
    view = report.margin
    table = Table(title=f"Revenue and gross margin, {window_text(report)}")
    for header, justify in MARGIN_COLUMNS:
        table.add_column(header, justify=justify, no_wrap=justify == "right")
    for line in view.lines:
        table.add_row(escape(line.tenant), escape(line.model) or "—", f"{line.requests:,}", money(line.revenue),
                      money(line.cost), _signed(line.gross_margin),
                      _percent(line.gross_margin.micros, line.revenue.micros))
    if not view.lines:
        table.add_row("[dim]nothing served in the window[/]", *[""] * (len(MARGIN_COLUMNS) - 1))
    table.add_section()
    table.add_row("[bold]total[/]", "", f"{sum(x.requests for x in view.lines):,}", f"[bold]{money(view.revenue)}[/]",
                  f"[bold]{money(view.cost)}[/]", f"[bold]{_signed(view.gross_margin)}[/]",
                  _percent(view.gross_margin.micros, view.revenue.micros))
    if view.HasField("platform_idle"):
        idle = view.platform_idle
        net = common_pb2.Money(micros=view.gross_margin.micros - idle.micros, currency=idle.currency)
        table.add_row("platform", "idle replicas (no tenant pays)", "", "", money(idle),
                      _signed(common_pb2.Money(micros=-idle.micros, currency=idle.currency)), "")
        table.add_row("[bold]net of idle[/]", "", "", "", money(common_pb2.Money(
            micros=view.cost.micros + idle.micros, currency=idle.currency)), f"[bold]{_signed(net)}[/]",
                      _percent(net.micros, view.revenue.micros))
    if not view.has_price_list:
        table.caption = ("[yellow]no price list is set, so revenue is $0.00 and the margin is the cost: "
                         "set one with `margin prices set`[/]")
    else:
        table.caption = "revenue: requests × price list; cost: allocated share of the pools' bill"
    return table


def _dollars(value: float, _position: int | None = None) -> str:
    """An axis tick in dollars, as precise as the tick: ``$0.0000175``."""
    text = f"{abs(value):.8f}".rstrip("0").rstrip(".")
    return f"{'-' if value < 0 and text != '0' else ''}${text}"


def _cumulative(report: budget_pb2.SpendReport) -> tuple[list[datetime], list[float], list[float]]:
    """(times, cumulative cost $, cumulative revenue $): the window's start at 0, then each bucket's end."""
    series = list(report.margin.series)
    start = report.window_start.ToDatetime(tzinfo=UTC)
    end = report.window_end.ToDatetime(tzinfo=UTC)
    starts = [p.time.ToDatetime(tzinfo=UTC) for p in series]
    times, cost, revenue = [starts[0] if starts else start], [0.0], [0.0]
    for i, point in enumerate(series):
        times.append(starts[i + 1] if i + 1 < len(starts) else max(end, starts[i]))
        cost.append(cost[-1] + point.cost.micros / MICROS)
        revenue.append(revenue[-1] + point.revenue.micros / MICROS)
    return times, cost, revenue


def margin_png(report: budget_pb2.SpendReport, path: Path) -> Path:
    """Save cumulative allocated cost against cumulative revenue over the window as a PNG (matplotlib, Agg): two
    lines, the margin between them shaded (green where revenue leads, red where cost does), the totals in the title.
    Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import dates as mdates
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter

    view = report.margin
    times, cost, revenue = _cumulative(report)
    tenants = sorted({line.tenant for line in view.lines})
    who = tenants[0] if len(tenants) == 1 and not view.HasField("platform_idle") else "all tenants"
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=100)
    try:
        ax.plot(times, revenue, color="tab:green", linewidth=2, label="cumulative revenue")
        ax.plot(times, cost, color="tab:red", linewidth=2, label="cumulative allocated cost")
        ahead = [r >= c for r, c in zip(revenue, cost, strict=True)]
        ax.fill_between(times, cost, revenue, where=ahead, interpolate=True, color="tab:green", alpha=0.2,
                        label="margin" if any(r > c for r, c in zip(revenue, cost, strict=True)) else None)
        ax.fill_between(times, cost, revenue, where=[not a for a in ahead], interpolate=True, color="tab:red",
                        alpha=0.2, label="loss" if not all(ahead) else None)
        if not view.has_price_list:
            ax.text(0.02, 0.95, "no price list set: revenue is $0", transform=ax.transAxes, va="top",
                    color="tab:red", fontsize=9)
        ax.yaxis.set_major_formatter(FuncFormatter(_dollars))
        span = (times[-1] - times[0]).total_seconds() if len(times) > 1 else 0
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if span < 3600 else "%m-%d %H:%M"))
        ax.tick_params(axis="x", labelrotation=25)
        ax.set_xlabel("time (UTC)")
        ax.set_ylabel("dollars, cumulative")
        idle = (f"; platform idle {format_money(view.platform_idle.micros)}" if view.HasField("platform_idle")
                else "")
        ax.set_title(f"{who}: revenue {format_money(view.revenue.micros)} − cost {format_money(view.cost.micros)} "
                     f"= gross margin {format_money(view.gross_margin.micros)}{idle}\n{window_text(report)}",
                     fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left" if view.has_price_list else "center left", fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


# -- commands: reports -----------------------------------------------------------------------------------------
@report_app.command("fleet")
@grpc_errors
def report_fleet(since: str | None = SinceOpt, until: str | None = UntilOpt, budget_addr: str = BudgetOpt,
                 api_key: str = AdminKeyOpt) -> None:
    """Every pool's bill (replica-seconds × price) and where each micro went; exit 1 unless it balances (admin key)."""
    stub, md = budgets(budget_addr, api_key, admin=True)
    report = stub.GetSpend(spend_request(budget_pb2.SPEND_VIEW_FLEET, since, until), metadata=md)
    console.print(fleet_table(report))
    if report.fleet.by_tenant:
        console.print(tenants_table(report.fleet))
    console.print(reconciliation_line(report.fleet))
    if not report.fleet.balanced:
        raise typer.Exit(1)


@report_app.command("margin")
@grpc_errors
def report_margin(tenant: str = typer.Option("", "--tenant", help="one tenant's lines, seen with the admin key"),
                  every: bool = typer.Option(False, "--all", help="every tenant, and the platform's idle line "
                                                                   "(the admin key)"),
                  since: str | None = SinceOpt, until: str | None = UntilOpt,
                  png: Path | None = typer.Option(None, "--png", help="also save cumulative cost against cumulative "
                                                                      "revenue over the window as a PNG here"),
                  budget_addr: str = BudgetOpt,
                  api_key: str = typer.Option(None, "--api-key", help="API key (default: your tenant's — "
                                              "$MARGIN_API_KEY, else the demo key; with --tenant or --all, the admin "
                                              "key)")) -> None:
    """Revenue, allocated cost and gross margin per model: yours, one tenant's (--tenant) or all, with idle (--all)."""
    if tenant and every:
        raise typer.BadParameter("give --tenant NAME or --all, not both", param_hint="--all")
    stub, md = budgets(budget_addr, api_key, admin=bool(tenant or every))
    report = stub.GetSpend(spend_request(budget_pb2.SPEND_VIEW_MARGIN, since, until, tenant), metadata=md)
    if every and not report.margin.HasField("platform_idle"):
        console.print("[red]error[/]: --all needs the admin key; this key sees only its own tenant")
        raise typer.Exit(1)
    console.print(margin_table(report))
    if png is not None:
        console.print(f"cost against revenue saved to {margin_png(report, png)}")


# -- commands: prices ------------------------------------------------------------------------------------------
def per_million_micros(per_million: str | None, per_request: str | None) -> int:
    """Micros per million requests from ``--per-million`` or ``--per-request`` dollars (exactly one)."""
    if (per_million is None) == (per_request is None):
        raise typer.BadParameter("give exactly one of --per-million or --per-request", param_hint="--per-million")
    option, text = ("--per-million", per_million) if per_million is not None else ("--per-request", per_request)
    try:
        dollars = Decimal(text.strip().removeprefix("$"))
    except InvalidOperation:
        raise typer.BadParameter(f"{text!r} is not an amount of dollars, e.g. 0.50", param_hint=option) from None
    if not dollars.is_finite() or dollars < 0:
        raise typer.BadParameter(f"{text!r}: a price is a dollar amount of 0 or more", param_hint=option)
    micros = dollars * MICROS * (1 if per_million is not None else 1_000_000)
    if micros != micros.to_integral_value():
        finest = "0.000001 per million" if per_million is not None else "0.000000000001 per request"
        raise typer.BadParameter(f"{text!r} is finer than a micro-dollar per million requests (the finest price is "
                                 f"${finest})", param_hint=option)
    return int(micros)


def per_request_text(micros_per_million: int) -> str:
    """The price of one request in dollars, every digit: ``$0.0000005``."""
    dollars = Decimal(micros_per_million) / (MICROS * 1_000_000)
    text = f"{dollars:.12f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def prices_table(price_list: budget_pb2.PriceList) -> Table:
    table = Table(title=f"Price list of {price_list.tenant}" if price_list.tenant
                  else "Default price list (tenants without their own)")
    for header, justify in (("model", "left"), ("per million requests", "right"), ("per request", "right")):
        table.add_column(header, justify=justify)
    for e in price_list.entries:
        micros = e.per_million.micros + e.per_request.micros * MICROS
        table.add_row(escape(e.model) or EVERY_MODEL, exact_money(micros, e.per_million.currency or "USD"),
                      per_request_text(micros))
    if not price_list.entries:
        table.add_row("[dim]no entries[/]", "", "")
    return table


def _show_prices(stub: budget_pb2_grpc.BudgetsStub, md: tuple, price_list: budget_pb2.PriceList) -> None:
    console.print(prices_table(price_list))
    if price_list.tenant and not price_list.entries:
        try:
            default = stub.GetPriceList(budget_pb2.GetPriceListRequest(), metadata=md)
        except grpc.RpcError:  # the default list is the operator's to read; the note is enough
            default = None
        console.print(f"{escape(price_list.tenant)} has no list of its own: the default list applies")
        if default is not None and not default.tenant and default.entries:  # a tenant key reads its own instead
            console.print(prices_table(default))
    elif price_list.entries and not any(not e.model for e in price_list.entries):
        console.print(f"models without an entry here earn no revenue (add one for every model: "
                      f"`margin prices set{' --tenant ' + price_list.tenant if price_list.tenant else ''} "
                      "--per-million …`)")
    elif not price_list.entries:
        console.print("no prices: served requests earn no revenue")


def _entries(price_list: budget_pb2.PriceList) -> list[budget_pb2.PriceListEntry]:
    return [budget_pb2.PriceListEntry(model=e.model, per_million=common_pb2.Money(
        micros=e.per_million.micros + e.per_request.micros * MICROS, currency=e.per_million.currency or "USD"))
        for e in price_list.entries]


@prices_app.command("set")
@grpc_errors
def prices_set(tenant: str = PriceTenantOpt,
               model: str = typer.Option("", "--model", help="the model priced (default: every model without its "
                                                             "own entry)"),
               per_million: str | None = typer.Option(None, "--per-million", help="dollars per million requests"),
               per_request: str | None = typer.Option(None, "--per-request", help="dollars per request"),
               budget_addr: str = BudgetOpt, api_key: str = AdminKeyOpt) -> None:
    """Price one model (or every model) in a tenant's list or the default list; the other entries stay."""
    micros = per_million_micros(per_million, per_request)
    stub, md = budgets(budget_addr, api_key, admin=True)
    current = stub.GetPriceList(budget_pb2.GetPriceListRequest(tenant=tenant), metadata=md)
    entries = [e for e in _entries(current) if e.model != model]
    entries.append(budget_pb2.PriceListEntry(model=model, per_million=common_pb2.Money(micros=micros, currency="USD")))
    saved = stub.SetPriceList(budget_pb2.SetPriceListRequest(price_list=budget_pb2.PriceList(
        tenant=tenant, entries=sorted(entries, key=lambda e: e.model))), metadata=md)
    console.print(f"{escape(model) or 'every model'}: {exact_money(micros)} per million requests "
                  f"({per_request_text(micros)} per request) for {escape(tenant) or 'tenants without their own list'}")
    _show_prices(stub, md, saved)


@prices_app.command("remove")
@grpc_errors
def prices_remove(tenant: str = PriceTenantOpt,
                  model: str = typer.Option("", "--model", help="the entry to remove (default: the every-model one)"),
                  budget_addr: str = BudgetOpt, api_key: str = AdminKeyOpt) -> None:
    """Remove one entry from a tenant's list or the default list; the other entries stay."""
    stub, md = budgets(budget_addr, api_key, admin=True)
    current = stub.GetPriceList(budget_pb2.GetPriceListRequest(tenant=tenant), metadata=md)
    entries = _entries(current)
    if not any(e.model == model for e in entries):
        console.print(f"[red]error[/]: the {'list of ' + escape(tenant) if tenant else 'default list'} has no entry "
                      f"for {escape(model) or EVERY_MODEL}")
        raise typer.Exit(1)
    saved = stub.SetPriceList(budget_pb2.SetPriceListRequest(price_list=budget_pb2.PriceList(
        tenant=tenant, entries=[e for e in entries if e.model != model])), metadata=md)
    _show_prices(stub, md, saved)


@prices_app.command("show")
@grpc_errors
def prices_show(tenant: str = PriceTenantOpt, budget_addr: str = BudgetOpt, api_key: str = AdminKeyOpt) -> None:
    """Show a tenant's price list, or the default one (with a tenant's key: its own)."""
    stub, md = budgets(budget_addr, api_key, admin=True)
    _show_prices(stub, md, stub.GetPriceList(budget_pb2.GetPriceListRequest(tenant=tenant), metadata=md))
