"""Revoking API keys and disabling tenants (Budgets.RevokeApiKey / ListApiKeys / DisableTenant / EnableTenant) on
real budget and registry servers sharing one SQLite database. Both trust a verified key for the configured bound
(``MARGIN_AUTH_CACHE_SECONDS``, default 5 s), not 0 as other tests do, so a change made on the budget service must
reach the registry through the cache's expiry. Deadlines are generous: the tests never assert speed."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from margin.common import config
from margin.common.db import make_engine, make_sessionmaker
from margin.common.errors import Unauthenticated
from margin.common.tenancy import TenantStore
from margin.sdk import connect
from margin.v1 import budget_pb2, budget_pb2_grpc, registry_pb2, registry_pb2_grpc
from sqlalchemy import inspect, text

from tests.conftest import Cluster, running_cluster

BOUND_S = config.AUTH_CACHE_SECONDS.get_float()
DEADLINE_S = BOUND_S + 30  # the documented bound plus a generous margin for a loaded machine


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(f"sqlite:///{tmp_path / 'margin.db'}", tmp_path / "artifacts",
                         auth_cache_seconds=None) as c:
        yield c


def md(key: str, on_behalf_of: str | None = None) -> tuple:
    return (("authorization", f"Bearer {key}"),) + ((("x-margin-tenant", on_behalf_of),) if on_behalf_of else ())


def budgets(cluster: Cluster) -> budget_pb2_grpc.BudgetsStub:
    return budget_pb2_grpc.BudgetsStub(grpc.insecure_channel(cluster.budget.server.address))


def registry(cluster: Cluster) -> registry_pb2_grpc.ModelRegistryStub:
    return registry_pb2_grpc.ModelRegistryStub(grpc.insecure_channel(cluster.registry.server.address))


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def eventually(call: Callable[[], object], code: grpc.StatusCode) -> str:
    """Poll ``call`` until it answers ``code`` (within DEADLINE_S); returns the details."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        got, details = status_of(call)
        if got == code:
            return details
        assert time.monotonic() < deadline, f"still {got.name} ({details}) after {DEADLINE_S:.0f} s, wanted {code.name}"
        time.sleep(0.2)


def test_the_documented_bound_is_a_few_seconds_and_both_services_use_it(cluster):
    assert BOUND_S <= 10
    assert cluster.budget.context.tenants._cache_seconds == BOUND_S
    assert cluster.registry.context.tenants._cache_seconds == BOUND_S


def test_a_revoked_key_is_refused_on_every_service_within_the_bound(cluster):
    admin, stub, reg = md(cluster.admin_key), budgets(cluster), registry(cluster)
    created = stub.CreateApiKey(budget_pb2.CreateApiKeyRequest(tenant="acme", description="ci"), metadata=admin)
    key, key_id = created.key, created.api_key.id
    ledger = lambda: stub.ListLedger(budget_pb2.ListLedgerRequest(), metadata=md(key))  # noqa: E731
    models = lambda: reg.ListModels(registry_pb2.ListModelsRequest(), metadata=md(key))  # noqa: E731
    assert status_of(ledger)[0] == status_of(models)[0] == grpc.StatusCode.OK  # valid, and cached by both services

    revoked = stub.RevokeApiKey(budget_pb2.RevokeApiKeyRequest(id=f"mk_{key_id}"), metadata=admin)
    assert revoked.id == key_id and revoked.tenant == "acme" and revoked.HasField("revoke_time")
    for call in (ledger, models):
        details = eventually(call, grpc.StatusCode.UNAUTHENTICATED)
        assert f"API key {key_id} was revoked" in details
    # acme's other key is untouched; revoking again (by the whole key this time) keeps the first revoke time
    assert status_of(lambda: reg.ListModels(registry_pb2.ListModelsRequest(),
                                            metadata=md(cluster.keys["acme"])))[0] == grpc.StatusCode.OK
    again = stub.RevokeApiKey(budget_pb2.RevokeApiKeyRequest(id=key), metadata=admin)
    assert again.revoke_time == revoked.revoke_time
    listed = stub.ListApiKeys(budget_pb2.ListApiKeysRequest(tenant="acme"), metadata=admin)
    by_id = {k.id: k for k in listed.api_keys}
    assert set(by_id) == {key_id, cluster.keys["acme"].split("_")[1]}
    assert by_id[key_id].revoke_time == revoked.revoke_time and by_id[key_id].description == "ci"
    assert not by_id[cluster.keys["acme"].split("_")[1]].HasField("revoke_time")
    assert key.split("_", 2)[2] not in str(listed) and not listed.tenant.HasField("disable_time")


def test_an_unknown_or_empty_key_id_is_refused(cluster):
    stub, admin = budgets(cluster), md(cluster.admin_key)
    code, details = status_of(lambda: stub.RevokeApiKey(budget_pb2.RevokeApiKeyRequest(id="mk_0123456789ab"),
                                                        metadata=admin))
    assert code == grpc.StatusCode.NOT_FOUND and "0123456789ab" in details
    code, _ = status_of(lambda: stub.RevokeApiKey(budget_pb2.RevokeApiKeyRequest(id=""), metadata=admin))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = status_of(lambda: stub.ListApiKeys(budget_pb2.ListApiKeysRequest(tenant="ghost"), metadata=admin))
    assert code == grpc.StatusCode.NOT_FOUND


def test_a_disabled_tenant_is_refused_everywhere_until_enabled_and_others_are_unaffected(cluster):
    stub, reg, admin = budgets(cluster), registry(cluster), md(cluster.admin_key)
    acme, other = md(cluster.keys["acme"]), md(cluster.keys["other"])
    acme_models = lambda: reg.ListModels(registry_pb2.ListModelsRequest(), metadata=acme)  # noqa: E731
    acme_ledger = lambda: stub.ListLedger(budget_pb2.ListLedgerRequest(), metadata=acme)  # noqa: E731
    as_acme = lambda: reg.ListModels(registry_pb2.ListModelsRequest(),  # noqa: E731
                                     metadata=md(cluster.admin_key, on_behalf_of="acme"))
    assert {status_of(c)[0] for c in (acme_models, acme_ledger, as_acme)} == {grpc.StatusCode.OK}

    disabled = stub.DisableTenant(budget_pb2.DisableTenantRequest(name="acme"), metadata=admin)
    assert disabled.name == "acme" and disabled.HasField("disable_time")
    for call in (acme_models, acme_ledger, as_acme):  # the admin key acting for acme (a worker) is refused too
        assert "tenant 'acme' is disabled" in eventually(call, grpc.StatusCode.PERMISSION_DENIED)
    assert reg.ListModels(registry_pb2.ListModelsRequest(), metadata=other).models == []
    assert stub.ListLedger(budget_pb2.ListLedgerRequest(), metadata=other).entries == []
    # the operator still sees acme's books, and its state
    assert stub.GetSpend(budget_pb2.GetSpendRequest(tenant="acme"), metadata=admin).spent.micros == 0
    again = stub.DisableTenant(budget_pb2.DisableTenantRequest(name="acme"), metadata=admin)
    assert again.disable_time == disabled.disable_time  # idempotent: the first time stays
    listed = stub.ListApiKeys(budget_pb2.ListApiKeysRequest(tenant="acme"), metadata=admin)
    assert listed.tenant.disable_time == disabled.disable_time

    enabled = stub.EnableTenant(budget_pb2.EnableTenantRequest(name="acme"), metadata=admin)
    assert not enabled.HasField("disable_time")
    for call in (acme_models, acme_ledger, as_acme):  # the same keys work again: no new key was needed
        eventually(call, grpc.StatusCode.OK)
    assert stub.EnableTenant(budget_pb2.EnableTenantRequest(name="acme"), metadata=admin).name == "acme"


def test_the_platform_tenant_and_unknown_tenants_cannot_be_disabled(cluster):
    stub, admin = budgets(cluster), md(cluster.admin_key)
    for rpc, request in ((stub.DisableTenant, budget_pb2.DisableTenantRequest), (stub.EnableTenant,
                                                                                 budget_pb2.EnableTenantRequest)):
        code, details = status_of(lambda: rpc(request(name="_platform"), metadata=admin))  # noqa: B023
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "_platform" in details
        code, _ = status_of(lambda: rpc(request(name="ghost"), metadata=admin))  # noqa: B023
        assert code == grpc.StatusCode.NOT_FOUND


def test_tenant_keys_cannot_revoke_list_disable_or_enable(cluster):
    stub, acme = budgets(cluster), md(cluster.keys["acme"])
    other_key_id = cluster.keys["other"].split("_")[1]
    calls = [lambda: stub.RevokeApiKey(budget_pb2.RevokeApiKeyRequest(id=other_key_id), metadata=acme),
             lambda: stub.ListApiKeys(budget_pb2.ListApiKeysRequest(tenant="acme"), metadata=acme),
             lambda: stub.DisableTenant(budget_pb2.DisableTenantRequest(name="other"), metadata=acme),
             lambda: stub.EnableTenant(budget_pb2.EnableTenantRequest(name="acme"), metadata=acme)]
    for call in calls:
        code, details = status_of(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "admin key" in details
    client = connect(cluster.registry.server.address, cluster.keys["other"])  # other's key still works
    registry_pb2_grpc.ModelRegistryStub(client.channel).ListModels(registry_pb2.ListModelsRequest(),
                                                                    metadata=client.metadata)


def test_a_database_made_before_revocation_gets_the_new_columns(tmp_path):
    """An existing database (tenants and api_keys without disabled_at / revoked_at) is brought up to date at start,
    and its keys can be revoked."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE tenants (id INTEGER PRIMARY KEY, name VARCHAR(100) UNIQUE, "
                          "created_at DATETIME)"))
        conn.execute(text("CREATE TABLE api_keys (id VARCHAR(32) PRIMARY KEY, tenant_id INTEGER REFERENCES "
                          "tenants(id), key_sha256 VARCHAR(64), description VARCHAR(200), created_at DATETIME, "
                          "expires_at DATETIME)"))
    store = TenantStore(make_sessionmaker(engine))
    assert "disabled_at" in {c["name"] for c in inspect(engine).get_columns("tenants")}
    store.create_tenant("acme")
    key, info = store.create_api_key("acme")
    assert store.authenticate(key).tenant == "acme"
    assert store.revoke_api_key(info.id).revoked_at is not None
    with pytest.raises(Unauthenticated, match="was revoked"):
        store.authenticate(key)
