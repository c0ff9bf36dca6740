"""The stack the inference tests run against: a real tritonserver, redis-server, registry and inference service,
and the helpers that call it."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from margin.cluster.processes import ManagedProcess, MissingDependency, redis_spec
from margin.common.protoconv import signature_to_proto
from margin.common.service import start_service
from margin.common.tensors import Signature, TensorSpec
from margin.inference.scaling import ScalingSettings
from margin.inference.service import InferenceSettings, inference_builder
from margin.inference.triton_process import find_triton, triton_spec
from margin.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2

from tests.conftest import running_cluster

FLEET_INTERVAL_S = 1.0  # the metering interval of the test stacks: a report every second
SIGNATURE = Signature((TensorSpec("input", "FP32", (-1, 64)),), (TensorSpec("logits", "FP32", (-1, 10)),))


@dataclass
class Stack:
    cluster: object
    triton: ManagedProcess
    inference: object
    stubs: dict
    scripted: dict
    home: Path
    settings: InferenceSettings

    def stub(self, tenant: str = "acme") -> inference_pb2_grpc.InferenceStub:
        return self.stubs[tenant]

    def md(self, tenant: str = "acme") -> tuple:
        return (("authorization", f"Bearer {self.cluster.keys[tenant]}"),)


def scripted_mlp(seed: int) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    return torch.jit.script(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)))


def upload_model(cluster, model: str, module: torch.jit.ScriptModule, path: Path, metrics: dict,
                 tenant: str = "acme") -> int:
    module.save(str(path))
    client = cluster.client(tenant)
    return client.upload_file(path, registry_pb2.UploadMetadata(
        model=model, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, signature=signature_to_proto(SIGNATURE),
        metrics=metrics)).number


@dataclass
class Gateway:
    """A real tritonserver on ``<home>/repo`` and the inference service in front of it, on a cluster's registry and
    budget service."""
    triton: ManagedProcess
    inference: object
    settings: InferenceSettings
    channel: grpc.Channel


@contextmanager
def gateway_on(cluster, home: Path, redis_url: str, triton_control_key: str | None = None) -> Iterator[Gateway]:
    """Triton and the inference service (port 0) over ``cluster``'s SQLite database; skips when Triton is not
    installed. With ``triton_control_key``, Triton's model control answers only that key."""
    try:
        find_triton()
    except MissingDependency as err:
        pytest.skip(str(err))
    triton = ManagedProcess(triton_spec(home, home / "repo", control_key=triton_control_key), home)
    triton.start()
    triton.wait_healthy(60)
    try:
        settings = InferenceSettings(triton_url=triton.spec.address, registry_address=cluster.registry.server.address,
                                     redis_url=redis_url, repository=home / "repo", watch_every_s=0.1,
                                     budget_ttl_s=0, budget_address=cluster.budget.server.address,
                                     scaling=ScalingSettings(interval_s=FLEET_INTERVAL_S))
        inference = start_service(inference_builder(settings), database_url=f"sqlite:///{home / 'margin.db'}",
                                  admin_key=cluster.admin_key, auth_cache_seconds=0)
        channel = grpc.insecure_channel(inference.server.address)
        try:
            yield Gateway(triton, inference, settings, channel)
        finally:
            channel.close()
            inference.stop()
    finally:
        triton.stop()


@contextmanager
def inference_stack(home: Path, triton_control_key: str | None = None) -> Iterator[Stack]:
    """redis-server, a real tritonserver on ``<home>/repo``, the registry and budget of the conftest cluster, and
    the inference service on port 0, all over one SQLite database; the model "digits" has versions 1-3 (three
    MLPs with decreasing accuracy and cost per million in their metrics). Skips when Triton is not installed.
    With ``triton_control_key``, Triton's model control answers only that key (the gateway reads it from
    MARGIN_TRITON_CONTROL_KEY, which the caller sets)."""
    try:
        find_triton()
    except MissingDependency as err:
        pytest.skip(str(err))
    redis_proc = ManagedProcess(redis_spec(home), home)
    redis_proc.start()
    redis_proc.wait_healthy(30)
    try:
        with running_cluster(f"sqlite:///{home / 'margin.db'}", home / "artifacts") as cluster, \
                gateway_on(cluster, home, f"redis://{redis_proc.spec.address}/0", triton_control_key) as gateway:
            scripted = {}
            client = cluster.client()
            client.create_model("digits")
            for number, (seed, metrics) in enumerate(
                    [(1, {"accuracy": 0.97, "cost_per_million_micros": 900_000}),
                     (2, {"accuracy": 0.96, "cost_per_million_micros": 300_000}),
                     (3, {"accuracy": 0.90, "cost_per_million_micros": 100_000})], start=1):
                scripted[number] = scripted_mlp(seed)
                assert upload_model(cluster, "digits", scripted[number], home / f"m{number}.pt", metrics) == number
            stubs = {t: inference_pb2_grpc.InferenceStub(gateway.channel) for t in ("acme", "other")}
            yield Stack(cluster, gateway.triton, gateway.inference, stubs, scripted, home, gateway.settings)
    finally:
        redis_proc.stop()


def tensor(x: np.ndarray, name: str = "input", dtype: int = common_pb2.DTYPE_FP32) -> common_pb2.Tensor:
    return common_pb2.Tensor(name=name, dtype=dtype, shape=x.shape, raw=x.tobytes())


def predict(stack: Stack, x: np.ndarray, number: int = 1, tenant: str = "acme", model: str = "digits",
            **kw) -> inference_pb2.PredictResponse:
    return stack.stub(tenant).Predict(inference_pb2.PredictRequest(
        version=common_pb2.VersionRef(model=model, number=number), inputs=[kw.pop("t", None) or tensor(x)], **kw),
        metadata=stack.md(tenant))


def deploy(stack: Stack, number: int, tenant: str = "acme", model: str = "digits",
           device_class: str = "") -> inference_pb2.Deployment:
    return stack.stub(tenant).Deploy(inference_pb2.DeployRequest(
        version=common_pb2.VersionRef(model=model, number=number), device_class=device_class,
        batching=inference_pb2.BatchingConfig(max_batch_size=16, max_queue_delay_microseconds=500)),
        metadata=stack.md(tenant))


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def outputs(resp: inference_pb2.PredictResponse) -> np.ndarray:
    out = resp.outputs[0]
    return np.frombuffer(out.raw, dtype=np.float32).reshape(out.shape)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def billed_through(stack: Stack, moment: float | None = None, timeout: float = 20.0) -> None:
    """Wait until the gateway's fleet observer has closed every metering interval up to ``moment`` (now) and the
    budget service has taken the reports: the ledger then holds what was served until then."""
    moment = time.time() if moment is None else moment
    observer = stack.inference.spec.extra["observer"]
    wait_for(lambda: observer.last_closed_end >= moment, timeout, "the fleet observer closed no interval")
    assert observer.flush(timeout), "the budget service did not take the fleet reports"


def health(stack: Stack) -> int:
    """The inference service's gRPC health status (SERVING, NOT_SERVING)."""
    with grpc.insecure_channel(stack.inference.server.address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status


@contextmanager
def another_service(stack: Stack, settings: InferenceSettings, model: str, seeds: Sequence[int], what: str) \
        -> Iterator[tuple[Stack, int]]:
    """A second inference service with ``settings``, over the stack's database, registry and Redis, serving
    ``model`` (versions 1.. are :func:`scripted_mlp` of ``seeds``). Yields the stack as seen through it and the
    tenant id of "acme", once its health is SERVING; stops it afterwards."""
    service = start_service(inference_builder(settings), database_url=f"sqlite:///{stack.home / 'margin.db'}",
                            admin_key=stack.cluster.admin_key, auth_cache_seconds=0)
    try:
        stack.cluster.client().create_model(model)
        scripted = {n: scripted_mlp(seed) for n, seed in enumerate(seeds, start=1)}
        for n, module in scripted.items():
            assert upload_model(stack.cluster, model, module, stack.home / f"{model}{n}.pt", {}) == n
        channel = grpc.insecure_channel(service.server.address)
        stubs = {t: inference_pb2_grpc.InferenceStub(channel) for t in ("acme", "other")}
        view = dataclasses.replace(stack, inference=service, stubs=stubs, scripted=scripted)
        wait_for(lambda: health(view) == health_pb2.HealthCheckResponse.SERVING, 60,
                 f"the {what} service never turned SERVING")
        yield view, service.context.tenants.authenticate(stack.cluster.keys["acme"]).tenant_id
    finally:
        service.stop()


# -- shared by the OIP and ONNX serving tests -------------------------------------------------------------
TOKENS_SIGNATURE = Signature((TensorSpec("tokens", "INT64", (-1, 8)),), (TensorSpec("vector", "FP32", (-1, 4)),))
VOCABULARY = 100
SLOW_BATCHING = inference_pb2.BatchingConfig(max_batch_size=16, max_queue_delay_microseconds=100_000)


def triton_model_name(stack: Stack, deployment: str) -> str:
    """The Triton name the gateway gave ``deployment`` (``t<tenant id>--<deployment>``), from Triton's own index."""
    direct = tg.InferenceServerClient(stack.triton.spec.address)
    try:
        index = direct.get_model_repository_index().models
    finally:
        direct.close()
    names = [m.name for m in index if m.name.endswith(f"--{deployment}") and m.state == "READY"]
    assert len(names) == 1, f"expected one READY Triton model for {deployment}: {index}"
    return names[0]


def triton_counts(stack: Stack, triton_name: str) -> tuple[int, int]:
    """Triton's own (inference_count, execution_count) of a model: rows inferred and batches executed."""
    direct = tg.InferenceServerClient(stack.triton.spec.address)
    try:
        stats = direct.get_inference_statistics(triton_name).model_stats
    finally:
        direct.close()
    return sum(s.inference_count for s in stats), sum(s.execution_count for s in stats)


class MeanEmbedding(torch.nn.Module):
    """INT64 token ids [-1, 8] -> the mean of their embeddings, FP32 [-1, 4]: a model whose input is integers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.table = torch.nn.Embedding(VOCABULARY, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens).mean(dim=1)


def upload_torchscript(stack: Stack, model: str, module: torch.jit.ScriptModule, signature: Signature) -> int:
    """Upload ``module`` as a TORCHSCRIPT version of ``model`` (created here) with its own signature."""
    client = stack.cluster.client()
    client.ensure_model(model)
    path = stack.home / f"{model}.pt"
    module.save(str(path))
    return client.upload_file(path, registry_pb2.UploadMetadata(
        model=model, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, signature=signature_to_proto(signature))).number
