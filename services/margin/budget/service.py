"""Wires the Budgets servicer into a gRPC service, with the alert watcher running beside it.

When ``MARGIN_BUDGETS_FILE`` is set, its tenants and budgets are applied before the server starts
(:mod:`margin.budget.seed`); a malformed file is a configuration error and the service does not start."""
from __future__ import annotations

from margin.budget import seed
from margin.budget.alerts import AlertWatcher
from margin.budget.autoscaler.wiring import build_autoscaler
from margin.budget.egress import EgressPolicy
from margin.budget.fleet.allocation import POLICIES
from margin.budget.fleet.metering import FleetMeter
from margin.budget.servicer import BudgetsServicer
from margin.budget.store import BudgetStore
from margin.common import config, costs
from margin.common.service import ServiceContext, ServiceSpec
from margin.v1 import budget_pb2, budget_pb2_grpc

SERVICE_NAME = budget_pb2.DESCRIPTOR.services_by_name["Budgets"].full_name
# RecordSpend among them: only Margin's own services and workers (which hold the admin key) write the ledger.
ADMIN_METHODS = tuple(f"/{SERVICE_NAME}/{m}" for m in ("CreateTenant", "CreateApiKey", "ReportFleet", "SetPriceList",
                                                        "RecordSpend",
                                                        "RevokeApiKey", "ListApiKeys", "DisableTenant",
                                                        "EnableTenant"))


def idle_policy() -> str:
    policy = config.IDLE_POLICY.get()
    if policy not in POLICIES:
        raise config.ConfigError(f"{config.IDLE_POLICY.env}={policy!r}: use one of {list(POLICIES)}")
    return policy


def webhook_policy() -> EgressPolicy:
    try:
        return EgressPolicy.parse(config.WEBHOOK_ALLOW.get())
    except ValueError as err:
        raise config.ConfigError(f"{config.WEBHOOK_ALLOW.env}: {err}") from None


def build_budget(ctx: ServiceContext) -> ServiceSpec:
    egress = webhook_policy()
    store = BudgetStore(ctx.sessions, config.FLEET_INTERVAL_SECONDS.get_float(),
                        config.BURN_WINDOW_SECONDS.get_float(), egress)
    fleet = FleetMeter(ctx.sessions, ctx.tenants, costs.PriceCatalog.load(), idle_policy(),
                       ledger_key=config.ledger_id_key(ctx.admin_key))
    budgets_file = config.BUDGETS_FILE.raw()
    seeded = seed.apply_file(budgets_file, ctx.tenants, store) if budgets_file else None
    planner, loop = build_autoscaler(ctx.sessions, store)
    servicer = BudgetsServicer(ctx.tenants, store, planner, fleet)
    watcher = AlertWatcher(store, ctx.sessions, config.BUDGET_ALERT_INTERVAL_SECONDS.get_float(), egress)

    def start(_server) -> None:
        watcher.start()
        loop.start()

    def stop() -> None:
        loop.stop()
        watcher.stop()

    return ServiceSpec(register=[lambda server: budget_pb2_grpc.add_BudgetsServicer_to_server(servicer, server)],
                       service_names=[SERVICE_NAME], admin_methods=ADMIN_METHODS, on_started=start, on_stop=stop,
                       extra={"budgets": store, "fleet": fleet, "alerts": watcher, "planner": planner,
                              "budgets_file": seeded})
