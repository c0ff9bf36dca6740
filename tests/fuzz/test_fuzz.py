"""Random and garbage messages to every RPC of every service (tests/fuzz/engine.py), bounded and seeded: no INTERNAL
or UNKNOWN, no hang, no restart, and the data created before the campaign reads back the same after it.

``make fuzz`` runs a longer campaign (``MARGIN_FUZZ_EXAMPLES``) and prints the status codes per service.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from margin.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.fuzz.engine import Caller, Rpc, Tally, examples_per_rpc, fuzz_mixed, fuzz_rpc, rpcs
from tests.fuzz.stack import FuzzStack, MissingDependency, fuzz_stack
from tests.fuzz.strategies import MessageStrategies

IN_SUITE_EXAMPLES = 40  # per RPC (and twice that mixed): ~45 RPCs stay inside a minute on 2 shared cores
UNDECODABLE = b"\x0a\xff"  # field 1, length-delimited, its length a varint cut short


@dataclass
class Campaign:
    stack: FuzzStack
    caller: Caller
    messages: MessageStrategies
    before: dict
    processes: dict


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> Iterator[Campaign]:
    with ExitStack() as running:
        try:
            stack = running.enter_context(fuzz_stack(Path(tmp_path_factory.mktemp("fuzz"))))
        except MissingDependency as err:  # no tritonserver or redis-server here
            pytest.skip(str(err))
        caller = stack.caller()
        running.callback(caller.close)
        yield Campaign(stack, caller, stack.messages(), stack.snapshot(), stack.processes())


def test_every_service_of_the_contract_is_fuzzed(campaign):
    served = set(campaign.stack.addresses())
    assert {rpc.service for rpc in rpcs()} <= served, "a margin.v1 service has no server in tests/fuzz/stack.py"


@pytest.mark.parametrize("rpc", rpcs(), ids=str)
def test_an_undecodable_request_is_invalid_argument(campaign, rpc: Rpc):
    """grpc's own answer to a request it cannot decode is INTERNAL (thread-pool servers) or UNKNOWN (asyncio)."""
    messages = (UNDECODABLE,) * (2 if rpc.client_streaming else 1)
    code, details, replies = campaign.caller.call_collecting(rpc, "tenant", messages)
    if code == grpc.StatusCode.PERMISSION_DENIED:  # an admin-only method refuses a tenant before reading
        code, details, replies = campaign.caller.call_collecting(rpc, "admin", messages)
    if code == grpc.StatusCode.OK and rpc.client_streaming and rpc.server_streaming:
        assert len(replies) == 2 and all(b"not a valid" in r for r in replies), (rpc, replies)  # one per message
        return
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc, code, details)
    assert f"not a valid {rpc.input.full_name}" in details, details


@pytest.mark.parametrize("rpc", rpcs(), ids=str)
def test_random_and_garbage_messages_never_get_internal_or_hang(campaign, rpc: Rpc):
    tally = Tally()
    fuzz_rpc(campaign.caller, rpc, campaign.messages, examples_per_rpc(IN_SUITE_EXAMPLES), tally)
    assert not tally.failures, "\n".join(tally.failures[:10])


def test_random_calls_to_every_rpc_mixed_never_get_internal_or_hang(campaign):
    tally = Tally()
    fuzz_mixed(campaign.caller, rpcs(), campaign.messages, 2 * examples_per_rpc(IN_SUITE_EXAMPLES), tally)
    assert not tally.failures, "\n".join(tally.failures[:10])


def test_after_the_campaign_every_server_answers_and_the_earlier_data_is_intact(campaign):
    stack = campaign.stack
    assert stack.processes() == campaign.processes, "redis-server or tritonserver restarted"
    deadline = time.monotonic() + 60
    while set(stack.health().values()) != {health_pb2.HealthCheckResponse.SERVING}:
        assert time.monotonic() < deadline, f"not every service is SERVING: {stack.health()}"
        time.sleep(0.5)
    assert stack.snapshot() == campaign.before


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_routing_policy_is_invalid_argument(campaign, number):
    """A NaN floor would let every version qualify (nothing compares below NaN)."""
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(campaign.stack.inference.server.address))
    md = (("authorization", f"Bearer {campaign.stack.cluster.keys['acme']}"),)
    tensor = common_pb2.Tensor(name="input", dtype=common_pb2.DTYPE_FP32, shape=[1, 64], raw=bytes(256))
    for routing, field in ((inference_pb2.RoutingPolicy(floor=common_pb2.QualityFloor(metric="accuracy",
                                                                                      minimum=number)),
                            "routing.floor.minimum"),
                           (inference_pb2.RoutingPolicy(max_latency_ms=number), "routing.max_latency_ms")):
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(inference_pb2.PredictRequest(version=common_pb2.VersionRef(model="digits"), routing=routing,
                                                      inputs=[tensor]), metadata=md, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()
