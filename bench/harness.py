"""Pieces every benchmark shares: a tenant key through the real budget service."""
from __future__ import annotations

from margin.cluster.processes import ManagedProcess
from margin.sdk.admin import create_tenant_key
from margin.sdk.channel import connect


def tenant_key(budget: ManagedProcess, admin_key: str, description: str) -> str:
    """Create tenant 'bench' and an API key through Budgets (admin key); return the tenant's key."""
    conn = connect(budget.spec.address, admin_key)
    try:
        return create_tenant_key(conn, "bench", description)
    finally:
        conn.close()
