"""The registry over a real PostgreSQL server: the same gRPC servers as the SQLite suites, another database.

A throwaway cluster is made with the server binaries of the Debian ``postgresql`` package (initdb, pg_ctl),
listening only on a unix socket in a temp dir, with ``-A trust`` and ``fsync=off``. initdb refuses to run as
root, so as root the server runs as the ``postgres`` OS user (``runuser``). Skipped, with the reason, where
the binaries are missing or no unprivileged user can run them; ``.ci/run`` installs them so CI never skips.
"""
from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from margin.v1 import common_pb2, registry_pb2
from sqlalchemy import Engine, text

from tests.conftest import Cluster, running_cluster
from tests.onnx_models import linear_onnx
from tests.service.test_registry_service import meta, ref

DB_NAME = "margin_test"
PG_USER = "postgres"


# -- a throwaway PostgreSQL server -------------------------------------------------------------------------
def _bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding initdb, pg_ctl and postgres, else PATH's."""
    def major(p: str) -> int:
        try:
            return int(Path(p).parent.parent.name)
        except ValueError:
            return -1
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major, reverse=True)
    if which := shutil.which("initdb"):
        candidates.append(which)
    for initdb in candidates:
        bindir = Path(initdb).parent
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _run_as() -> list[str] | None:
    """The command prefix that runs the server binaries as a user they accept (never root)."""
    if os.geteuid() != 0:
        return []  # initdb and postgres only refuse root; any other user owns its own cluster
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return None
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", PG_USER, "--"]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class PostgresServer:
    socket_dir: Path
    port: int

    def url(self, database: str = DB_NAME) -> str:
        return f"postgresql+psycopg://{PG_USER}@/{database}?host={self.socket_dir}&port={self.port}"

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=PG_USER, dbname="postgres",
                               autocommit=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: "
                    "apt-get install postgresql (.ci/run does)")
    prefix = _run_as()
    if prefix is None:
        pytest.skip("running as root, and there is no 'postgres' OS user or no runuser to run initdb as "
                    "(initdb refuses root): apt-get install postgresql creates the user")
    # /tmp, not pytest's tmp_path: a unix socket path must stay under ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="margin-pg-"))
    data, log = root / "data", root / "server.log"
    if os.geteuid() == 0:
        shutil.chown(root, PG_USER, PG_USER)
    os.chmod(root, 0o700)
    port = _free_port()

    def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([*prefix, *args], cwd=root, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            server_log = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            pytest.fail(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                        f"{server_log}", pytrace=False)
        return result

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER, "-E", "UTF8",
            "--locale=C", "--no-sync")
        options = (f"-c listen_addresses='' -c unix_socket_directories='{root}' -p {port} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        started = True  # from here on, always try to stop it
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
        server = PostgresServer(root, port)
        with server.admin() as conn:
            conn.execute(f"CREATE DATABASE {DB_NAME}")
        yield server
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def pg_url(postgres: PostgresServer) -> str:
    """A fresh, empty ``margin_test`` database for each test."""
    with postgres.admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")
    return postgres.url()


def _engines(cluster: Cluster) -> list[Engine]:
    return [service.context.sessions.kw["bind"] for service in (cluster.budget, cluster.registry)]


@contextmanager
def pg_cluster(url: str, tmp_path: Path) -> Iterator[Cluster]:
    """``running_cluster`` over PostgreSQL, checked to really be PostgreSQL, its pools closed afterwards."""
    with running_cluster(url, tmp_path / "artifacts") as cluster:
        engines = _engines(cluster)
        try:
            for engine in engines:
                assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
                with engine.connect() as conn:
                    assert conn.scalar(text("SELECT current_database()")) == DB_NAME
                    assert conn.scalar(text("SELECT version()")).startswith("PostgreSQL")
            with engines[1].connect() as conn:  # the schema really was created in PostgreSQL
                tables = set(conn.scalars(text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).all())
            assert {"tenants", "registry_models", "registry_versions", "registry_aliases"} <= tables, tables
            yield cluster
        finally:
            for engine in engines:
                engine.dispose()


@pytest.fixture()
def cluster(pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    with pg_cluster(pg_url, tmp_path) as c:
        yield c


def _recent(ts) -> bool:
    when = ts.ToDatetime(tzinfo=UTC)
    return abs(datetime.now(UTC) - when) < timedelta(minutes=5)


# -- the tests --------------------------------------------------------------------------------------------
# The registry's service tests, collected again here so they run with this module's PostgreSQL `cluster`.
from tests.service.test_auth_and_server import test_another_tenants_objects_are_not_found  # noqa: E402, F401
from tests.service.test_registry_service import (  # noqa: E402, F401
    test_bad_calls_get_the_right_status,
    test_bad_uploads_get_a_clear_status_and_leave_nothing,
    test_list_models_pages_and_filters_by_label,
    test_ten_concurrent_uploads_get_versions_1_to_10,
    test_upload_download_round_trip_is_byte_identical,
    test_versions_carry_metadata_aliases_and_lineage,
)


def test_round_trip_alias_metrics_and_lineage(cluster, tmp_path):
    client = cluster.client()
    model = client.create_model("m", labels={"team": "a"})
    assert _recent(model.create_time)
    data = linear_onnx(os.urandom(3 * (1 << 20) + 12345))  # several chunks, the last one partial
    v1 = client.upload_bytes(data, meta(metrics={"accuracy": 0.97}, description="first",
                                        recipe=_struct({"kind": "training", "epochs": 3})))
    assert (v1.number, v1.size_bytes, v1.sha256) == (1, len(data), hashlib.sha256(data).hexdigest())
    assert _recent(v1.create_time)

    got_version, got = client.download_bytes(ref(number=1))
    assert got == data and got_version.sha256 == v1.sha256
    path = tmp_path / "out.bin"
    client.download_to(ref(), path, chunk_size=64 * 1024)  # latest, small chunks
    assert path.read_bytes() == data

    md = client.metadata
    client.stub.SetAlias(registry_pb2.SetAliasRequest(model="m", alias="production", number=1), metadata=md)
    by_alias = client.stub.GetVersion(registry_pb2.GetVersionRequest(version=ref(alias="production")), metadata=md)
    assert (by_alias.number, by_alias.sha256, list(by_alias.aliases)) == (1, v1.sha256, ["production"])
    assert dict(by_alias.metrics) == {"accuracy": 0.97} and dict(by_alias.recipe)["kind"] == "training"
    assert by_alias.create_time == v1.create_time
    assert client.download_bytes(ref(alias="production"))[1] == data

    # SELECT ... FOR UPDATE and a JSON column rewritten in place.
    updated = client.stub.AttachMetrics(registry_pb2.AttachMetricsRequest(
        version=ref(alias="production"), metrics={"latency_p50_ms": 1.5}), metadata=md)
    assert dict(updated.metrics) == {"accuracy": 0.97, "latency_p50_ms": 1.5}

    child = client.upload_bytes(linear_onnx(b"small"), meta(parent=ref(number=1), cost=common_pb2.Cost(
        total=common_pb2.Money(currency="USD", micros=250))))
    lineage = client.stub.GetLineage(registry_pb2.GetLineageRequest(version=ref(number=child.number)), metadata=md)
    assert [(v.model, v.number) for v in lineage.chain] == [("m", 2), ("m", 1)]
    assert lineage.total_cost.micros == 250
    got_model = client.stub.GetModel(registry_pb2.GetModelRequest(name="m"), metadata=md)
    assert (got_model.latest_version, dict(got_model.aliases), dict(got_model.labels)) == (
        2, {"production": 1}, {"team": "a"})
    assert got_model.create_time == model.create_time


def _struct(d):
    from margin.common.protoconv import struct
    return struct(d)
