"""The Budgets gRPC servicer. Tenant administration is served now; the budget, ledger and scaling RPCs
answer UNIMPLEMENTED (the generated base class) until issue #6 builds them."""
from __future__ import annotations

from margin.common import protoconv
from margin.common.errors import Unimplemented
from margin.common.tenancy import TenantStore
from margin.v1 import budget_pb2, budget_pb2_grpc


class BudgetsServicer(budget_pb2_grpc.BudgetsServicer):
    def __init__(self, tenants: TenantStore):
        self.tenants = tenants

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

    def _not_yet(self, context, rpc: str):
        raise Unimplemented(f"Budgets.{rpc} is not available in this release: budgets, the spend ledger and "
                            "scaling plans are being built; tenant administration works")

    def SetBudget(self, request, context):
        self._not_yet(context, "SetBudget")

    def GetSpend(self, request, context):
        self._not_yet(context, "GetSpend")

    def ListLedger(self, request, context):
        self._not_yet(context, "ListLedger")

    def RecordSpend(self, request, context):
        self._not_yet(context, "RecordSpend")

    def GetScalingPlan(self, request, context):
        self._not_yet(context, "GetScalingPlan")
