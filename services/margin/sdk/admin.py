"""Tenant administration with the admin key (Budgets.CreateTenant / CreateApiKey)."""
from __future__ import annotations

import grpc

from margin.sdk.channel import Connection
from margin.v1 import budget_pb2, budget_pb2_grpc


def create_tenant_key(conn: Connection, tenant: str, description: str = "", ttl_seconds: int = 0,
                      exist_ok: bool = False) -> str:
    """Create ``tenant`` (an existing one is fine with ``exist_ok``) and return a new API key for it."""
    stub = budget_pb2_grpc.BudgetsStub(conn.channel)
    try:
        stub.CreateTenant(budget_pb2.CreateTenantRequest(name=tenant), metadata=conn.metadata, timeout=10)
    except grpc.RpcError as err:
        if not (exist_ok and err.code() == grpc.StatusCode.ALREADY_EXISTS):
            raise
    return stub.CreateApiKey(budget_pb2.CreateApiKeyRequest(tenant=tenant, description=description,
                                                            ttl_seconds=ttl_seconds),
                             metadata=conn.metadata, timeout=10).key
