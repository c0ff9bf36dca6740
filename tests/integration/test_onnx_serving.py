"""Deploy serves ONNX versions: models built and exported to ONNX here (``torch.onnx.export``), uploaded through the
registry with their signatures, deployed with dynamic batching on a real tritonserver (the python backend running
the ONNX file with onnxruntime) and asked through the gateway, whose answers must be onnxruntime's own on the same
inputs. A version without a usable signature is refused before anything is saved, saying how to register one."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
import torch
from margin.common.protoconv import signature_to_proto
from margin.common.tensors import Signature, TensorSpec
from margin.v1 import common_pb2, inference_pb2, registry_pb2

from tests.byom_models import ONNX_EXPORT_WARNINGS
from tests.integration.inference_stack import (
    SLOW_BATCHING,
    TOKENS_SIGNATURE,
    VOCABULARY,
    MeanEmbedding,
    Stack,
    code_of,
    inference_stack,
    outputs,
    predict,
    scripted_mlp,
    tensor,
    triton_counts,
    triton_model_name,
    upload_torchscript,
)

pytestmark = [pytest.mark.slow, *ONNX_EXPORT_WARNINGS]

MLP_SIGNATURE = Signature((TensorSpec("x", "FP32", (-1, 16)),), (TensorSpec("scores", "FP32", (-1, 5)),))
ORT_TOLERANCE = 1e-6    # the same graph and runtime: equal up to float rounding of another batch size
TORCH_TOLERANCE = 1e-5  # torch runs its own kernels


@dataclass(frozen=True)
class Served:
    """An ONNX version deployed through the gateway, with the torch module it came from and an onnxruntime session
    on the very file that was uploaded."""
    model: str
    number: int
    module: torch.nn.Module
    session: onnxruntime.InferenceSession
    signature: Signature

    def expected(self, x: np.ndarray) -> np.ndarray:
        """What onnxruntime answers here, in this process."""
        return self.session.run([self.signature.outputs[0].name], {self.signature.inputs[0].name: x})[0]

    def torch_answer(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(x)).numpy()


def mlp() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).eval()


def export_onnx(module: torch.nn.Module, example: torch.Tensor, signature: Signature, path: Path) -> Path:
    """``module`` as an ONNX file whose input and output are named as ``signature`` says, batch dimension dynamic."""
    names = [signature.inputs[0].name, signature.outputs[0].name]
    torch.onnx.export(module, (example,), str(path), input_names=names[:1], output_names=names[1:],
                      dynamic_axes={name: {0: "batch"} for name in names}, dynamo=False)
    return path


def upload_onnx(stack: Stack, model: str, path: Path, signature: Signature) -> int:
    """Upload ``path`` as an ONNX version of ``model`` (created here) with ``signature``."""
    client = stack.cluster.client()
    client.ensure_model(model)
    return client.upload_file(path, registry_pb2.UploadMetadata(
        model=model, format=registry_pb2.ARTIFACT_FORMAT_ONNX, signature=signature_to_proto(signature))).number


def serve(stack: Stack, model: str, module: torch.nn.Module, example: torch.Tensor, signature: Signature) -> Served:
    """Export, upload and deploy ``module`` (batching with a long queue delay, so concurrent requests share
    Triton's batches however fast the machine is); the deployment must be READY."""
    path = export_onnx(module, example, signature, stack.home / f"{model}.onnx")
    number = upload_onnx(stack, model, path, signature)
    deployment = stack.stub().Deploy(inference_pb2.DeployRequest(
        version=common_pb2.VersionRef(model=model, number=number), batching=SLOW_BATCHING), metadata=stack.md())
    assert deployment.state == inference_pb2.DEPLOYMENT_STATE_READY, deployment.message
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return Served(model, number, module, session, signature)


def ask(stack: Stack, served: Served, x: np.ndarray, dtype: int = common_pb2.DTYPE_FP32) -> np.ndarray:
    """The gateway's answer to one Predict of ``x``; its output must be named as the signature says."""
    response = predict(stack, x, served.number, model=served.model,
                       t=tensor(x, served.signature.inputs[0].name, dtype))
    assert [o.name for o in response.outputs] == [served.signature.outputs[0].name]
    return outputs(response)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with inference_stack(tmp_path_factory.mktemp("onnx")) as s:
        yield s


@pytest.fixture(scope="module")
def served_mlp(stack) -> Served:
    return serve(stack, "onnx-mlp", mlp(), torch.zeros(1, 16), MLP_SIGNATURE)


@pytest.fixture(scope="module")
def served_tokens(stack) -> Served:
    return serve(stack, "onnx-tokens", MeanEmbedding().eval(), torch.zeros(1, 8, dtype=torch.int64), TOKENS_SIGNATURE)


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def test_an_onnx_mlp_answers_as_onnxruntime_does(stack, served_mlp):
    for n in (1, 3, 16):
        x = rows(n, n)
        got = ask(stack, served_mlp, x)
        assert got.shape == (n, 5)
        np.testing.assert_allclose(got, served_mlp.expected(x), rtol=0, atol=ORT_TOLERANCE)
        np.testing.assert_allclose(got, served_mlp.torch_answer(x), rtol=0, atol=TORCH_TOLERANCE)
    assert (ask(stack, served_mlp, -np.abs(rows(2, 9))) != 0).any()  # not a model whose ReLU zeroed everything


def test_an_onnx_model_over_int64_token_ids_answers_as_onnxruntime_does(stack, served_tokens):
    tokens = np.random.default_rng(7).integers(0, VOCABULARY, (4, 8), dtype=np.int64)
    got = ask(stack, served_tokens, tokens, common_pb2.DTYPE_INT64)
    assert got.shape == (4, 4)
    np.testing.assert_allclose(got, served_tokens.expected(tokens), rtol=0, atol=ORT_TOLERANCE)
    np.testing.assert_allclose(got, served_tokens.torch_answer(tokens), rtol=0, atol=TORCH_TOLERANCE)


def test_concurrent_requests_share_triton_batches_and_each_gets_its_own_rows(stack, served_mlp):
    name = triton_model_name(stack, f"{served_mlp.model}-v{served_mlp.number}")
    inputs = [rows(1 + i % 3, 100 + i) for i in range(12)]
    inferences_before, executions_before = triton_counts(stack, name)
    with ThreadPoolExecutor(len(inputs)) as pool:
        answers = list(pool.map(lambda x: ask(stack, served_mlp, x), inputs))
    for x, got in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(got, served_mlp.expected(x), rtol=0, atol=ORT_TOLERANCE)
    inferences_after, executions_after = triton_counts(stack, name)
    assert inferences_after - inferences_before == sum(len(x) for x in inputs)
    assert executions_after - executions_before < len(inputs)  # coalesced into shared forward passes


def refusal_of(stack: Stack, model: str, signature: Signature) -> str:
    """Deploy (with batching) a TorchScript MLP registered as ``model`` with ``signature``: it must be refused with
    FAILED_PRECONDITION, leaving no deployment; returns the message."""
    number = upload_torchscript(stack, model, scripted_mlp(0), signature)
    code, details = code_of(lambda: stack.stub().Deploy(inference_pb2.DeployRequest(
        version=common_pb2.VersionRef(model=model, number=number), batching=SLOW_BATCHING), metadata=stack.md()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    code, _ = code_of(lambda: stack.stub().GetDeployment(
        inference_pb2.GetDeploymentRequest(name=f"{model}-v{number}"), metadata=stack.md()))
    assert code == grpc.StatusCode.NOT_FOUND
    return details


def test_a_version_without_a_signature_is_refused_saying_how_to_register_one(stack):
    details = refusal_of(stack, "unsigned", Signature())
    assert "has no signature" in details and "register a signature" in details, details
    assert "margin versions upload unsigned FILE --format torchscript --signature sig.json" in details, details
    assert "max_batch_size" not in details, details


def test_an_unbatched_signature_is_refused_saying_to_register_a_batched_one_before_max_batch_size_0(stack):
    unbatched = Signature((TensorSpec("input", "FP32", (1, 64)),), (TensorSpec("logits", "FP32", (1, 10)),))
    details = refusal_of(stack, "unbatched", unbatched)
    assert "has no batch dimension" in details and "--signature sig.json" in details, details
    assert details.index("register a signature") < details.index("max_batch_size 0"), details
