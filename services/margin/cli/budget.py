"""``margin budget set|show`` and ``margin spend``: a tenant's budget, what it has spent this period and where.

:func:`spend_table` (spend by category with a bar towards each limit) is what ``budget show`` prints and what the
demo ends with. :mod:`margin.cli.main` adds ``budget_app`` and the ``spend`` command.
"""
from __future__ import annotations

from functools import partial

import typer
from rich.table import Table

from margin.cli import render
from margin.cli.context import connection
from margin.cli.jobs import budget_micros
from margin.cli.shared import KeyOpt, console, grpc_errors
from margin.common.costs import format_money
from margin.sdk.pages import all_pages
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2

budget_app = typer.Typer(help="Tenant budgets: set one, show spend against it.", no_args_is_help=True)
BudgetOpt = typer.Option(None, "--budget-service", help="budget service address (default: the local cluster's)")
TenantOpt = typer.Option("", "--tenant", help="the tenant (admin key only; a tenant key acts on its own)")
PERIODS = {"daily": budget_pb2.BUDGET_PERIOD_DAILY, "monthly": budget_pb2.BUDGET_PERIOD_MONTHLY}
POLICIES = {"reject": budget_pb2.EXHAUSTED_POLICY_REJECT, "degrade": budget_pb2.EXHAUSTED_POLICY_DEGRADE,
            "throttle": budget_pb2.EXHAUSTED_POLICY_THROTTLE}
CATEGORIES = {"training": budget_pb2.SPEND_CATEGORY_TRAINING, "compression": budget_pb2.SPEND_CATEGORY_COMPRESSION,
              "serving": budget_pb2.SPEND_CATEGORY_SERVING}
BAR_WIDTH = 24


def budgets(address: str | None, key: str | None) -> tuple[budget_pb2_grpc.BudgetsStub, tuple]:
    conn = connection("budget", address, key)
    return budget_pb2_grpc.BudgetsStub(conn.channel), conn.metadata


def bar(spent: int, limit: int) -> str:
    """``█████░░░░ 52%`` towards ``limit``; red past it."""
    if limit <= 0:
        return "—"
    share = spent / limit
    filled = min(BAR_WIDTH, round(share * BAR_WIDTH))
    color = "red" if share >= 1 else "yellow" if share >= 0.8 else "green"
    return f"[{color}]{'█' * filled}[/]{'░' * (BAR_WIDTH - filled)} {share:.0%}"


def spend_table(report: budget_pb2.SpendReport) -> Table:
    """Spend this period by category, each with its limit and a bar towards it, then the total."""
    b = report.budget
    has_budget = b.HasField("total")
    period = (f" ({budget_pb2.BudgetPeriod.Name(b.period).removeprefix('BUDGET_PERIOD_').lower()} budget "
              f"{render.money(b.total)})" if has_budget else " (no budget set)")
    table = Table(title=f"Spend of {b.tenant or 'this tenant'} this period{period}")
    for col, justify in (("category", "left"), ("spent", "right"), ("entries", "right"), ("limit", "right"),
                         ("towards the limit", "left")):
        table.add_column(col, justify=justify)
    lines = {line.key: line for line in report.by_category}
    limits = {budget_pb2.SpendCategory.Name(c.category).removeprefix("SPEND_CATEGORY_").lower(): c.limit.micros
              for c in b.category_limits}
    for name in CATEGORIES:
        line = lines.get(name)
        spent = line.amount.micros if line else 0
        limit = limits.get(name, b.total.micros if has_budget else 0)
        table.add_row(name, format_money(spent), str(line.entries if line else 0),
                      format_money(limit) if limit else "—", bar(spent, limit))
    total = report.spent.micros
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{format_money(total)}[/]", str(sum(x.entries for x in lines.values())),
                  render.money(b.total) if has_budget else "—", bar(total, b.total.micros) if has_budget else "—")
    notes = []
    if has_budget:
        notes.append(f"remaining {render.money(report.remaining)}; projected end of period "
                     f"{render.money(report.projected_end_of_period)}")
    if report.burn_per_hour.micros:
        notes.append(f"serving burns {render.money(report.burn_per_hour)} per hour now, idle replicas included")
    if notes:
        table.caption = "; ".join(notes)
    return table


def breakdown_table(title: str, lines) -> Table:
    table = Table(title=title)
    for col, justify in (("name", "left"), ("category", "left"), ("spent", "right"), ("entries", "right")):
        table.add_column(col, justify=justify)
    for line in lines:
        table.add_row(line.key, budget_pb2.SpendCategory.Name(line.category).removeprefix("SPEND_CATEGORY_").lower(),
                      render.money(line.amount), str(line.entries))
    return table


def ledger_total(stub: budget_pb2_grpc.BudgetsStub, metadata: tuple) -> tuple[int, int]:
    """(micros, entries) of the caller's tenant's spend entries this period (its revenue entries are income, not
    spend), read page by page."""
    report = stub.GetSpend(budget_pb2.GetSpendRequest(), metadata=metadata)
    request = budget_pb2.ListLedgerRequest(page_size=1000)
    if report.budget.HasField("period_start"):
        request.since.CopyFrom(report.budget.period_start)
        request.until.CopyFrom(report.budget.period_end)
    entries = [e for e in all_pages(partial(stub.ListLedger, metadata=metadata), request, "entries")
               if e.category in CATEGORIES.values()]
    return sum(e.amount.micros for e in entries), len(entries)


@budget_app.command("set")
@grpc_errors
def budget_set(total: str = typer.Option(..., "--total", help="dollars per period, e.g. 25"),
               period: str = typer.Option("monthly", "--period", help="|".join(PERIODS)),
               training: str | None = typer.Option(None, "--training", help="limit for training, dollars"),
               compression: str | None = typer.Option(None, "--compression", help="limit for compression, dollars"),
               serving: str | None = typer.Option(None, "--serving", help="limit for serving, dollars"),
               policy: str = typer.Option("reject", "--policy", help="when serving's budget is exhausted: "
                                                                    + "|".join(POLICIES)),
               alert: list[float] = typer.Option([], "--alert", help="alert threshold (fraction); may repeat "
                                                                     "(default 0.5, 0.8, 1)"),
               webhook: str = typer.Option("", "--webhook", help="POST alerts here, signed with HMAC-SHA256"),
               webhook_secret: str = typer.Option("", "--webhook-secret", envvar="MARGIN_WEBHOOK_SECRET"),
               tenant: str = TenantOpt, budget_addr: str = BudgetOpt, api_key: str = KeyOpt) -> None:
    """Set the tenant's budget for each period, with optional limits per category."""
    if period not in PERIODS:
        raise typer.BadParameter(f"{period!r}: use {' or '.join(PERIODS)}", param_hint="--period")
    if policy not in POLICIES:
        raise typer.BadParameter(f"{policy!r}: use one of {', '.join(POLICIES)}", param_hint="--policy")
    limits = [budget_pb2.CategoryLimit(category=CATEGORIES[name], limit=common_pb2.Money(micros=budget_micros(v)))
              for name, v in (("training", training), ("compression", compression), ("serving", serving))
              if v is not None]
    stub, md = budgets(budget_addr, api_key)
    budget = stub.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
        tenant=tenant, period=PERIODS[period], total=common_pb2.Money(micros=budget_micros(total)),
        category_limits=limits, exhausted_policy=POLICIES[policy], alert_thresholds=alert, webhook_url=webhook),
        webhook_secret=webhook_secret), metadata=md)
    console.print(f"budget for [bold]{budget.tenant}[/]: {render.money(budget.total)} {period}, alerts at "
                  f"{', '.join(f'{t:.0%}' for t in budget.alert_thresholds)}")
    console.print(spend_table(stub.GetSpend(budget_pb2.GetSpendRequest(tenant=tenant), metadata=md)))


@budget_app.command("show")
@grpc_errors
def budget_show(tenant: str = TenantOpt, budget_addr: str = BudgetOpt, api_key: str = KeyOpt) -> None:
    """Spend this period by category against the budget and its limits."""
    stub, md = budgets(budget_addr, api_key)
    console.print(spend_table(stub.GetSpend(budget_pb2.GetSpendRequest(tenant=tenant), metadata=md)))


@grpc_errors
def spend(tenant: str = TenantOpt, budget_addr: str = BudgetOpt, api_key: str = KeyOpt) -> None:
    """Where this period's money went: by category, by model and by deployment."""
    stub, md = budgets(budget_addr, api_key)
    report = stub.GetSpend(budget_pb2.GetSpendRequest(tenant=tenant), metadata=md)
    console.print(spend_table(report))
    console.print(breakdown_table("By model", report.by_model))
    console.print(breakdown_table("By deployment", report.by_deployment))


def plan_table(plan: budget_pb2.ScalingPlan) -> Table:
    """The autoscaler's decision for one deployment: demand, what the budget affords, what it chose, and why."""
    table = Table(title=f"Scaling plan for {plan.deployment} ({plan.target_kind})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    affordable = "no serving budget" if plan.affordable_replicas < 0 else str(plan.affordable_replicas)
    remaining = render.money(plan.remaining_serving_budget) if plan.HasField("remaining_serving_budget") else "—"
    for name, value in (
            ("traffic", f"{plan.observed_rps:.1f} req/s; queue {plan.queue_time_us_per_request:.0f} µs per request"),
            ("capacity", f"{plan.capacity_rps_per_replica:,.0f} req/s per replica (measured at deploy)"),
            ("replica price", f"{render.money(plan.price_per_replica_hour)} per hour"),
            ("serving budget left", f"{remaining} for {plan.hours_left_in_period:.1f} h"),
            ("replicas", f"now {plan.current_replicas} · demand {plan.demand_replicas} · minimum "
                         f"{plan.min_replicas} · affordable {affordable} → [bold]{plan.chosen_replicas}[/]"),
            ("reason", plan.reason),
            ("applied", "yes" if plan.applied else "no (report-only: no Kubernetes here)"
             if plan.target_kind == "report-only" else "no change")):
        table.add_row(name, value)
    return table


@grpc_errors
def scaling_plan(deployment: str = typer.Argument(..., help="a serving deployment, e.g. digits-v2"),
                 budget_addr: str = BudgetOpt, api_key: str = KeyOpt) -> None:
    """The cost-budget autoscaler's plan for DEPLOYMENT: demand, affordable replicas, the choice and its reason."""
    stub, md = budgets(budget_addr, api_key)
    console.print(plan_table(stub.GetScalingPlan(budget_pb2.GetScalingPlanRequest(deployment=deployment),
                                                 metadata=md)))
