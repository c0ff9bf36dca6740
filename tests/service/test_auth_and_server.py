"""Auth, tenant isolation, error mapping, health, reflection and metrics on a real server."""
from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from margin.common.errors import NotFound
from margin.common.interceptor import ServiceInterceptor
from margin.common.metrics import start_metrics_endpoint
from margin.common.server import build_server
from margin.common.tenancy import Principal
from margin.sdk import RegistryClient, connect
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2, registry_pb2, registry_pb2_grpc

from tests.onnx_models import linear_onnx


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("metadata, fragment", [
    ((), "missing API key"),
    ((("authorization", "Bearer mk_nothere_secret"),), "invalid API key"),
    ((("authorization", "Bearer garbage"),), "invalid API key"),
    ((("authorization", "Basic dXNlcjpwYXNz"),), "missing API key"),
])
def test_missing_or_invalid_key_is_unauthenticated(cluster, metadata, fragment):
    stub = registry_pb2_grpc.ModelRegistryStub(cluster.channel())
    code, details = code_of(lambda: stub.ListModels(registry_pb2.ListModelsRequest(), metadata=metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED and fragment in details


def test_expired_key_is_unauthenticated(cluster):
    key = cluster.new_key("acme", ttl_seconds=1)
    client = RegistryClient(connect(cluster.registry.server.address, key))
    client.stub.ListModels(registry_pb2.ListModelsRequest(), metadata=client.metadata)  # valid now
    time.sleep(1.2)
    code, details = code_of(lambda: client.stub.ListModels(registry_pb2.ListModelsRequest(), metadata=client.metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "expired" in details


def test_keys_are_stored_hashed(cluster):
    from margin.common.tenancy import ApiKeyRow
    from sqlalchemy import select
    with cluster.registry.context.sessions() as s:
        stored = s.scalars(select(ApiKeyRow.key_sha256)).all()
    assert stored and all(cluster.keys["acme"] not in value for value in stored)
    assert all(len(value) == 64 for value in stored)


def test_another_tenants_objects_are_not_found(cluster):
    acme, other = cluster.client("acme"), cluster.client("other")
    acme.create_model("secret-model")
    acme.upload_bytes(linear_onnx(b"weights"), registry_pb2.UploadMetadata(
        model="secret-model", format=registry_pb2.ARTIFACT_FORMAT_ONNX))
    code, _ = code_of(lambda: other.stub.GetModel(registry_pb2.GetModelRequest(name="secret-model"),
                                                        metadata=other.metadata))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(lambda: other.download_bytes(common_pb2.VersionRef(model="secret-model", number=1)))
    assert code == grpc.StatusCode.NOT_FOUND
    assert other.stub.ListModels(registry_pb2.ListModelsRequest(), metadata=other.metadata).models == []
    other.create_model("secret-model")  # same name, separate namespace
    assert other.stub.GetModel(registry_pb2.GetModelRequest(name="secret-model"),
                               metadata=other.metadata).latest_version == 0


def test_admin_rpcs_need_the_admin_key(cluster):
    stub = budget_pb2_grpc.BudgetsStub(grpc.insecure_channel(cluster.budget.server.address))
    tenant_md = (("authorization", f"Bearer {cluster.keys['acme']}"),)
    code, details = code_of(lambda: stub.CreateTenant(budget_pb2.CreateTenantRequest(name="x"), metadata=tenant_md))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin key" in details
    admin_md = (("authorization", f"Bearer {cluster.admin_key}"),)
    assert stub.CreateTenant(budget_pb2.CreateTenantRequest(name="x"), metadata=admin_md).name == "x"
    code, _ = code_of(lambda: stub.CreateTenant(budget_pb2.CreateTenantRequest(name="x"), metadata=admin_md))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = code_of(lambda: stub.CreateApiKey(budget_pb2.CreateApiKeyRequest(tenant="ghost"), metadata=admin_md))
    assert code == grpc.StatusCode.NOT_FOUND
    # the admin key administers tenants but owns no models
    registry = registry_pb2_grpc.ModelRegistryStub(cluster.channel())
    code, _ = code_of(lambda: registry.ListModels(registry_pb2.ListModelsRequest(), metadata=admin_md))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_health_and_reflection_are_open(cluster):
    channel = cluster.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "margin.v1.ModelRegistry"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"margin.v1.ModelRegistry", "grpc.health.v1.Health"} <= set(services)


def test_stopping_turns_health_not_serving(cluster):
    cluster.registry.server.set_serving(False)
    reply = health_pb2_grpc.HealthStub(cluster.channel()).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


# -- the interceptor on a server of its own ------------------------------------------------------------------
class Exploding(registry_pb2_grpc.ModelRegistryServicer):
    def GetModel(self, request, context):
        if request.name == "boom":
            raise RuntimeError("secret internal detail /etc/passwd")
        raise NotFound(f"model {request.name!r} not found")

    def DownloadVersion(self, request, context):
        yield registry_pb2.DownloadVersionResponse(chunk=b"first")
        raise RuntimeError("failed mid-stream")


@pytest.fixture()
def exploding_server():
    def authenticate(key: str | None, on_behalf_of: str | None = None) -> Principal:
        return Principal(1, "t")
    servicer = Exploding()
    running = build_server([lambda s: registry_pb2_grpc.add_ModelRegistryServicer_to_server(servicer, s)],
                           ["margin.v1.ModelRegistry"], interceptors=[ServiceInterceptor(authenticate)])
    yield registry_pb2_grpc.ModelRegistryStub(grpc.insecure_channel(running.address))
    running.stop(0)


def test_unexpected_errors_become_internal_without_leaking(exploding_server, caplog):
    code, details = code_of(lambda: exploding_server.GetModel(registry_pb2.GetModelRequest(name="boom")))
    assert code == grpc.StatusCode.INTERNAL
    assert details.startswith("internal error (ref ") and "passwd" not in details
    ref = details.split("ref ")[1].split(")")[0]
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)  # traceback logged, with the ref
    code, _ = code_of(lambda: exploding_server.GetModel(registry_pb2.GetModelRequest(name="x")))
    assert code == grpc.StatusCode.NOT_FOUND
    stream = exploding_server.DownloadVersion(registry_pb2.DownloadVersionRequest())
    assert next(stream).chunk == b"first"
    code, details = code_of(lambda: next(stream))
    assert code == grpc.StatusCode.INTERNAL and "mid-stream" not in details


def test_metrics_endpoint_counts_calls_by_code(cluster):
    port = start_metrics_endpoint(0, host="127.0.0.1")
    client = cluster.client()
    with pytest.raises(grpc.RpcError):
        client.stub.GetModel(registry_pb2.GetModelRequest(name="nope"), metadata=client.metadata)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'margin_grpc_requests_total{code="NOT_FOUND",method="/margin.v1.ModelRegistry/GetModel"}' in body
    assert "margin_grpc_request_seconds_bucket" in body


def test_a_scaling_plan_needs_a_known_deployment(cluster):
    stub = budget_pb2_grpc.BudgetsStub(grpc.insecure_channel(cluster.budget.server.address))
    md = (("authorization", f"Bearer {cluster.keys['acme']}"),)
    code, details = code_of(lambda: stub.GetScalingPlan(budget_pb2.GetScalingPlanRequest(), metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "deployment" in details
    code, details = code_of(lambda: stub.GetScalingPlan(budget_pb2.GetScalingPlanRequest(deployment="nope-v1"),
                                                        metadata=md))
    assert code == grpc.StatusCode.NOT_FOUND and "nope-v1" in details


def test_only_the_admin_key_acts_on_behalf_of_a_tenant(cluster):
    cluster.client("acme").create_model("mine")
    as_acme = RegistryClient(connect(cluster.registry.server.address, cluster.admin_key, on_behalf_of="acme"))
    assert [m.name for m in as_acme.stub.ListModels(registry_pb2.ListModelsRequest(),
                                                   metadata=as_acme.metadata).models] == ["mine"]
    as_other = RegistryClient(connect(cluster.registry.server.address, cluster.admin_key, on_behalf_of="other"))
    assert list(as_other.stub.ListModels(registry_pb2.ListModelsRequest(), metadata=as_other.metadata).models) == []
    for key, tenant, code in ((cluster.keys["other"], "acme", grpc.StatusCode.PERMISSION_DENIED),
                              (cluster.admin_key, "no-such-tenant", grpc.StatusCode.NOT_FOUND)):
        client = RegistryClient(connect(cluster.registry.server.address, key, on_behalf_of=tenant))
        with pytest.raises(grpc.RpcError) as err:
            client.stub.ListModels(registry_pb2.ListModelsRequest(), metadata=client.metadata)
        assert err.value.code() == code
