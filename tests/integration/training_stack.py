"""A real job stack for tests: redis-server, budget + registry + training + compression servers on port 0 over
one SQLite database, and a real Celery worker process consuming ``train.cpu``."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from margin.cluster.processes import ManagedProcess, ProcessSpec, redis_spec, worker_spec
from margin.common.ledger import SPEND_CATEGORIES, LedgerRow
from margin.common.service import StartedService, start_service
from margin.compression.service import compression_builder
from margin.sdk import connect
from margin.sdk.pages import all_pages
from margin.training.service import training_builder
from margin.v1 import compression_pb2_grpc, registry_pb2, training_pb2_grpc
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from tests.conftest import MAX_UPLOAD, Cluster, running_cluster


@dataclass
class TrainingStack:
    cluster: Cluster
    training: StartedService
    compression: StartedService
    redis: ManagedProcess
    home: Path
    worker_env: dict[str, str]
    workers: list[ManagedProcess] = field(default_factory=list)

    def stub(self, tenant: str = "acme") -> tuple[training_pb2_grpc.TrainingJobsStub, tuple]:
        conn = connect(self.training.server.address, self.cluster.keys[tenant])
        return training_pb2_grpc.TrainingJobsStub(conn.channel), conn.metadata

    def compression_stub(self, tenant: str = "acme") -> tuple[compression_pb2_grpc.CompressionStub, tuple]:
        conn = connect(self.compression.server.address, self.cluster.keys[tenant])
        return compression_pb2_grpc.CompressionStub(conn.channel), conn.metadata

    def start_worker(self, name: str = "worker-cpu") -> ManagedProcess:
        worker = ManagedProcess(worker_spec(self.home, self.worker_env, name=name), self.home)
        worker.start()
        worker.wait_healthy(60)
        self.workers.append(worker)
        return worker

    def ledger(self, job_id: str) -> list[LedgerRow]:
        """The ledger entries a job billed its tenant (not the platform's lines of the worker time it used)."""
        engine = create_engine(f"sqlite:///{self.home / 'margin.db'}")
        with Session(engine) as s:
            rows = list(s.scalars(select(LedgerRow).where(LedgerRow.job_id == job_id,
                                                          LedgerRow.category.in_(SPEND_CATEGORIES))))
        engine.dispose()
        return rows

    def versions(self, model: str, tenant: str = "acme") -> list[registry_pb2.ModelVersion]:
        """The model's versions; none when the model does not exist."""
        client = self.cluster.client(tenant)
        try:
            return all_pages(lambda r: client.stub.ListVersions(r, metadata=client.metadata),
                             registry_pb2.ListVersionsRequest(model=model), "versions")
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return []

    def cli(self, option: str, address: str, *args: str, code: int = 0, tenant: str = "acme") -> Result:
        """``margin *args`` in-process (typer's CliRunner) against ``address`` given as ``option``, with the
        tenant's key; asserts the exit code and that nothing but SystemExit escaped."""
        from margin.cli.main import app

        result = CliRunner().invoke(app, [*args, option, address, "--api-key", self.cluster.keys[tenant]])
        shown = f"margin {' '.join(args)} -> exit {result.exit_code}\n{result.output}"
        assert result.exit_code == code, shown
        assert result.exception is None or isinstance(result.exception, SystemExit), shown
        return result

    def worker_children(self, worker: ManagedProcess) -> list[int]:
        """The pool processes of a prefork worker (the ones that run tasks)."""
        out = Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children")
        return [int(p) for p in out.read_text().split()] if out.exists() else []


@contextmanager
def training_stack(home: Path, max_world_size: int = 2, lease_seconds: float = 10.0,
                   worker: bool = True, max_upload: int = MAX_UPLOAD) -> Iterator[TrainingStack]:
    home.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{home / 'margin.db'}"
    redis_proc = ManagedProcess(redis_spec(home), home)
    redis_proc.start()
    redis_proc.wait_healthy(30)
    redis_url = f"redis://{redis_proc.spec.address}/0"
    stack = None
    try:
        with running_cluster(db, home / "artifacts", max_upload) as cluster:
            registry, budget = cluster.registry.server.address, cluster.budget.server.address
            training = start_service(training_builder(redis_url, registry, budget, max_world_size, lease_seconds),
                                     database_url=db, admin_key=cluster.admin_key, auth_cache_seconds=0)
            compression = start_service(compression_builder(redis_url, registry, budget, lease_seconds),
                                        database_url=db, admin_key=cluster.admin_key, auth_cache_seconds=0)
            services = str(Path(__file__).resolve().parents[2] / "services")
            env = {"MARGIN_HOME": str(home), "DATABASE_URL": db, "MARGIN_REDIS_URL": redis_url,
                   "MARGIN_REGISTRY_ADDR": cluster.registry.server.address, "MARGIN_ADMIN_KEY": cluster.admin_key,
                   "MARGIN_CHECKPOINT_DIR": str(home / "checkpoints"), "MARGIN_LOG_FORMAT": "text",
                   "MARGIN_JOB_LEASE_SECONDS": str(lease_seconds),
                   "MARGIN_BUDGET_ADDR": cluster.budget.server.address, "MARGIN_FLEET_INTERVAL_SECONDS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [services, os.environ.get("PYTHONPATH")]))}
            stack = TrainingStack(cluster, training, compression, redis_proc, home, env)
            if worker:
                stack.start_worker()
            try:
                yield stack
            finally:
                for w in stack.workers:
                    w.stop()
                training.stop()
                compression.stop()
    finally:
        redis_proc.stop()


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


__all__ = ["ProcessSpec", "TrainingStack", "training_stack", "wait_for"]


def train_digits_mlp(stack: TrainingStack, timeout: float = 120.0) -> str:
    """Train the digits MLP the compression suites start from (version 1 of "digits"); returns the job id."""
    from margin.common import protoconv
    from margin.v1 import common_pb2, training_pb2

    stub, md = stack.stub()
    spec = training_pb2.TrainingSpec(model="digits", family="mlp", epochs=30, learning_rate=0.003,
                                     architecture=protoconv.struct({"hidden": [128]}),
                                     dataset=common_pb2.DatasetRef(builtin="sklearn:digits"))
    job = stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec), metadata=md)
    wait_for(lambda: stub.GetJob(training_pb2.GetJobRequest(id=job.id), metadata=md).state
             == common_pb2.JOB_STATE_SUCCEEDED, timeout)
    return job.id
