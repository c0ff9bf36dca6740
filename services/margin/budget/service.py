"""Wires the Budgets servicer into a gRPC service."""
from __future__ import annotations

from margin.budget.servicer import BudgetsServicer
from margin.common.service import ServiceContext, ServiceSpec
from margin.v1 import budget_pb2, budget_pb2_grpc

SERVICE_NAME = budget_pb2.DESCRIPTOR.services_by_name["Budgets"].full_name
ADMIN_METHODS = (f"/{SERVICE_NAME}/CreateTenant", f"/{SERVICE_NAME}/CreateApiKey")


def build_budget(ctx: ServiceContext) -> ServiceSpec:
    servicer = BudgetsServicer(ctx.tenants)
    return ServiceSpec(register=[lambda server: budget_pb2_grpc.add_BudgetsServicer_to_server(servicer, server)],
                       service_names=[SERVICE_NAME], admin_methods=ADMIN_METHODS)
