"""The Budgets gRPC servicer: tenant administration, budgets, spend and the ledger. Thin: convert, call the core
(:mod:`margin.budget.store`), convert back. A tenant key acts on its own tenant; the admin key names one."""
from __future__ import annotations

from datetime import UTC

from margin.budget import convert
from margin.budget.autoscaler.planner import Planner
from margin.budget.store import BudgetStore
from margin.common import auth, protoconv
from margin.common.errors import InvalidArgument, PermissionDenied
from margin.common.tenancy import Tenant, TenantStore
from margin.v1 import budget_pb2, budget_pb2_grpc


class BudgetsServicer(budget_pb2_grpc.BudgetsServicer):
    def __init__(self, tenants: TenantStore, budgets: BudgetStore, planner: Planner):
        self.tenants, self.budgets, self.planner = tenants, budgets, planner

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

    def CreateTenant(self, request, context):
        tenant = self.tenants.create_tenant(request.name)
        return budget_pb2.Tenant(name=tenant.name, create_time=protoconv.timestamp(tenant.created_at))

    def CreateApiKey(self, request, context):
        key, info = self.tenants.create_api_key(request.tenant, request.description, request.ttl_seconds)
        api_key = budget_pb2.ApiKey(id=info.id, tenant=info.tenant, description=info.description,
                                    create_time=protoconv.timestamp(info.created_at))
        if info.expires_at:
            api_key.expire_time.CopyFrom(protoconv.timestamp(info.expires_at))
        return budget_pb2.CreateApiKeyResponse(key=key, api_key=api_key)

    def SetBudget(self, request, context):
        tenant = self._tenant(request.budget.tenant)
        budget = self.budgets.set_budget(convert.budget_from_proto(request.budget, tenant.id, request.webhook_secret))
        return convert.budget_to_proto(budget, tenant.name, self.budgets.spend(tenant.id))

    def GetSpend(self, request, context):
        tenant = self._tenant(request.tenant)
        return convert.spend_to_proto(self.budgets.spend(tenant.id), tenant.name)

    def ListLedger(self, request, context):
        tenant = self._tenant("")
        rows, token = self.budgets.ledger(
            tenant.id, category=convert.CATEGORY_FROM_PROTO.get(request.category, ""),
            since=request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None,
            until=request.until.ToDatetime(tzinfo=UTC) if request.HasField("until") else None,
            size=request.page_size, token=request.page_token)
        return budget_pb2.ListLedgerResponse(entries=[convert.entry_to_proto(r, tenant.name) for r in rows],
                                             next_page_token=token)

    def RecordSpend(self, request, context):
        entries = [convert.entry_from_proto(e, self._tenant(e.tenant).id) for e in request.entries]
        written, duplicates = self.budgets.record(entries)
        return budget_pb2.RecordSpendResponse(recorded=written, duplicates=duplicates)

    def GetScalingPlan(self, request, context):
        if not request.deployment:
            raise InvalidArgument("deployment: name a serving deployment, e.g. digits-v2")
        tenant = self._tenant("")
        return convert.plan_to_proto(self.planner.plan(tenant.id, request.deployment))
