"""``margin admin keys|revoke-key|disable-tenant|enable-tenant``, in-process (typer's CliRunner) against real budget and
registry servers (port 0, SQLite) with the tenants acme and other; the admin key comes from $MARGIN_ADMIN_KEY."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from margin.cli.main import app
from margin.sdk import RegistryClient, connect
from margin.v1 import registry_pb2
from typer.testing import CliRunner, Result

runner = CliRunner()


@pytest.fixture()
def env(cluster, tmp_path: Path) -> dict[str, str | None]:
    return {"MARGIN_BUDGET_ADDR": cluster.budget.server.address, "MARGIN_ADMIN_KEY": cluster.admin_key,
            "MARGIN_API_KEY": None, "MARGIN_HOME": str(tmp_path / "home"), "NO_COLOR": "1", "COLUMNS": "200"}


def margin(env: dict[str, str | None], *args: str, code: int = 0) -> str:
    """``margin *args`` in-process: asserts the exit code and that no traceback escaped; returns the output on one
    line (rich soft-wraps long lines)."""
    result: Result = runner.invoke(app, list(args), env=env)
    shown = f"margin {' '.join(args)} -> exit {result.exit_code}\n{result.output}"
    assert result.exit_code == code, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.output, shown
    return " ".join(result.output.split())


def key_works(cluster, key: str) -> grpc.StatusCode:
    client = RegistryClient(connect(cluster.registry.server.address, key))
    try:
        client.stub.ListModels(registry_pb2.ListModelsRequest(), metadata=client.metadata)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_keys_lists_ids_never_secrets_and_revoke_key_refuses_the_key(cluster, env):
    key = cluster.new_key("acme")
    key_id, secret = key.split("_", 2)[1:]
    listed = margin(env, "admin", "keys", "acme")
    assert "API keys of acme (tenant enabled)" in listed and f"mk_{key_id}_…" in listed and "active" in listed
    assert secret not in listed and cluster.keys["acme"].split("_", 2)[2] not in listed

    out = margin(env, "admin", "revoke-key", f"mk_{key_id}_…")
    assert f"API key mk_{key_id}_… of tenant acme revoked at" in out
    assert key_works(cluster, key) == grpc.StatusCode.UNAUTHENTICATED  # the registry here caches nothing
    assert key_works(cluster, cluster.keys["acme"]) == grpc.StatusCode.OK
    assert "revoked" in margin(env, "admin", "keys", "acme")
    assert "revoked at" in margin(env, "admin", "revoke-key", key_id)  # idempotent

    assert margin(env, "admin", "revoke-key", "0123456789ab", code=1).startswith("NOT_FOUND: ")


def test_disable_and_enable_tenant(cluster, env):
    assert "tenant acme disabled since" in margin(env, "admin", "disable-tenant", "acme")
    assert key_works(cluster, cluster.keys["acme"]) == grpc.StatusCode.PERMISSION_DENIED
    assert key_works(cluster, cluster.keys["other"]) == grpc.StatusCode.OK
    assert "(tenant disabled since" in margin(env, "admin", "keys", "acme")

    assert "tenant acme enabled" in margin(env, "admin", "enable-tenant", "acme")
    assert key_works(cluster, cluster.keys["acme"]) == grpc.StatusCode.OK
    assert "(tenant enabled)" in margin(env, "admin", "keys", "acme")
    assert "INVALID_ARGUMENT" in margin(env, "admin", "disable-tenant", "_platform", code=1)


def test_a_tenant_key_is_refused_by_the_admin_commands(cluster, env):
    for args in (("keys", "acme"), ("revoke-key", cluster.keys["other"].split("_")[1]), ("disable-tenant", "other"),
                 ("enable-tenant", "acme")):
        out = margin(env, "admin", *args, "--api-key", cluster.keys["acme"], code=1)
        assert out.startswith("PERMISSION_DENIED: ") and "admin key" in out
    assert key_works(cluster, cluster.keys["other"]) == grpc.StatusCode.OK
