"""Deploy probes the model: a version whose declared outputs are not what the model returns is refused with
FAILED_PRECONDITION naming both, and nothing of it stays loaded or READY (a real tritonserver, registry, gateway)."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from margin.common.protoconv import signature_to_proto
from margin.common.tensors import Signature, TensorSpec
from margin.v1 import inference_pb2, registry_pb2

from tests.integration.inference_stack import Stack, code_of, deploy, inference_stack, predict, scripted_mlp

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]

INPUT = TensorSpec("input", "FP32", (-1, 64))  # scripted_mlp: FP32[batch, 64] -> FP32[batch, 10]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with inference_stack(tmp_path_factory.mktemp("probe")) as s:
        yield s


def upload(stack: Stack, model: str, outputs: tuple[TensorSpec, ...]) -> int:
    """scripted_mlp(0) as a new version of ``model`` (created when missing), registered with ``outputs``."""
    client = stack.cluster.client()
    if model not in [m.name for m in client.stub.ListModels(registry_pb2.ListModelsRequest(),
                                                            metadata=client.metadata).models]:
        client.create_model(model)
    path = stack.home / f"{model}.pt"
    scripted_mlp(0).save(str(path))
    return client.upload_file(path, registry_pb2.UploadMetadata(
        model=model, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
        signature=signature_to_proto(Signature((INPUT,), outputs)))).number


def triton_name(stack: Stack, name: str) -> str:
    tenant_id = stack.inference.context.tenants.authenticate(stack.cluster.keys["acme"]).tenant_id
    return f"t{tenant_id}--{name}"


def loaded_in_triton(stack: Stack, name: str) -> bool:
    client = triton_grpc.InferenceServerClient(stack.triton.spec.address)
    try:
        return bool(client.is_model_ready(triton_name(stack, name)))
    finally:
        client.close()


WRONG = {
    "3 columns declared, 10 returned": ((TensorSpec("logits", "FP32", (-1, 3)),),
                                        ["declared output logits: FP32[-1, 3]", "returned logits: FP32[1, 10]"]),
    "rank 3 declared, rank 2 returned": ((TensorSpec("logits", "FP32", (-1, 10, 1)),),
                                         ["declared output logits: FP32[-1, 10, 1]", "returned logits: FP32[1, 10]"]),
    "int64 declared, float32 returned": ((TensorSpec("logits", "INT64", (-1, 10)),),
                                         ["the model returned float32", "declares INT64"]),
    "a second output the model lacks": ((TensorSpec("logits", "FP32", (-1, 10)), TensorSpec("probs", "FP32", (-1, 10))),
                                        ["1 output(s)", "probs"]),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_a_version_whose_declared_outputs_are_not_the_models_is_refused_and_nothing_stays_loaded(stack, case):
    outputs, fragments = WRONG[case]
    model = "wrong-" + "-".join(case.split()[:2]).replace(",", "")
    number = upload(stack, model, outputs)
    name = f"{model}-v{number}"

    code, details = code_of(lambda: deploy(stack, number, model=model))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert all(f in details for f in fragments), details

    got = stack.stub().GetDeployment(inference_pb2.GetDeploymentRequest(name=name), metadata=stack.md())
    assert got.state == inference_pb2.DEPLOYMENT_STATE_FAILED and fragments[0] in got.message
    assert not loaded_in_triton(stack, name)
    assert not (stack.settings.repository / triton_name(stack, name)).exists()
    code, _ = code_of(lambda: predict(stack, np.zeros((1, 64), np.float32), number=number, model=model))
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


def test_the_same_model_registered_with_its_true_signature_deploys_ready(stack):
    model = "probed"
    wrong = upload(stack, model, (TensorSpec("logits", "FP32", (-1, 3)),))
    assert code_of(lambda: deploy(stack, wrong, model=model))[0] == grpc.StatusCode.FAILED_PRECONDITION
    right = upload(stack, model, (TensorSpec("logits", "FP32", (-1, 10)),))
    d = deploy(stack, right, model=model)
    assert d.state == inference_pb2.DEPLOYMENT_STATE_READY and loaded_in_triton(stack, d.name)
    out = predict(stack, np.zeros((2, 64), np.float32), number=right, model=model).outputs[0]
    assert list(out.shape) == [2, 10]
