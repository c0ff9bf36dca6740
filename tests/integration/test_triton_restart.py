"""Inference resilience against a real tritonserver (issue 14, items 5 and 6).

- A Triton restart looks like one to clients: while Triton is down, restarting or getting its deployments back,
  every failed Predict (and every failed PredictStream message) is UNAVAILABLE with a retry hint — never
  FAILED_PRECONDITION "unknown model" — health is NOT_SERVING until the deployments are back, and they are loaded
  in parallel. A model lost behind the gateway's back (a restart between two probes, an unload it did not make)
  is found by the first request, answered UNAVAILABLE, and loaded again.
- A PredictStream answers a bad message with an error for that message and serves the rest.

No timing is asserted (the machine is slow and shared): ``make bench-recovery`` measures the recovery.
"""
from __future__ import annotations

import collections
import os
import queue
import re
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from margin.v1 import common_pb2, inference_pb2

from tests.integration.inference_stack import (
    deploy,
    health,
    inference_stack,
    outputs,
    scripted_mlp,
    tensor,
    upload_model,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
VERSIONS = (1, 2, 3, 4)  # digits v1-v3 come with the stack; v4 is uploaded here
X = np.zeros((1, 64), np.float32)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with inference_stack(tmp_path_factory.mktemp("restart")) as s:
        s.scripted[4] = scripted_mlp(4)
        assert upload_model(s.cluster, "digits", s.scripted[4], s.home / "m4.pt", {}) == 4
        yield s


def request(number: int, x: np.ndarray = X, request_id: str = "", **kw) -> inference_pb2.PredictRequest:
    return inference_pb2.PredictRequest(version=common_pb2.VersionRef(model=kw.pop("model", "digits"), number=number),
                                        inputs=[kw.pop("t", None) or tensor(x)], request_id=request_id, **kw)


def call(stack, number: int, timeout: float = 30) -> inference_pb2.PredictResponse:
    return stack.stub().Predict(request(number), metadata=stack.md(), timeout=timeout)


def serves(stack, number: int) -> bool:
    try:
        call(stack, number, timeout=10)
        return True
    except grpc.RpcError:
        return False


def test_a_bad_message_in_a_stream_gets_its_own_error_and_the_rest_are_served(stack):
    deploy(stack, 1)
    rng = np.random.default_rng(6)
    good = {i: rng.standard_normal((i + 1, 64)).astype(np.float32) for i in (0, 2, 5, 7)}
    messages = [
        request(1, good[0], "r0"),
        request(1, request_id="r1", model="no-such-model"),                               # unknown model
        request(1, good[2], "r2"),
        request(1, request_id="r3", t=tensor(np.zeros((1, 3), np.float32))),             # wrong shape
        request(1, request_id="r4", t=tensor(np.zeros((1, 64), np.int64), dtype=common_pb2.DTYPE_INT64)),  # dtype
        request(1, good[5], "r5"),
        inference_pb2.PredictRequest(version=common_pb2.VersionRef(model="digits", number=1), request_id="r6"),
        request(1, good[7], "r7"),
    ]
    replies = list(stack.stub().PredictStream(iter(messages), metadata=stack.md(), timeout=60))

    assert [r.request_id for r in replies] == [f"r{i}" for i in range(8)]  # every message answered, in order
    errors = {r.request_id: (r.error.code, r.error.message) for r in replies if r.HasField("error")}
    assert set(errors) == {"r1", "r3", "r4", "r6"}, errors
    assert errors["r1"][0] == "NOT_FOUND" and "no-such-model" in errors["r1"][1]
    assert errors["r3"][0] == "INVALID_ARGUMENT" and "input: FP32[-1, 64]" in errors["r3"][1]
    assert errors["r4"][0] == "INVALID_ARGUMENT" and "INT64" in errors["r4"][1]
    assert errors["r6"][0] == "INVALID_ARGUMENT" and "input" in errors["r6"][1]
    for reply in replies:
        if reply.HasField("error"):
            assert not reply.outputs and not reply.deployment  # an error is not an empty output
    for i, x in good.items():
        reply = replies[i]
        assert np.allclose(outputs(reply), stack.scripted[1](torch.from_numpy(x)).detach().numpy(), atol=1e-5)


class Load:
    """Predicts over every deployment from two threads, and a PredictStream fed from a third, until stopped; every
    failure's status code (and retry hint) is kept, and the health status seen between them."""

    def __init__(self, stack, numbers):
        self.stack, self.numbers = stack, numbers
        self.codes: collections.Counter = collections.Counter()
        self.failures: list[tuple[str, str, str | None]] = []  # code, details, retry-after-ms
        self.stream_codes: collections.Counter = collections.Counter()
        self.health: list[int] = []
        self.served = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._feed: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._unary, args=(k,), daemon=True) for k in range(2)]
        self._threads += [threading.Thread(target=self._stream, daemon=True),
                          threading.Thread(target=self._health, daemon=True)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._feed.put(None)
        for thread in self._threads:
            thread.join(60)

    def _unary(self, k: int) -> None:
        turn = k
        while not self._stop.is_set():
            number = self.numbers[turn % len(self.numbers)]
            turn += 1
            try:
                call(self.stack, number)
                with self._lock:
                    self.served += 1
            except grpc.RpcError as err:
                retry = dict(err.trailing_metadata() or ()).get("retry-after-ms")
                with self._lock:
                    self.codes[err.code().name] += 1
                    self.failures.append((err.code().name, err.details(), retry))
                time.sleep(0.05)

    def _stream(self) -> None:
        def messages():
            while (message := self._feed.get()) is not None:
                yield message
        replies = self.stack.stub().PredictStream(messages(), metadata=self.stack.md())
        turn = 0
        try:
            while not self._stop.is_set():
                self._feed.put(request(self.numbers[turn % len(self.numbers)], request_id=str(turn)))
                turn += 1
                reply = next(replies)
                with self._lock:
                    self.stream_codes[reply.error.code or "OK"] += 1
                time.sleep(0.05)
        except grpc.RpcError as err:  # the stream must not end while Triton restarts
            with self._lock:
                self.stream_codes[f"stream ended: {err.code().name} {err.details()}"] += 1

    def _health(self) -> None:
        while not self._stop.is_set():
            try:
                status = health(self.stack)
            except grpc.RpcError:
                status = -1
            if not self.health or self.health[-1] != status:
                self.health.append(status)
            time.sleep(0.05)


def test_a_triton_restart_answers_only_unavailable_and_every_deployment_comes_back_loaded_in_parallel(stack):
    for number in VERSIONS:
        assert deploy(stack, number).state == inference_pb2.DEPLOYMENT_STATE_READY
    triton = stack.triton
    log_start = triton.log_path.stat().st_size
    with Load(stack, VERSIONS) as load:
        wait_for(lambda: load.served >= 8, 60, "the Predict loop served nothing before the kill")
        os.kill(triton.proc.pid, signal.SIGKILL)
        triton.proc.wait()
        triton.start()  # what the local cluster's supervisor does
        triton.wait_healthy(60)
        wait_for(lambda: NOT_SERVING in load.health, 60, "health never turned NOT_SERVING")
        wait_for(lambda: health(stack) == SERVING and all(serves(stack, n) for n in VERSIONS), 180,
                 "the deployments did not all serve again after Triton came back")
        served_after = load.served
        wait_for(lambda: load.served >= served_after + 8, 60, "the Predict loop did not go on serving")

    assert load.codes, "no Predict failed while Triton was down: the kill was not seen"
    assert set(load.codes) == {"UNAVAILABLE"}, load.codes  # never FAILED_PRECONDITION, INTERNAL or UNKNOWN
    assert all(retry is not None and int(retry) > 0 for _, _, retry in load.failures), load.failures[:5]
    assert set(load.stream_codes) <= {"OK", "UNAVAILABLE"}, load.stream_codes  # the stream went on throughout
    assert load.stream_codes["OK"] > 0
    assert load.health[0] == SERVING and NOT_SERVING in load.health and load.health[-1] == SERVING, load.health

    # The restarted Triton got the four deployments loaded at once: all of them were loading before the first
    # finished (one after another, each "loading" line is followed by its "successfully loaded").
    with open(triton.log_path, "rb") as log:
        log.seek(log_start)
        lifecycle = re.findall(r'"(loading: \S+|successfully loaded \S+)"', log.read().decode(errors="replace"))
    first_done = next(i for i, line in enumerate(lifecycle) if line.startswith("successfully"))
    assert len([line for line in lifecycle[:first_done] if line.startswith("loading")]) >= 2, lifecycle


def test_a_model_lost_behind_the_gateways_back_is_unavailable_then_loaded_again(stack):
    """A restart between two probes, or an unload the gateway did not make, leaves a READY deployment that Triton
    does not have: the first request finds it (UNAVAILABLE with a retry hint, not FAILED_PRECONDITION "unknown
    model"), and the gateway loads it again by itself."""
    deploy(stack, 2)
    assert serves(stack, 2)
    name = next(d.triton_name for d in stack.inference.spec.extra["gateway"].deployments.fleet()
                if d.name == "digits-v2")
    stack.inference.spec.extra["pools"].pools[0].client.unload(name)  # through the gateway's own Triton client

    with pytest.raises(grpc.RpcError) as info:
        call(stack, 2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert int(dict(info.value.trailing_metadata())["retry-after-ms"]) > 0
    wait_for(lambda: serves(stack, 2), 120, "the lost model was never loaded again")
    wait_for(lambda: health(stack) == SERVING, 60, "health did not return to SERVING")
    got = stack.stub().GetDeployment(inference_pb2.GetDeploymentRequest(name="digits-v2"), metadata=stack.md())
    assert got.state == inference_pb2.DEPLOYMENT_STATE_READY
