"""Tenants and API keys.

A key looks like ``mk_<id>_<secret>``: the id is a public prefix (shown in listings and logs), the
secret is 32 random bytes. Only the SHA-256 of the whole key is stored — keys are high-entropy, so a
fast hash is enough (as for GitHub tokens); comparison is constant-time. Verified keys are cached for a
short time (``cache_seconds``, ``MARGIN_AUTH_CACHE_SECONDS``) so the hot path does not hit the database on every call.

Revocation: a revoked key answers UNAUTHENTICATED (the credential is no longer valid, like an expired one); the
keys of a disabled tenant answer PERMISSION_DENIED saying the tenant is disabled (the credential is fine, its owner
may not act), and so does the admin key acting on behalf of that tenant. A cache entry is trusted for at most
``cache_seconds``, after which the key is looked up again: that is the bound within which a revocation or a
suspension reaches every service (each process has its own store); the store that makes the change drops its own
entries at once.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import DateTime, ForeignKey, Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from margin.common.db import Base
from margin.common.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from margin.common.names import validate_name

PLATFORM_TENANT = "_platform"  # holds the platform's own ledger lines (the bill, idle); never a caller (no keys)
MAX_KEY_TTL_SECONDS = 10 * 366 * 86_400  # a key's lifetime is at most 10 years (0: it never expires)


def utcnow() -> datetime:
    return datetime.now(UTC)


class TenantRow(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant (``tenant_id``/``tenant``) or the operator (``is_admin``)."""

    tenant_id: int | None
    tenant: str | None
    is_admin: bool = False
    key_id: str = ""


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    created_at: datetime
    disabled_at: datetime | None = None

    @classmethod
    def of(cls, row: TenantRow) -> Tenant:
        return cls(row.id, row.name, as_utc(row.created_at), as_utc(row.disabled_at))


@dataclass(frozen=True)
class ApiKeyInfo:
    id: str
    tenant: str
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None = None

    @classmethod
    def of(cls, row: ApiKeyRow, tenant: str) -> ApiKeyInfo:
        return cls(row.id, tenant, row.description, as_utc(row.created_at), as_utc(row.expires_at),
                   as_utc(row.revoked_at))


def from_epoch(seconds: float) -> datetime:
    """Seconds since the epoch (``time.time()``) as an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def disabled_error(tenant: str, since: datetime) -> PermissionDenied:
    return PermissionDenied(f"tenant {tenant!r} is disabled (since {since.isoformat()}): its keys are refused until "
                            "an operator enables it again")


def key_id_of(ref: str) -> str:
    """The id in ``<id>``, ``mk_<id>`` or a whole key ``mk_<id>_<secret>``."""
    ref = ref.strip()
    if ref.startswith("mk_"):
        ref = ref[3:].partition("_")[0]
    if not ref or len(ref) > 32:
        raise InvalidArgument("id: name a key by its id, the public prefix of the key (mk_<id>_...)")
    return ref


class TenantStore:
    def __init__(self, sessions: sessionmaker, admin_key: str | None = None, cache_seconds: float = 5.0):
        self._sessions = sessions
        self._admin_sha = hashlib.sha256(admin_key.encode()).hexdigest() if admin_key else None
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal, datetime | None]] = {}
        self._lock = threading.Lock()

    # -- administration -------------------------------------------------------------------------
    def create_tenant(self, name: str) -> Tenant:
        validate_name(name, "tenant name")
        with self._sessions.begin() as s:
            row = TenantRow(name=name)
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                raise AlreadyExists(f"tenant {name!r} already exists") from None
            return Tenant.of(row)

    def get_tenant(self, name: str) -> Tenant:
        with self._sessions() as s:
            row = s.scalar(select(TenantRow).where(TenantRow.name == name))
            if row is None:
                raise NotFound(f"tenant {name!r} not found")
            return Tenant.of(row)

    def set_disabled(self, name: str, disabled: bool) -> Tenant:
        """Disable a tenant (its keys are refused everywhere within the cache bound) or enable it again; both are
        idempotent (disabling a disabled tenant keeps the first time)."""
        if not name:
            raise InvalidArgument("name: name the tenant to disable or enable")
        if name == PLATFORM_TENANT:
            raise InvalidArgument(f"{PLATFORM_TENANT} holds the platform's own ledger lines: it cannot be disabled")
        with self._sessions.begin() as s:
            row = s.scalar(select(TenantRow).where(TenantRow.name == name))
            if row is None:
                raise NotFound(f"tenant {name!r} not found")
            if disabled and row.disabled_at is None:
                row.disabled_at = utcnow()
            elif not disabled:
                row.disabled_at = None
            s.flush()
            tenant = Tenant.of(row)
        self._forget(lambda principal: principal.tenant_id == tenant.id)
        return tenant

    def revoke_api_key(self, ref: str) -> ApiKeyInfo:
        """Revoke a key by its id (see :func:`key_id_of`); revoking a revoked key keeps its first time."""
        key_id = key_id_of(ref)
        with self._sessions.begin() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                raise NotFound(f"API key {key_id!r} not found")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            s.flush()
            info = ApiKeyInfo.of(row, s.get(TenantRow, row.tenant_id).name)
        self._forget(lambda principal: principal.key_id == key_id)
        return info

    def list_api_keys(self, tenant: str) -> tuple[Tenant, list[ApiKeyInfo]]:
        """A tenant and its keys, newest first (revoked and expired ones included; never a secret or a hash)."""
        if not tenant:
            raise InvalidArgument("tenant: name the tenant whose keys to list")
        t = self.get_tenant(tenant)
        with self._sessions() as s:
            rows = s.scalars(select(ApiKeyRow).where(ApiKeyRow.tenant_id == t.id)
                             .order_by(ApiKeyRow.created_at.desc(), ApiKeyRow.id)).all()
            return t, [ApiKeyInfo.of(row, t.name) for row in rows]

    def _forget(self, matches) -> None:
        """Drop this process's cached principals that ``matches`` (other processes' expire within the bound)."""
        with self._lock:
            for digest in [d for d, (_, principal, _) in self._cache.items() if matches(principal)]:
                del self._cache[digest]

    def ensure_platform(self) -> int:
        """The id of :data:`PLATFORM_TENANT`, created on first use (its name is one no tenant can take)."""
        for _ in range(2):
            with self._sessions() as s:
                found = s.scalar(select(TenantRow.id).where(TenantRow.name == PLATFORM_TENANT))
            if found is not None:
                return found
            try:
                with self._sessions.begin() as s:
                    row = TenantRow(name=PLATFORM_TENANT)
                    s.add(row)
                    s.flush()
                    return row.id
            except IntegrityError:  # another replica made it first: read it
                continue
        raise RuntimeError(f"cannot create the {PLATFORM_TENANT} tenant")

    def names(self) -> dict[int, str]:
        """Every tenant's name by id."""
        with self._sessions() as s:
            return dict(s.execute(select(TenantRow.id, TenantRow.name)).all())

    def create_api_key(self, tenant: str, description: str = "", ttl_seconds: int = 0) -> tuple[str, ApiKeyInfo]:
        """Make a new key for ``tenant``; the returned plaintext is never stored."""
        if not 0 <= ttl_seconds <= MAX_KEY_TTL_SECONDS:
            raise InvalidArgument(f"ttl_seconds must be between 0 (never expires) and {MAX_KEY_TTL_SECONDS} "
                                  f"(10 years), got {ttl_seconds}")
        if len(description) > 200:
            raise InvalidArgument("description is longer than 200 characters")
        if tenant == PLATFORM_TENANT:
            raise InvalidArgument(f"{PLATFORM_TENANT} holds the platform's own ledger lines and has no keys")
        t = self.get_tenant(tenant)
        key_id = secrets.token_hex(6)
        key = f"mk_{key_id}_{secrets.token_urlsafe(32)}"
        expires = utcnow() + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        with self._sessions.begin() as s:
            row = ApiKeyRow(id=key_id, tenant_id=t.id, key_sha256=hashlib.sha256(key.encode()).hexdigest(),
                            description=description, expires_at=expires)
            s.add(row)
            s.flush()
            return key, ApiKeyInfo(key_id, t.name, description, as_utc(row.created_at), expires)

    # -- authentication -------------------------------------------------------------------------
    def authenticate(self, key: str | None, on_behalf_of: str | None = None) -> Principal:
        """Map a bearer key to its principal, or raise :class:`Unauthenticated` saying what is wrong.

        Only the admin key may act on behalf of a tenant (``on_behalf_of``, the tenant's name): Margin's own
        workers use that to register a job's result in the tenant's registry, like Kubernetes impersonation.
        """
        if not key:
            raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
        digest = hashlib.sha256(key.encode()).hexdigest()
        if self._admin_sha and hmac.compare_digest(digest, self._admin_sha):
            if on_behalf_of:
                tenant = self.get_tenant(on_behalf_of)
                if tenant.disabled_at is not None:
                    raise disabled_error(tenant.name, tenant.disabled_at)
                return Principal(tenant.id, tenant.name, key_id=f"admin-as-{tenant.name}")
            return Principal(None, None, is_admin=True, key_id="admin")
        if on_behalf_of:
            raise PermissionDenied("only the admin key may act on behalf of a tenant")
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit and now - hit[0] < self._cache_seconds:
            _, principal, expires = hit
            if expires is not None and expires <= utcnow():
                raise Unauthenticated(f"API key {principal.key_id} expired at {expires.isoformat()}")
            return principal
        principal, expires = self._lookup(key, digest)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, principal, expires)
        return principal

    def _lookup(self, key: str, digest: str) -> tuple[Principal, datetime | None]:
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != "mk":
            raise Unauthenticated("invalid API key")
        with self._sessions() as s:
            row = s.get(ApiKeyRow, parts[1])
            if row is None or not hmac.compare_digest(row.key_sha256, digest):
                raise Unauthenticated("invalid API key")
            if row.revoked_at is not None:
                raise Unauthenticated(f"API key {row.id} was revoked at {as_utc(row.revoked_at).isoformat()}")
            expires = as_utc(row.expires_at)
            if expires is not None and expires <= utcnow():
                raise Unauthenticated(f"API key {row.id} expired at {expires.isoformat()}")
            tenant = s.get(TenantRow, row.tenant_id)
            if tenant.disabled_at is not None:
                raise disabled_error(tenant.name, as_utc(tenant.disabled_at))
            return Principal(tenant.id, tenant.name, key_id=row.id), expires
