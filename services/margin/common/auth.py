"""The principal of the current call, set by the service interceptor, read by servicers."""
from __future__ import annotations

from contextvars import ContextVar

from margin.common.errors import PermissionDenied, Unauthenticated
from margin.common.tenancy import Principal

_current: ContextVar[Principal | None] = ContextVar("margin_principal", default=None)


def set_principal(principal: Principal | None) -> None:
    _current.set(principal)


def current_principal() -> Principal:
    principal = _current.get()
    if principal is None:
        raise Unauthenticated("call is not authenticated")
    return principal


def current_tenant_id() -> int:
    """The calling tenant's id; the admin key is not a tenant and cannot own objects."""
    principal = current_principal()
    if principal.tenant_id is None:
        raise PermissionDenied("the admin key administers tenants; use a tenant's API key for this call")
    return principal.tenant_id


ON_BEHALF_OF_HEADER = "x-margin-tenant"


def on_behalf_of(metadata) -> str | None:
    """The tenant an admin-key call acts for (``x-margin-tenant: <tenant name>``), or None."""
    for key, value in metadata or ():
        if key == ON_BEHALF_OF_HEADER:
            return value.strip() or None
    return None


def bearer_token(metadata) -> str | None:
    """The key from ``authorization: Bearer <key>`` in call metadata, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None
