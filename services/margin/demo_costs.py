"""The demo's last word: the ledger equals the bill.

While the demo ran, the local cluster's Triton and Celery worker were billed every metering interval for the time
they were up (replica-seconds × the price of their device class) and every micro of it was allocated — to the
demo's deployments by Triton's own statistics, to its jobs by their busy time, the rest to the platform's idle line.
:func:`reconcile` waits for the interval under way to be billed, prints the fleet report and the reconciliation
line for the demo's window — ``fleet $X = tenants $Y + platform idle $Z — equal to the micro`` — and then the margin
report: what the demo tenant's served requests earned at its price list against what they cost (and a PNG of it).
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from margin.cli import reports
from margin.cluster.processes import LOCAL_FLEET_INTERVAL_S
from margin.common import costs, protoconv
from margin.common.tenancy import from_epoch
from margin.sdk import Connection
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2

PRICE_PER_REQUEST = "0.0005"  # what the demo tenant charges its customers per Predict (a batch of 32 digits)


class Unbalanced(RuntimeError):
    """The fleet's bill and its allocation differ: the promise the demo makes is broken."""


def set_prices(console: Console, admin: Connection, tenant: str, model: str) -> None:
    """The demo tenant's price list: ``model`` at :data:`PRICE_PER_REQUEST` a request."""
    stub = budget_pb2_grpc.BudgetsStub(admin.channel)
    stub.SetPriceList(budget_pb2.SetPriceListRequest(price_list=budget_pb2.PriceList(tenant=tenant, entries=[
        budget_pb2.PriceListEntry(model=model, per_request=common_pb2.Money(
            micros=costs.to_micros(PRICE_PER_REQUEST)))])), metadata=admin.metadata)
    console.print(f"tenant [bold]{tenant}[/] charges ${PRICE_PER_REQUEST} per {model} request (its price list: "
                  "served requests become revenue)")


def reconcile(console: Console, admin: Connection, tenant: Connection, since: float, reports_dir: Path) -> None:
    """Print the fleet report and the reconciliation for [since, now], then the tenant's margin report and PNG.
    Raises :class:`Unbalanced` when the bill and its allocation differ by a micro."""
    boundary = (int(time.time() / LOCAL_FLEET_INTERVAL_S) + 1) * LOCAL_FLEET_INTERVAL_S
    with console.status(f"billing the last metering interval (every {LOCAL_FLEET_INTERVAL_S:g} s)…"):
        time.sleep(max(0.0, boundary - time.time()) + 2.0)
    start = since - since % LOCAL_FLEET_INTERVAL_S
    window = {"since": protoconv.timestamp(from_epoch(start)), "until": protoconv.timestamp(from_epoch(boundary + 0.5))}
    stub = budget_pb2_grpc.BudgetsStub(admin.channel)
    fleet = stub.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_FLEET, **window),
                          metadata=admin.metadata)
    console.print(reports.fleet_table(fleet))
    console.print(reports.reconciliation_line(fleet.fleet))
    if not fleet.fleet.balanced:
        raise Unbalanced("the fleet's bill and its allocation differ")
    margin = budget_pb2_grpc.BudgetsStub(tenant.channel).GetSpend(
        budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_MARGIN, **window), metadata=tenant.metadata)
    console.print(reports.margin_table(margin))
    png = reports.margin_png(margin, reports_dir / "margin.png")
    console.print(f"cost against revenue over the demo: {png}")

