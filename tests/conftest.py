"""Fixtures shared by the suites: real gRPC servers on port 0 over a real SQLite database."""
from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from margin.budget.service import build_budget
from margin.common.service import StartedService, start_service
from margin.registry.service import registry_builder
from margin.sdk import RegistryClient, connect
from margin.sdk.admin import create_tenant_key
from margin.v1 import budget_pb2, budget_pb2_grpc

MAX_UPLOAD = 8 << 20


@dataclass
class Cluster:
    """Budget + registry servers sharing one database, with two tenants and their keys."""

    budget: StartedService
    registry: StartedService
    admin_key: str
    keys: dict[str, str]
    artifact_dir: Path

    def client(self, tenant: str = "acme") -> RegistryClient:
        return RegistryClient(connect(self.registry.server.address, self.keys[tenant]))

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.registry.server.address)

    def new_key(self, tenant: str, ttl_seconds: int = 0) -> str:
        conn = connect(self.budget.server.address, self.admin_key)
        try:
            return budget_pb2_grpc.BudgetsStub(conn.channel).CreateApiKey(
                budget_pb2.CreateApiKeyRequest(tenant=tenant, ttl_seconds=ttl_seconds), metadata=conn.metadata).key
        finally:
            conn.close()

    def artifact_files(self) -> list[Path]:
        """Every file in the artifact store, partial uploads included."""
        return sorted(p for p in self.artifact_dir.rglob("*") if p.is_file() and p.suffix != ".lock")


@contextmanager
def running_cluster(database_url: str, artifact_dir: Path, max_upload: int = MAX_UPLOAD,
                    auth_cache_seconds: float | None = 0) -> Iterator[Cluster]:
    """Start budget + registry on port 0 over ``database_url`` with tenants 'acme' and 'other'; the registry takes
    uploads of up to ``max_upload`` bytes and trusts a verified key for ``auth_cache_seconds`` (None: the
    configured default, ``MARGIN_AUTH_CACHE_SECONDS``; the budget service always uses that default)."""
    admin_key = "adm_" + secrets.token_urlsafe(24)
    budget = start_service(build_budget, database_url=database_url, admin_key=admin_key)
    registry = start_service(registry_builder(artifact_dir, max_upload), database_url=database_url,
                             admin_key=admin_key, auth_cache_seconds=auth_cache_seconds)
    conn = connect(budget.server.address, admin_key)
    keys = {tenant: create_tenant_key(conn, tenant) for tenant in ("acme", "other")}
    conn.close()
    try:
        yield Cluster(budget, registry, admin_key, keys, artifact_dir)
    finally:
        registry.stop()
        budget.stop()


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(f"sqlite:///{tmp_path / 'margin.db'}", tmp_path / "artifacts") as c:
        yield c
