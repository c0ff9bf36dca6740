"""The Budgets gRPC servicer: tenant administration, budgets, spend and the ledger. Thin: convert, call the core
(:mod:`margin.budget.store`), convert back. A tenant key acts on its own tenant; the admin key names one."""
from __future__ import annotations

from datetime import datetime, timedelta

from margin.budget import convert
from margin.budget.autoscaler.planner import Planner
from margin.budget.fleet import prices
from margin.budget.fleet.metering import FleetMeter
from margin.budget.periods import bounds
from margin.budget.store import BudgetStore
from margin.common import auth, protoconv
from margin.common.errors import InvalidArgument, PermissionDenied
from margin.common.tenancy import PLATFORM_TENANT, Tenant, TenantStore, utcnow
from margin.v1 import budget_pb2, budget_pb2_grpc


class BudgetsServicer(budget_pb2_grpc.BudgetsServicer):
    def __init__(self, tenants: TenantStore, budgets: BudgetStore, planner: Planner, fleet: FleetMeter):
        self.tenants, self.budgets, self.planner, self.fleet = tenants, budgets, planner, fleet

    def _tenant(self, named: str) -> Tenant:
        """The tenant a call acts on: the caller's own, or — for the admin key only — the one it names."""
        principal = auth.current_principal()
        if principal.is_admin:
            if not named:
                raise InvalidArgument("name the tenant: the admin key is not a tenant")
            return self.tenants.get_tenant(named)
        if named and named != principal.tenant:
            raise PermissionDenied("a tenant key acts on its own tenant only")
        return self.tenants.get_tenant(principal.tenant)

    def _window(self, since: datetime | None, until: datetime | None, tenant_id: int | None) \
            -> tuple[datetime, datetime]:
        """The views' window: as asked, else the tenant's budget period (the UTC month without one) until now."""
        now = utcnow()
        if since is None:
            budget = self.budgets.get_budget(tenant_id) if tenant_id is not None else None
            since = bounds(budget.period if budget else "monthly", until or now)[0]
        return since, until or now + timedelta(seconds=1)

    def CreateTenant(self, request, context):
        return convert.tenant_to_proto(self.tenants.create_tenant(request.name))

    def CreateApiKey(self, request, context):
        key, info = self.tenants.create_api_key(request.tenant, request.description, request.ttl_seconds)
        return budget_pb2.CreateApiKeyResponse(key=key, api_key=convert.api_key_to_proto(info))

    def RevokeApiKey(self, request, context):
        return convert.api_key_to_proto(self.tenants.revoke_api_key(request.id))

    def ListApiKeys(self, request, context):
        tenant, keys = self.tenants.list_api_keys(request.tenant)
        return budget_pb2.ListApiKeysResponse(api_keys=[convert.api_key_to_proto(k) for k in keys],
                                              tenant=convert.tenant_to_proto(tenant))

    def DisableTenant(self, request, context):
        return convert.tenant_to_proto(self.tenants.set_disabled(request.name, True))

    def EnableTenant(self, request, context):
        return convert.tenant_to_proto(self.tenants.set_disabled(request.name, False))

    def SetBudget(self, request, context):
        tenant = self._tenant(request.budget.tenant)
        budget = self.budgets.set_budget(convert.budget_from_proto(request.budget, tenant.id, request.webhook_secret))
        return convert.budget_to_proto(budget, tenant.name, self.budgets.spend(tenant.id))

    def GetSpend(self, request, context):
        since, until = convert.window_from_proto(request)
        if request.view == budget_pb2.SPEND_VIEW_FLEET:
            if not auth.current_principal().is_admin:
                raise PermissionDenied("the fleet view covers every tenant: it is the operator's (the admin key)")
            if request.tenant:
                raise InvalidArgument("the fleet view covers every tenant: leave tenant empty")
            since, until = self._window(since, until, None)
            return budget_pb2.SpendReport(fleet=convert.fleet_view_to_proto(self.fleet.fleet_view(since, until)),
                                          window_start=protoconv.timestamp(since),
                                          window_end=protoconv.timestamp(until))
        if request.view == budget_pb2.SPEND_VIEW_MARGIN:
            every = auth.current_principal().is_admin and not request.tenant
            tenant = None if every else self._tenant(request.tenant)
            since, until = self._window(since, until, tenant.id if tenant else None)
            view = self.fleet.margin_view(tenant.id if tenant else None, since, until)
            return budget_pb2.SpendReport(margin=convert.margin_view_to_proto(view),
                                          window_start=protoconv.timestamp(since),
                                          window_end=protoconv.timestamp(until))
        if request.view != budget_pb2.SPEND_VIEW_UNSPECIFIED:
            raise InvalidArgument(f"view {request.view} is not a view of GetSpend")
        tenant = self._tenant(request.tenant)
        return convert.spend_to_proto(self.budgets.spend(tenant.id), tenant.name)

    def ListLedger(self, request, context):
        tenant = self._ledger_owner(request.tenant)
        rows, token = self.budgets.ledger(
            tenant.id, category=convert.ledger_category(request.category),
            since=protoconv.optional_time(request, "since"), until=protoconv.optional_time(request, "until"),
            size=request.page_size, token=request.page_token)
        return budget_pb2.ListLedgerResponse(entries=[convert.entry_to_proto(r, tenant.name) for r in rows],
                                             next_page_token=token)

    def RecordSpend(self, request, context):
        entries = [convert.entry_from_proto(e, self._tenant(e.tenant).id) for e in request.entries]
        written, duplicates = self.budgets.record(entries)
        return budget_pb2.RecordSpendResponse(recorded=written, duplicates=duplicates)

    def _ledger_owner(self, named: str) -> Tenant:
        """Whose entries ListLedger lists: the caller's own; the admin key names a tenant or the platform."""
        if named == PLATFORM_TENANT and auth.current_principal().is_admin:
            return Tenant(self.fleet.platform_id, PLATFORM_TENANT, utcnow())
        return self._tenant(named)

    def ReportFleet(self, request, context):
        billed, duplicates, allocated = self.fleet.report(convert.fleet_report_from_proto(request))
        return budget_pb2.ReportFleetResponse(billed=billed, duplicates=duplicates, allocations=[
            budget_pb2.FleetAllocation(tenant=a.tenant, deployment=a.deployment, amount=protoconv.money(a.micros),
                                       inferences=a.inferences) for a in allocated])

    def SetPriceList(self, request, context):
        named = request.price_list.tenant
        tenant_id = self.tenants.get_tenant(named).id if named else prices.DEFAULT
        entries = self.fleet.set_prices(tenant_id, convert.prices_from_proto(request.price_list))
        return convert.prices_to_proto(named, entries)

    def GetPriceList(self, request, context):
        default = auth.current_principal().is_admin and not request.tenant  # the admin key, naming no tenant
        tenant = None if default else self._tenant(request.tenant)
        return convert.prices_to_proto(tenant.name if tenant else "",
                                       self.fleet.prices(tenant.id if tenant else prices.DEFAULT))

    def GetScalingPlan(self, request, context):
        if not request.deployment:
            raise InvalidArgument("deployment: name a serving deployment, e.g. digits-v2")
        tenant = self._tenant("")
        return convert.plan_to_proto(self.planner.plan(tenant.id, request.deployment))
