"""``margin admin``: tenant administration with the admin key (``--api-key``, else ``$MARGIN_ADMIN_KEY``, else the
local cluster's): create tenants and keys, list a tenant's keys, revoke a key, disable and enable a tenant.

A revoked key, or a disabled tenant's, is refused on every service within ``MARGIN_AUTH_CACHE_SECONDS``
(default 5 s; at once on the budget service)."""
from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.table import Table

from margin.cli.context import admin_connection
from margin.cli.shared import console, grpc_errors
from margin.v1 import budget_pb2, budget_pb2_grpc

admin_app = typer.Typer(help="Tenant administration (uses the admin key).", no_args_is_help=True)
BudgetOpt = typer.Option(None, "--budget", help="budget service address (default: the local cluster's)")
AdminKeyOpt = typer.Option(None, "--api-key", help="admin key (default: $MARGIN_ADMIN_KEY, else the local "
                                                   "cluster's)")


def budgets(address: str | None, key: str | None) -> tuple[budget_pb2_grpc.BudgetsStub, tuple]:
    conn = admin_connection(address, key)
    return budget_pb2_grpc.BudgetsStub(conn.channel), conn.metadata


def _utc(ts) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def key_state(key: budget_pb2.ApiKey, now: datetime) -> str:
    if key.HasField("revoke_time"):
        return f"revoked {_utc(key.revoke_time)}"
    if key.HasField("expire_time") and key.expire_time.ToDatetime(tzinfo=UTC) <= now:
        return "expired"
    return "active"


def keys_table(reply: budget_pb2.ListApiKeysResponse) -> Table:
    """A tenant's keys: id (the public prefix), description, created, expires, state — never a secret."""
    tenant = reply.tenant
    state = f"disabled since {_utc(tenant.disable_time)}" if tenant.HasField("disable_time") else "enabled"
    table = Table(title=f"API keys of {tenant.name} (tenant {state})")
    for col in ("id", "description", "created", "expires", "state"):
        table.add_column(col)
    now = datetime.now(UTC)
    for k in reply.api_keys:
        table.add_row(f"mk_{k.id}_…", k.description or "—", _utc(k.create_time),
                      _utc(k.expire_time) if k.HasField("expire_time") else "never", key_state(k, now))
    return table


@admin_app.command("create-tenant")
@grpc_errors
def create_tenant(name: str, budget: str | None = BudgetOpt,
                  ttl_seconds: int = typer.Option(0, help="key lifetime; 0 = never expires"),
                  api_key: str | None = AdminKeyOpt) -> None:
    """Create a tenant and print its first API key (shown once)."""
    stub, md = budgets(budget, api_key)
    stub.CreateTenant(budget_pb2.CreateTenantRequest(name=name), metadata=md)
    reply = stub.CreateApiKey(budget_pb2.CreateApiKeyRequest(tenant=name, description="first key",
                                                             ttl_seconds=ttl_seconds), metadata=md)
    console.print(f"tenant [bold]{name}[/] created. API key (shown once, store it now):")
    print(reply.key)


@admin_app.command("create-key")
@grpc_errors
def create_key(tenant: str, description: str = "", ttl_seconds: int = 0, budget: str | None = BudgetOpt,
               api_key: str | None = AdminKeyOpt) -> None:
    """Create another API key for a tenant and print it (shown once)."""
    stub, md = budgets(budget, api_key)
    reply = stub.CreateApiKey(budget_pb2.CreateApiKeyRequest(tenant=tenant, description=description,
                                                             ttl_seconds=ttl_seconds), metadata=md)
    print(reply.key)


@admin_app.command("keys")
@grpc_errors
def keys(tenant: str, budget: str | None = BudgetOpt, api_key: str | None = AdminKeyOpt) -> None:
    """List a tenant's API keys (ids, never secrets) and whether the tenant is disabled."""
    stub, md = budgets(budget, api_key)
    console.print(keys_table(stub.ListApiKeys(budget_pb2.ListApiKeysRequest(tenant=tenant), metadata=md)))


@admin_app.command("revoke-key")
@grpc_errors
def revoke_key(key_id: str = typer.Argument(..., help="the key's id: its public prefix mk_<id>_… (the id, mk_<id> or "
                                                        "the whole key)"),
               budget: str | None = BudgetOpt, api_key: str | None = AdminKeyOpt) -> None:
    """Revoke an API key (idempotent); every service refuses it within MARGIN_AUTH_CACHE_SECONDS."""
    stub, md = budgets(budget, api_key)
    key = stub.RevokeApiKey(budget_pb2.RevokeApiKeyRequest(id=key_id), metadata=md)
    console.print(f"API key mk_{key.id}_… of tenant [bold]{key.tenant}[/] revoked at {_utc(key.revoke_time)}")


@admin_app.command("disable-tenant")
@grpc_errors
def disable_tenant(name: str, budget: str | None = BudgetOpt, api_key: str | None = AdminKeyOpt) -> None:
    """Disable a tenant: its keys are refused (PERMISSION_DENIED) until enable-tenant; nothing is deleted, and its
    deployments stay loaded (and keep their share of the bill)."""
    tenant = _set_disabled(True, name, budget, api_key)
    console.print(f"tenant [bold]{tenant.name}[/] disabled since {_utc(tenant.disable_time)}: its keys are refused")


@admin_app.command("enable-tenant")
@grpc_errors
def enable_tenant(name: str, budget: str | None = BudgetOpt, api_key: str | None = AdminKeyOpt) -> None:
    """Enable a disabled tenant again: its keys (those not revoked or expired) work again."""
    tenant = _set_disabled(False, name, budget, api_key)
    console.print(f"tenant [bold]{tenant.name}[/] enabled: its keys work again")


def _set_disabled(disabled: bool, name: str, budget: str | None, api_key: str | None) -> budget_pb2.Tenant:
    stub, md = budgets(budget, api_key)
    if disabled:
        return stub.DisableTenant(budget_pb2.DisableTenantRequest(name=name), metadata=md)
    return stub.EnableTenant(budget_pb2.EnableTenantRequest(name=name), metadata=md)
