"""Every Margin service at once for the fuzz campaign: redis-server, a real tritonserver, and budget, registry,
training, compression and inference servers on port 0 over one SQLite database (no worker: submitted jobs stay
queued), with the data the campaign must leave intact.

- Tenant ``acme`` is the one the campaign acts as: its model ``digits`` (a TorchScript MLP) is deployed, and its
  names (model, deployment, job id) are among the strings the campaign draws, so random requests reach real objects.
- Tenant ``keeper`` is never named and its key never used: its model, version bytes, alias, budget, ledger entry and
  queued job are read before and after the campaign (:meth:`FuzzStack.snapshot`) and must be the same.
"""
from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from margin.cluster.processes import ManagedProcess, MissingDependency
from margin.common import protoconv
from margin.common.service import StartedService, start_service
from margin.common.tensors import Signature, TensorSpec
from margin.inference.scaling import ScalingSettings
from margin.inference.service import InferenceSettings, inference_builder
from margin.inference.triton_process import find_triton, triton_spec
from margin.modelzoo.architectures import build_model
from margin.sdk import RegistryClient, connect
from margin.sdk.admin import create_tenant_key
from margin.v1 import (
    budget_pb2,
    budget_pb2_grpc,
    common_pb2,
    compression_pb2,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    training_pb2,
    training_pb2_grpc,
)
from safetensors.torch import save as safetensors_save
from tritonclient.grpc import service_pb2

from tests.fuzz.engine import Caller
from tests.fuzz.strategies import MessageStrategies
from tests.integration.training_stack import TrainingStack, training_stack

SIGNATURE = Signature((TensorSpec("input", "FP32", (-1, 64)),), (TensorSpec("logits", "FP32", (-1, 10)),))
KEEPER = "keeper"


@dataclass
class FuzzStack:
    jobs: TrainingStack
    inference: StartedService
    triton: ManagedProcess
    keeper_key: str
    names: dict[str, str] = field(default_factory=dict)  # acme's objects: model, deployment, job id

    @property
    def cluster(self):
        return self.jobs.cluster

    def caller(self) -> Caller:
        """A caller of every service as acme ("tenant"), the admin ("admin") and with no key ("none")."""
        c = self.cluster
        return Caller(self.addresses(), {"tenant": c.keys["acme"], "admin": c.admin_key, "none": None})

    def messages(self) -> MessageStrategies:
        """Random messages drawing on acme's names and the templates."""
        return MessageStrategies(self.names.values(), self.templates())

    def templates(self) -> dict[str, list]:
        """Valid messages of some types (message full name -> examples), which the campaign mutates. (None for
        DeployRequest: each Deploy that succeeds reloads the model in Triton for seconds; a VersionRef template
        makes enough of them succeed.)"""
        digits, source = (common_pb2.VersionRef(model="digits", number=1),
                          common_pb2.VersionRef(model="digits-st", number=1))
        usd = common_pb2.Money(currency="USD", micros=5_000_000)
        spec = training_pb2.TrainingSpec(model="digits", family="mlp", epochs=1, architecture=protoconv.struct(
            {"hidden": [8]}), dataset=common_pb2.DatasetRef(builtin="sklearn:digits"))
        cnn = training_pb2.TrainingSpec(model="digits", family="cnn", epochs=1, architecture=protoconv.struct(
            {"channels": [4]}), dataset=common_pb2.DatasetRef(builtin="sklearn:digits"))
        quantize = compression_pb2.Recipe(name="q", steps=[compression_pb2.CompressionStep(
            quantize=compression_pb2.QuantizeStep(scheme="dynamic_int8"))])
        distill = compression_pb2.DistillStep(student_family="mlp", epochs=1)
        distill.student_architecture.update({"hidden": [8]})
        recipe = compression_pb2.Recipe(name="d", steps=[compression_pb2.CompressionStep(distill=distill),
                                                         *quantize.steps])
        prune = compression_pb2.Recipe(name="p", steps=[compression_pb2.CompressionStep(
            prune=compression_pb2.PruneStep(kind=compression_pb2.PruneStep.KIND_STRUCTURED, amount=0.5))])
        floor = common_pb2.QualityFloor(metric="accuracy", minimum=0.5)
        tensor = common_pb2.Tensor(name="input", dtype=common_pb2.DTYPE_FP32, shape=[1, 64], raw=bytes(256))
        now = int(time.time())
        return {
            "margin.v1.VersionRef": [digits, source],
            "margin.v1.Money": [usd],
            "margin.v1.TrainingSpec": [spec, cnn],
            "margin.v1.Recipe": [quantize, recipe, prune],
            "margin.v1.QualityFloor": [floor],
            "margin.v1.Tensor": [tensor],
            "margin.v1.PredictRequest": [inference_pb2.PredictRequest(version=digits, inputs=[tensor])],
            "inference.ModelInferRequest": [service_pb2.ModelInferRequest(
                model_name="digits", model_version="1", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
                    name="input", datatype="FP32", shape=[1, 64])], raw_input_contents=[bytes(256)])],
            "margin.v1.SubmitJobRequest": [training_pb2.SubmitJobRequest(spec=spec, budget=usd)],
            "margin.v1.SubmitCompressionRequest": [compression_pb2.SubmitCompressionRequest(
                source=source, recipe=quantize, budget=usd)],
            "margin.v1.AutoCompressRequest": [compression_pb2.AutoCompressRequest(source=source, floor=floor,
                                                                                  budget=usd)],
            "margin.v1.Budget": [budget_pb2.Budget(period=budget_pb2.BUDGET_PERIOD_MONTHLY, total=usd)],
            "margin.v1.LedgerEntry": [budget_pb2.LedgerEntry(id="fuzz-1", tenant="acme", amount=usd,
                                                             category=budget_pb2.SPEND_CATEGORY_SERVING)],
            "margin.v1.UploadMetadata": [registry_pb2.UploadMetadata(
                model="digits", format=registry_pb2.ARTIFACT_FORMAT_SAFETENSORS,
                architecture=protoconv.struct({"family": "mlp", "input_dim": 64, "num_classes": 10}))],
            "google.protobuf.Timestamp": [timestamp_pb2.Timestamp(seconds=now - 60),
                                          timestamp_pb2.Timestamp(seconds=now)],
            "margin.v1.ReportFleetRequest": [budget_pb2.ReportFleetRequest(
                interval_start=timestamp_pb2.Timestamp(seconds=now - 2),
                interval_end=timestamp_pb2.Timestamp(seconds=now - 1), observer="fuzz", pools=[budget_pb2.FleetPool(
                    pool="triton/fuzz", kind="serving", device_class="cpu", replica_us=1_000_000, replicas=1)])],
        }

    def addresses(self) -> dict[str, str]:
        """gRPC service name -> the address of the server hosting it."""
        c = self.cluster
        return {"margin.v1.Budgets": c.budget.server.address, "margin.v1.ModelRegistry": c.registry.server.address,
                "margin.v1.TrainingJobs": self.jobs.training.server.address,
                "margin.v1.Compression": self.jobs.compression.server.address,
                "margin.v1.Inference": self.inference.server.address,
                "inference.GRPCInferenceService": self.inference.server.address}

    def servers(self) -> list[StartedService]:
        c = self.cluster
        return [c.budget, c.registry, self.jobs.training, self.jobs.compression, self.inference]

    def processes(self) -> dict[str, int | None]:
        """The pids of the helper processes (a restart would change one; None: it is not running)."""
        return {p.spec.name: (p.proc.pid if p.proc and p.proc.poll() is None else None)
                for p in (self.jobs.redis, self.triton)}

    def health(self) -> dict[str, int]:
        """Each server's overall gRPC health status."""
        out = {}
        for started in self.servers():
            with grpc.insecure_channel(started.server.address) as channel:
                out[started.server.address] = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10).status
        return out

    def snapshot(self) -> dict[str, bytes | str]:
        """What the keeper's objects read back as (and acme's immutable version), serialized."""
        conn = connect(self.cluster.budget.server.address, self.keeper_key)
        budgets = budget_pb2_grpc.BudgetsStub(conn.channel)
        registry = RegistryClient(connect(self.cluster.registry.server.address, self.keeper_key))
        training = training_pb2_grpc.TrainingJobsStub(connect(self.jobs.training.server.address,
                                                              self.keeper_key).channel)
        md = conn.metadata
        model = registry.stub.GetModel(registry_pb2.GetModelRequest(name="kept"), metadata=md, timeout=10)
        version, data = registry.download_bytes(common_pb2.VersionRef(model="kept", alias="prod"))
        budget = budgets.GetSpend(budget_pb2.GetSpendRequest(), metadata=md, timeout=10).budget
        budget.ClearField("period_start")  # the period (and what was spent in it) moves on at midnight UTC
        budget.ClearField("period_end")
        ledger = budgets.ListLedger(budget_pb2.ListLedgerRequest(), metadata=md, timeout=10)
        job = training.GetJob(training_pb2.GetJobRequest(id=self.names["keeper_job"]), metadata=md, timeout=10)
        acme = self.cluster.client().stub.GetVersion(registry_pb2.GetVersionRequest(
            version=common_pb2.VersionRef(model="digits", number=1)), metadata=self.cluster.client().metadata)
        return {"model": model.SerializeToString(deterministic=True),
                "version": version.SerializeToString(deterministic=True),
                "bytes": hashlib.sha256(data).hexdigest(),
                "budget": budget.SerializeToString(deterministic=True),
                "ledger": b"".join(e.SerializeToString(deterministic=True) for e in ledger.entries),
                "job": f"{job.id} {job.state} {job.spec.SerializeToString(deterministic=True).hex()} "
                       f"{job.budget.micros}",
                "acme-digits-v1": f"{acme.sha256} {acme.size_bytes}"}


def torchscript_mlp(seed: int) -> bytes:
    torch.manual_seed(seed)
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)))
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def _upload(client: RegistryClient, model: str, seed: int) -> registry_pb2.ModelVersion:
    return client.upload_bytes(torchscript_mlp(seed), registry_pb2.UploadMetadata(
        model=model, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
        signature=protoconv.signature_to_proto(SIGNATURE), metrics={"accuracy": 0.9}))


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def _seed_keeper(stack: FuzzStack) -> None:
    c = stack.cluster
    registry = RegistryClient(connect(c.registry.server.address, stack.keeper_key))
    registry.create_model("kept", description="left alone by the fuzz campaign", labels={"team": "a"})
    _upload(registry, "kept", seed=7)
    registry.stub.SetAlias(registry_pb2.SetAliasRequest(model="kept", alias="prod", number=1),
                           metadata=registry.metadata)
    admin = connect(c.budget.server.address, c.admin_key)
    budgets = budget_pb2_grpc.BudgetsStub(admin.channel)
    budgets.SetBudget(budget_pb2.SetBudgetRequest(budget=budget_pb2.Budget(
        tenant=KEEPER, period=budget_pb2.BUDGET_PERIOD_MONTHLY, total=common_pb2.Money(currency="USD",
                                                                                      micros=50_000_000))),
        metadata=admin.metadata)
    try:  # the admin (a service credential) may write the ledger
        budgets.RecordSpend(budget_pb2.RecordSpendRequest(entries=[budget_pb2.LedgerEntry(
            id="keeper-1", tenant=KEEPER, category=budget_pb2.SPEND_CATEGORY_TRAINING,
            amount=common_pb2.Money(currency="USD", micros=1234), description="kept")]), metadata=admin.metadata)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise
    training = training_pb2_grpc.TrainingJobsStub(connect(stack.jobs.training.server.address,
                                                          stack.keeper_key).channel)
    job = training.SubmitJob(training_pb2.SubmitJobRequest(spec=training_pb2.TrainingSpec(
        model="kept", family="mlp", epochs=1, architecture=protoconv.struct({"hidden": [16]}),
        dataset=common_pb2.DatasetRef(builtin="sklearn:digits"))), metadata=registry.metadata)
    stack.names["keeper_job"] = job.id


def _seed_acme(stack: FuzzStack) -> None:
    client = stack.cluster.client()
    client.create_model("digits")
    _upload(client, "digits", seed=1)
    client.create_model("digits-st")  # a compression source: safetensors with its architecture
    arch = {"family": "mlp", "input_dim": 64, "hidden": [16], "num_classes": 10}
    meta = registry_pb2.UploadMetadata(model="digits-st", format=registry_pb2.ARTIFACT_FORMAT_SAFETENSORS,
                                       signature=protoconv.signature_to_proto(SIGNATURE), metrics={"accuracy": 0.9})
    meta.architecture.update(arch)
    client.upload_bytes(safetensors_save(build_model(arch).state_dict()), meta)
    inference = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(stack.inference.server.address))
    md = (("authorization", f"Bearer {stack.cluster.keys['acme']}"),)
    deployment = inference.Deploy(inference_pb2.DeployRequest(version=common_pb2.VersionRef(model="digits", number=1)),
                                  metadata=md, timeout=120)
    _wait(lambda: inference.GetDeployment(inference_pb2.GetDeploymentRequest(name=deployment.name), metadata=md)
          .state == inference_pb2.DEPLOYMENT_STATE_READY, 120, "digits v1 never turned READY")
    training, tmd = stack.jobs.stub()
    job = training.SubmitJob(training_pb2.SubmitJobRequest(spec=training_pb2.TrainingSpec(
        model="digits", family="mlp", epochs=1, architecture=protoconv.struct({"hidden": [8]}),
        dataset=common_pb2.DatasetRef(builtin="sklearn:digits"))), metadata=tmd)
    stack.names.update(model="digits", source="digits-st", deployment=deployment.name, job=job.id)


@contextmanager
def fuzz_stack(home: Path) -> Iterator[FuzzStack]:
    """Start everything (raises MissingDependency without tritonserver or redis-server), seed the data, yield."""
    find_triton()
    with training_stack(home, worker=False) as jobs:
        triton = ManagedProcess(triton_spec(home, home / "repo"), home)
        triton.start()
        inference = None
        try:
            triton.wait_healthy(60)
            db = f"sqlite:///{home / 'margin.db'}"
            settings = InferenceSettings(
                triton_url=triton.spec.address, registry_address=jobs.cluster.registry.server.address,
                redis_url=f"redis://{jobs.redis.spec.address}/0", repository=home / "repo", watch_every_s=0.1,
                budget_ttl_s=0, budget_address=jobs.cluster.budget.server.address,
                scaling=ScalingSettings(interval_s=1.0))
            inference = start_service(inference_builder(settings), database_url=db, admin_key=jobs.cluster.admin_key,
                                      auth_cache_seconds=0)
            admin = connect(jobs.cluster.budget.server.address, jobs.cluster.admin_key)
            stack = FuzzStack(jobs, inference, triton, create_tenant_key(admin, KEEPER))
            _wait(lambda: set(stack.health().values()) == {health_pb2.HealthCheckResponse.SERVING}, 60,
                  "the services never all turned SERVING")
            _seed_keeper(stack)
            _seed_acme(stack)
            yield stack
        finally:
            if inference is not None:
                inference.stop()
            triton.stop()


__all__ = ["FuzzStack", "MissingDependency", "fuzz_stack"]
