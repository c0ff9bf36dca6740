"""Defence in depth for Triton (issue 14): a webhook pointed at Triton's HTTP API on loopback unloaded another
tenant's model. Started the way the local cluster starts it (``triton_spec(..., control_key=...)``), a real
tritonserver refuses model control without the gateway's key, over HTTP and gRPC, while the gateway — which alone
holds the key — still deploys and undeploys."""
from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from margin.cluster.processes import service_specs
from margin.inference.triton_client import CONTROL_KEY_HEADER, GRPC_CONTROL_KEY_HEADER
from margin.v1 import inference_pb2
from tritonclient import grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from tests.integration.inference_stack import deploy, inference_stack, predict, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    key = secrets.token_urlsafe(32)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARGIN_TRITON_CONTROL_KEY", key)  # the gateway's environment, as the local cluster sets it
        with inference_stack(tmp_path_factory.mktemp("locked"), triton_control_key=key) as stack:
            yield stack, key


def http_post(stack, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{stack.triton.spec.ports['http']}{path}", data=b"{}",
                                     method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_triton_refuses_model_control_without_the_gateways_key(locked):
    stack, key = locked
    assert deploy(stack, 1).state == inference_pb2.DEPLOYMENT_STATE_READY  # the gateway loads with its key
    triton = triton_grpc.InferenceServerClient(stack.triton.spec.address)
    try:
        index = triton.get_model_repository_index(headers={GRPC_CONTROL_KEY_HEADER: key}, as_json=True)
        name = next(m["name"] for m in index["models"] if m.get("state") == "READY")
        x = np.ones((2, 64), np.float32)
        for headers in ({}, {GRPC_CONTROL_KEY_HEADER: "not-the-key"}, {CONTROL_KEY_HEADER: key}):
            with pytest.raises(InferenceServerException, match="restricted"):
                triton.unload_model(name, headers=headers)
            with pytest.raises(InferenceServerException, match="restricted"):
                triton.get_model_repository_index(headers=headers)
        for headers in ({}, {CONTROL_KEY_HEADER: "not-the-key"}):
            status, body = http_post(stack, f"/v2/repository/models/{name}/unload", headers)
            assert status == 403 and "restricted" in body, (status, body)
            assert http_post(stack, "/v2/repository/index", headers)[0] == 403
            assert http_post(stack, f"/v2/repository/models/{name}/load", headers)[0] == 403
        assert triton.is_model_ready(name)  # still serving: health and inference stay open to the gateway
        assert predict(stack, x).served_version.number == 1
        gone = stack.stub().Undeploy(inference_pb2.UndeployRequest(name="digits-v1"), metadata=stack.md())
        assert gone.state == inference_pb2.DEPLOYMENT_STATE_UNLOADED  # the gateway unloads with its key
        wait_for(lambda: not triton.is_model_ready(name), 60, f"{name} is still loaded in Triton")
        assert json.loads(http_post(stack, "/v2/repository/index", {CONTROL_KEY_HEADER: key})[1]) is not None
    finally:
        triton.close()


def test_the_local_cluster_gives_tritons_key_to_the_gateway_alone(tmp_path: Path):
    specs = service_specs(tmp_path, "a" * 32, "redis://127.0.0.1:1/0", "127.0.0.1:2", triton_control_key="k" * 32)
    holders = {s.name for s in specs if s.env.get("MARGIN_TRITON_CONTROL_KEY") == "k" * 32}
    assert holders == {"inference"}
