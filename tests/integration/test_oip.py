"""The gateway's Open Inference Protocol (``inference.GRPCInferenceService``, KServe v2 gRPC), driven only by Triton's
own client (``tritonclient.grpc`` and ``tritonclient.grpc.aio``) against a real tritonserver, redis-server, registry
and budget service: what a tenant sees of its models, inference with raw tensors and streams, naming a version by
number, alias or routing policy, tenancy, and that coalesced traffic is metered exactly as Triton counts it."""
from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
import tritonclient.grpc.aio as ta
from margin.v1 import common_pb2, inference_pb2, registry_pb2
from tritonclient.utils import InferenceServerException

from tests.integration.inference_stack import (
    SLOW_BATCHING,
    TOKENS_SIGNATURE,
    VOCABULARY,
    MeanEmbedding,
    Stack,
    deploy,
    inference_stack,
    outputs,
    predict,
    scripted_mlp,
    triton_counts,
    triton_model_name,
    upload_model,
    upload_torchscript,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]

INVALID, NOT_FOUND, DENIED = "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "StatusCode.PERMISSION_DENIED"


# -- the stack -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The inference stack with acme's "digits" v1 and v3 deployed, and "other"'s own model "theirs" v1."""
    with inference_stack(tmp_path_factory.mktemp("oip")) as s:
        deploy(s, 1)
        deploy(s, 3)
        s.cluster.client("other").create_model("theirs")
        upload_model(s.cluster, "theirs", scripted_mlp(21), s.home / "theirs.pt", {}, tenant="other")
        deploy(s, 1, tenant="other", model="theirs")
        yield s


@pytest.fixture(scope="module")
def client(stack):
    """Triton's synchronous gRPC client, pointed at the gateway."""
    c = tg.InferenceServerClient(stack.inference.server.address)
    yield c
    c.close()


def headers(stack: Stack, tenant: str = "acme") -> dict[str, str]:
    return {"authorization": f"Bearer {stack.cluster.keys[tenant]}"}


# -- tensors -------------------------------------------------------------------------------------------------------
def rows(n: int, seed: int, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def tensor_input(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> tg.InferInput:
    """A tritonclient input holding ``x`` (sent as raw_input_contents, as tritonclient does)."""
    inp = tg.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def local(module: torch.jit.ScriptModule, x: np.ndarray) -> np.ndarray:
    """What the module answers run here, in this process."""
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def parameter(result: tg.InferResult, name: str):
    """A response parameter's value, whichever kind it is."""
    p = result.get_response().parameters[name]
    return getattr(p, p.WhichOneof("parameter_choice"))


def refusal(call: Callable[[], object]) -> tuple[str, str]:
    """The status and message of the InferenceServerException ``call`` raises."""
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


# -- Triton, called directly ---------------------------------------------------------------------------------------
def direct_triton(stack: Stack, triton_name: str, inputs: list[tg.InferInput], output: str) -> np.ndarray:
    direct = tg.InferenceServerClient(stack.triton.spec.address)
    try:
        return direct.infer(triton_name, inputs).as_numpy(output)
    finally:
        direct.close()


# -- models and aliases --------------------------------------------------------------------------------------------
def set_alias(stack: Stack, model: str, alias: str, number: int) -> None:
    client = stack.cluster.client()
    client.stub.SetAlias(registry_pb2.SetAliasRequest(model=model, alias=alias, number=number),
                         metadata=client.metadata)


def delete_alias(stack: Stack, model: str, alias: str) -> None:
    client = stack.cluster.client()
    client.stub.DeleteAlias(registry_pb2.DeleteAliasRequest(model=model, alias=alias), metadata=client.metadata)


# -- 1. the server -------------------------------------------------------------------------------------------------
def test_server_is_live_and_ready_and_names_margin_with_its_extensions(stack, client):
    h = headers(stack)
    assert client.is_server_live(headers=h)
    wait_for(lambda: client.is_server_ready(headers=h), 60, "the gateway never said it was ready")
    metadata = client.get_server_metadata(headers=h)
    assert metadata.name == "margin"
    assert {"model_configuration", "statistics"} <= set(metadata.extensions), metadata


@pytest.mark.parametrize("h", [{}, {"authorization": "Bearer not-a-key"}], ids=["no key", "unknown key"])
def test_calls_without_a_valid_key_are_unauthenticated(stack, client, h):
    x = rows(1, 0)
    for call in (lambda: client.infer("digits", [tensor_input(x)], headers=h),
                 lambda: client.get_server_metadata(headers=h),
                 lambda: client.get_model_metadata("digits", headers=h)):
        status, message = refusal(call)
        assert status == "StatusCode.UNAUTHENTICATED", message


# -- 2. models: metadata, configuration, readiness, the repository and statistics ----------------------------------
def test_model_metadata_lists_the_deployed_versions_and_the_signature(stack, client):
    metadata = client.get_model_metadata("digits", headers=headers(stack))
    assert metadata.name == "digits" and list(metadata.versions) == ["1", "3"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("logits", "FP32", [-1, 10])]


def test_model_config_has_the_deployments_batching_and_signature(stack, client):
    config = client.get_model_config("digits", "1", headers=headers(stack)).config
    deployment = stack.stub().GetDeployment(inference_pb2.GetDeploymentRequest(name="digits-v1"), metadata=stack.md())
    assert config.max_batch_size == deployment.batching.max_batch_size == 16
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [64])]  # the batch dimension left out
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [10])]


def test_model_is_ready_only_for_a_deployed_version_of_the_callers_own_model(stack, client):
    h = headers(stack)
    assert client.is_model_ready("digits", "1", headers=h)
    assert client.is_model_ready("digits", headers=h)  # some version routing may choose
    assert not client.is_model_ready("digits", "2", headers=h)  # uploaded, never deployed
    assert not client.is_model_ready("theirs", "1", headers=h)  # other's model
    assert client.is_model_ready("theirs", "1", headers=headers(stack, "other"))  # ready for its owner


def test_repository_index_lists_only_the_callers_deployments(stack, client):
    def index(tenant: str, ready: bool = False) -> set[tuple[str, str]]:
        models = client.get_model_repository_index(headers=headers(stack, tenant)).models
        return {(m.name, m.version) for m in models if m.state == "READY" or not ready}

    listed = stack.stub().ListDeployments(inference_pb2.ListDeploymentsRequest(), metadata=stack.md()).deployments
    acme = index("acme")
    assert acme == {(d.version.model, str(d.version.number)) for d in listed}
    assert {("digits", "1"), ("digits", "3")} <= index("acme", ready=True)
    assert not any(name == "theirs" for name, _ in acme)
    assert index("other") == {("theirs", "1")}


def test_inference_statistics_count_the_callers_rows_and_hide_other_tenants_models(stack, client):
    h = headers(stack)

    def count() -> int:
        [stats] = client.get_inference_statistics("digits", "1", headers=h).model_stats
        assert (stats.name, stats.version) == ("digits", "1")  # the tenant's names, not Triton's
        return stats.inference_count

    before = count()
    assert before == triton_counts(stack, triton_model_name(stack, "digits-v1"))[0]
    client.infer("digits", [tensor_input(rows(5, 1))], model_version="1", headers=h)
    client.infer("digits", [tensor_input(rows(2, 2))], model_version="1", headers=h)
    assert count() - before == 7
    status, message = refusal(lambda: client.get_inference_statistics("theirs", headers=h))
    assert status == NOT_FOUND, message


# -- 3. inference with raw tensors ---------------------------------------------------------------------------------
def test_raw_fp32_infer_equals_direct_triton_and_the_torchscript_module(stack, client):
    x = rows(4, 3)
    result = client.infer("digits", [tensor_input(x)], model_version="1", headers=headers(stack))
    got = result.as_numpy("logits")
    triton = direct_triton(stack, triton_model_name(stack, "digits-v1"), [tensor_input(x)], "logits")
    assert got.shape == (4, 10)
    np.testing.assert_array_equal(got, triton)  # the same Triton model: the same bytes
    np.testing.assert_allclose(got, local(stack.scripted[1], x), atol=1e-5)
    assert parameter(result, "margin.deployment") == "digits-v1" and parameter(result, "margin.version") == 1
    assert parameter(result, "margin.cost_micros") > 0 and parameter(result, "margin.compute_us") > 0
    assert result.get_response().model_version == "1"


def test_aio_infer_equals_the_torchscript_module(stack):
    x = rows(3, 4)

    async def infer() -> ta.InferResult:
        aio = ta.InferenceServerClient(stack.inference.server.address)
        try:
            return await aio.infer("digits", [tensor_input(x)], model_version="3", headers=headers(stack))
        finally:
            await aio.close()

    result = asyncio.run(infer())
    np.testing.assert_allclose(result.as_numpy("logits"), local(stack.scripted[3], x), atol=1e-5)
    assert parameter(result, "margin.deployment") == "digits-v3" and parameter(result, "margin.cost_micros") > 0


@pytest.mark.parametrize("data, datatype", [
    (np.zeros((1, 64), np.int64), "INT64"),
    (np.full((1, 64), b"0.5", dtype=object), "BYTES"),
    (np.zeros((1, 64), np.float64), "FP64"),
], ids=["INT64", "BYTES", "FP64"])
def test_a_dtype_the_model_does_not_take_is_invalid_argument_naming_the_expected_one(stack, client, data, datatype):
    status, message = refusal(lambda: client.infer("digits", [tensor_input(data, datatype=datatype)],
                                                   model_version="1", headers=headers(stack)))
    assert status == INVALID, message
    assert datatype in message and "FP32[-1, 64]" in message, message
    # A malformed BYTES payload (lengths that do not add up) is refused by the gateway only for an input whose
    # signature is BYTES; none of the formats Margin serves here takes strings (TorchScript cannot), so there is no
    # such model to send one to.


@pytest.fixture(scope="module")
def tokens(stack) -> str:
    """acme's "tokens" v1 (:class:`MeanEmbedding`: INT64 in, FP32 out) deployed with batching; its Triton name."""
    assert upload_torchscript(stack, "tokens", torch.jit.script(MeanEmbedding()), TOKENS_SIGNATURE) == 1
    assert deploy(stack, 1, model="tokens").state == inference_pb2.DEPLOYMENT_STATE_READY
    return triton_model_name(stack, "tokens-v1")


def test_int64_inputs_reach_a_model_that_takes_them(stack, client, tokens):
    ids = np.random.default_rng(6).integers(0, VOCABULARY, size=(3, 8), dtype=np.int64)
    result = client.infer("tokens", [tensor_input(ids, "tokens", "INT64")], headers=headers(stack))
    got = result.as_numpy("vector")
    assert got.dtype == np.float32 and got.shape == (3, 4)
    np.testing.assert_allclose(got, local(torch.jit.script(MeanEmbedding()), ids), atol=1e-6)
    np.testing.assert_array_equal(got, direct_triton(stack, tokens, [tensor_input(ids, "tokens", "INT64")], "vector"))
    assert parameter(result, "margin.deployment") == "tokens-v1"
    status, message = refusal(lambda: client.infer("tokens", [tensor_input(ids.astype(np.float32), "tokens")],
                                                   headers=headers(stack)))
    assert status == INVALID and "INT64[-1, 8]" in message, message


# -- 4. streams ----------------------------------------------------------------------------------------------------
def test_stream_answers_each_message_in_order_and_goes_on_after_a_bad_one(stack):
    messages = {"good-1": rows(2, 7), "bad": rows(1, 8, width=63), "good-2": rows(3, 9)}
    answers: queue.Queue = queue.Queue()
    streaming = tg.InferenceServerClient(stack.inference.server.address)
    try:
        streaming.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers(stack))
        for request_id, x in messages.items():
            streaming.async_stream_infer("digits", [tensor_input(x)], model_version="1", request_id=request_id)
        replies = [answers.get(timeout=60) for _ in messages]
        streaming.stop_stream()
    finally:
        streaming.close()
    (first, no_error), (no_result, error), (third, no_error_either) = replies
    assert no_error is None and no_error_either is None and no_result is None
    assert "INVALID_ARGUMENT" in error.message() and "[1, 63]" in error.message(), error.message()
    for result, request_id in ((first, "good-1"), (third, "good-2")):
        assert result.get_response().id == request_id
        np.testing.assert_allclose(result.as_numpy("logits"), local(stack.scripted[1], messages[request_id]),
                                   atol=1e-5)


# -- 5. naming a version: number, alias, the production alias, routing ---------------------------------------------
def served_version(client, stack: Stack, model: str, version: str = "", **parameters) -> int:
    result = client.infer(model, [tensor_input(rows(1, 10))], model_version=version, headers=headers(stack),
                          parameters=parameters or None)
    assert result.get_response().model_version == str(parameter(result, "margin.version"))
    return parameter(result, "margin.version")


def test_an_alias_as_model_version_is_served_by_its_version(stack, client):
    set_alias(stack, "digits", "canary", 3)
    assert served_version(client, stack, "digits", "canary") == 3
    status, message = refusal(lambda: served_version(client, stack, "digits", "nightly"))
    assert status == NOT_FOUND and "nightly" in message, message


@pytest.fixture(scope="module")
def named(stack) -> str:
    """acme's model "named": v1 (accuracy 0.99) on nvidia-h100, priced ~70x v2 (accuracy 0.90) on cpu — both
    served by the one Triton, so v2 is the cheaper as served whatever the machine's speed. Its own model, so that
    its production alias changes no other test's routing."""
    stack.cluster.client().create_model("named")
    for number, (seed, accuracy) in enumerate([(31, 0.99), (32, 0.90)], start=1):
        upload_model(stack.cluster, "named", scripted_mlp(seed), stack.home / f"named{number}.pt",
                     {"accuracy": accuracy})
    deploy(stack, 1, model="named", device_class="nvidia-h100")
    deploy(stack, 2, model="named", device_class="cpu")
    return "named"


def test_empty_version_is_the_production_alias_when_set_else_the_cheapest_as_served(stack, client, named):
    assert served_version(client, stack, named) == 2
    set_alias(stack, named, "production", 1)
    try:  # the gateway caches an alias for a few seconds: wait for it to see the new one
        wait_for(lambda: served_version(client, stack, named) == 1, 60, "production alias was never followed")
    finally:
        delete_alias(stack, named, "production")
    wait_for(lambda: served_version(client, stack, named) == 2, 60, "routing did not return after the alias went")


def test_a_quality_floor_routes_to_the_cheapest_version_that_meets_it(stack, client, named):
    assert served_version(client, stack, "digits", min_accuracy=0.95) == 1  # v3 has 0.90
    assert served_version(client, stack, named, min_accuracy=0.95) == 1  # the expensive one: the only one that meets
    assert served_version(client, stack, named, min_accuracy=0.5) == 2
    status, message = refusal(lambda: served_version(client, stack, "digits", min_accuracy=0.99))
    assert status == "StatusCode.FAILED_PRECONDITION" and "digits-v1" in message and "0.97" in message, message


@pytest.mark.parametrize("version, parameters, fragment", [
    ("", {"fastest": True}, "unknown request parameter 'fastest'"),
    ("", {"min_accuracy": "high"}, "must be a number"),
    ("", {"min_accuracy": 0.9, "min_f1": 0.5}, "one quality floor"),
    ("1", {"min_accuracy": 0.9}, "leave model_version empty"),
    ("0", {}, "not a version number"),
], ids=["unknown parameter", "floor not a number", "two floors", "version and policy", "version 0"])
def test_a_bad_version_or_routing_parameter_is_invalid_argument(stack, client, version, parameters, fragment):
    status, message = refusal(lambda: served_version(client, stack, "digits", version, **parameters))
    assert status == INVALID and fragment in message, message


# -- 6. tenancy ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["", "1"])
def test_another_tenants_model_is_not_found_exactly_like_a_missing_one(stack, client, version):
    h = headers(stack, "other")

    def answer(model: str) -> tuple[str, str]:
        status, message = refusal(lambda: client.infer(model, [tensor_input(rows(1, 11))], model_version=version,
                                                       headers=h))
        return status, message.replace(model, "<model>")

    assert answer("digits") == answer("no-such-model")
    assert answer("digits")[0] == NOT_FOUND


def test_the_admin_key_is_permission_denied(stack, client):
    h = {"authorization": f"Bearer {stack.cluster.admin_key}"}
    for call in (lambda: client.infer("digits", [tensor_input(rows(1, 12))], headers=h),
                 lambda: client.get_model_metadata("digits", headers=h),
                 lambda: client.get_model_repository_index(headers=h)):
        status, message = refusal(call)
        assert status == DENIED and "tenant" in message, message


REFUSED = {
    "load_model": (lambda c, h: c.load_model("digits", headers=h), DENIED, "Deploy"),
    "unload_model": (lambda c, h: c.unload_model("digits", headers=h), DENIED, "Undeploy"),
    "system shared memory status": (lambda c, h: c.get_system_shared_memory_status(headers=h),
                                    "StatusCode.UNIMPLEMENTED", "raw_input_contents"),
    "register system shared memory": (lambda c, h: c.register_system_shared_memory("r", "/r", 64, headers=h),
                                      "StatusCode.UNIMPLEMENTED", "raw_input_contents"),
    "cuda shared memory status": (lambda c, h: c.get_cuda_shared_memory_status(headers=h),
                                  "StatusCode.UNIMPLEMENTED", "raw_input_contents"),
    "trace settings": (lambda c, h: c.get_trace_settings(headers=h), DENIED, "operator"),
    "update trace settings": (lambda c, h: c.update_trace_settings(settings={"trace_rate": "1"}, headers=h), DENIED,
                              "operator"),
    "log settings": (lambda c, h: c.get_log_settings(headers=h), DENIED, "operator"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_calls_on_the_shared_server_are_refused_saying_what_to_use(stack, client, case):
    call, expected, fragment = REFUSED[case]
    status, message = refusal(lambda: call(client, headers(stack)))
    assert status == expected and fragment in message, message


def test_an_input_in_shared_memory_is_unimplemented(stack, client):
    inp = tg.InferInput("input", [1, 64], "FP32")
    inp.set_shared_memory("region", 256)
    status, message = refusal(lambda: client.infer("digits", [inp], model_version="1", headers=headers(stack)))
    assert status == "StatusCode.UNIMPLEMENTED" and "raw_input_contents" in message, message


# -- 7. metering and coalescing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fresh:
    triton_name: str
    module: torch.jit.ScriptModule


@pytest.fixture(scope="module")
def metered(stack) -> Fresh:
    """acme's fresh model "metered" v1, deployed so that each call to Triton waits up to 100 ms for Triton's batch
    to fill: the gateway's call in flight (one per model instance and replica) stays busy while the concurrent
    requests arrive, so they wait in the coalescer's lane and share calls however fast the machine is. (Deploy's
    latency less that queue delay is the model's own: fast, so it is coalesced.)"""
    stack.cluster.client().create_model("metered")
    module = scripted_mlp(41)
    upload_model(stack.cluster, "metered", module, stack.home / "metered.pt", {})
    deployment = stack.stub().Deploy(inference_pb2.DeployRequest(
        version=common_pb2.VersionRef(model="metered", number=1), batching=SLOW_BATCHING), metadata=stack.md())
    assert deployment.state == inference_pb2.DEPLOYMENT_STATE_READY
    return Fresh(triton_model_name(stack, "metered-v1"), module)


async def send_concurrently(stack: Stack, oip_inputs: list[np.ndarray], predict_inputs: list[np.ndarray],
                            bad: np.ndarray) -> tuple[list, InferenceServerException, list]:
    """Every OIP request (tritonclient.grpc.aio), the bad one among them, and the Margin Predicts, all at once:
    (the OIP outputs, the bad one's error, the Predict outputs), each in its input's order."""
    aio = ta.InferenceServerClient(stack.inference.server.address)
    h = headers(stack)

    async def oip(x: np.ndarray) -> np.ndarray:
        return (await aio.infer("metered", [tensor_input(x)], model_version="1", headers=h)).as_numpy("logits")

    async def refused(x: np.ndarray) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as info:
            await oip(x)
        return info.value

    async def margin(x: np.ndarray) -> np.ndarray:
        return outputs(await asyncio.to_thread(predict, stack, x, 1, model="metered"))

    half = len(oip_inputs) // 2
    try:
        results = await asyncio.gather(*map(oip, oip_inputs[:half]), refused(bad), *map(oip, oip_inputs[half:]),
                                       *map(margin, predict_inputs))
    finally:
        await aio.close()
    return results[:half] + results[half + 1:len(oip_inputs) + 1], results[half], results[len(oip_inputs) + 1:]


def test_concurrent_requests_are_coalesced_kept_apart_and_metered_as_triton_counts(stack, metered):
    gateway, meter, name = stack.inference.spec.extra["gateway"], stack.inference.spec.extra["meter"], \
        metered.triton_name
    triton_before, meter_before, coalescing_before = triton_counts(stack, name), meter.served(name), \
        gateway.coalescer.stats()
    oip_inputs = [rows(1 + i % 3, 100 + i) for i in range(200)]
    predict_inputs = [rows(1 + i % 3, 400 + i) for i in range(16)]
    oip_out, bad, predict_out = asyncio.run(send_concurrently(stack, oip_inputs, predict_inputs,
                                                              rows(2, 99, width=63)))

    for x, got in zip(oip_inputs + predict_inputs, oip_out + predict_out, strict=True):
        np.testing.assert_allclose(got, local(metered.module, x), atol=1e-5)  # each request its own rows, none mixed up
    assert bad.status() == INVALID and "[2, 63]" in bad.message(), bad.message()

    sent = len(oip_inputs) + len(predict_inputs)
    sent_rows = sum(len(x) for x in oip_inputs + predict_inputs)
    requests, metered_rows = (now - then for now, then in zip(meter.served(name), meter_before, strict=True))
    inferences, executions = (now - then for now, then in zip(triton_counts(stack, name), triton_before,
                                                              strict=True))
    assert requests == sent
    assert metered_rows == inferences == sent_rows
    after = gateway.coalescer.stats()
    upstream, coalesced = after.upstream - coalescing_before.upstream, after.coalesced - coalescing_before.coalesced
    assert after.requests - coalescing_before.requests == sent  # the bad one never reached the coalescer
    assert coalesced > 0 and upstream < sent, after
    assert executions <= upstream  # Triton's batches: at most one per call the gateway made
