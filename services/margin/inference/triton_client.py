"""A lean client for Triton's KServe v2 gRPC API: tensors pass through as raw bytes, no numpy on the way.

The gateway's hot path builds ``ModelInferRequest`` messages straight from the caller's raw tensor
bytes over one long-lived channel; control calls (load, unload, readiness) use the same stub.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from margin.common import config
from margin.common.errors import FailedPrecondition, Unavailable

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# What a Triton started with a control key (config.TRITON_CONTROL_KEY) answers only with the key in this header:
# model control and the server's own settings (tritonserver --grpc-restricted-protocol / --http-restricted-api).
# Over gRPC, Triton expects the header with its own prefix (and refuses a call without it as UNAVAILABLE).
CONTROL_KEY_HEADER = "margin-triton-key"
GRPC_CONTROL_KEY_HEADER = f"triton-grpc-protocol-{CONTROL_KEY_HEADER}"
RESTRICTED_PROTOCOLS = "model-repository,shared-memory,trace,logging"


@dataclass(frozen=True)
class ModelCounters:
    """Triton's cumulative counters for one model (all its versions) on one replica, since it was loaded."""
    compute_ns: int   # execution time: compute input + infer + output, per batch executed (not per request)
    executions: int   # batches executed
    inferences: int   # rows inferred (Triton's inference_count: a batch of n rows is n, however it arrived)


class RawTensor(NamedTuple):
    """One tensor as it travels: its bytes are never decoded on the way (a named tuple: made per request, cheaply)."""
    name: str
    datatype: str           # Triton/KServe datatype string: FP32, INT64, BYTES, ...
    shape: tuple[int, ...]
    raw: bytes


class TritonClient:
    def __init__(self, url: str, infer_timeout_s: float = 30.0, control_key: str | None = None):
        self.url = url
        self.infer_timeout_s = infer_timeout_s
        key = control_key if control_key is not None else config.TRITON_CONTROL_KEY.raw()
        self._control = ((GRPC_CONTROL_KEY_HEADER, key),) if key else ()  # sent on model control calls only
        self._channel = grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._aio_channel: grpc.aio.Channel | None = None
        self._aio_stub = None

    def close(self) -> None:
        self._channel.close()

    # -- health and control ----------------------------------------------------------------------
    def server_ready(self, timeout: float = 0.5) -> bool:
        try:
            return self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout).ready
        except grpc.RpcError:
            return False

    def model_ready(self, name: str, timeout: float = 1.0) -> bool:
        try:
            return self._stub.ModelReady(service_pb2.ModelReadyRequest(name=name), timeout=timeout).ready
        except grpc.RpcError:
            return False

    def _check_control(self, err: grpc.RpcError) -> None:
        """A model control call Triton refused for want of the key: a configuration error, not an outage."""
        if "restricted" in (err.details() or ""):
            raise FailedPrecondition(f"Triton at {self.url} refused model control: it needs the key in "
                                     f"{config.TRITON_CONTROL_KEY.env}, which this gateway "
                                     f"{'holds wrong' if self._control else 'does not hold'}") from None

    def load(self, name: str, wait_s: float = 120.0) -> None:
        """Load (or reload) a model from the repository and wait until it is ready."""
        try:
            self._stub.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name=name), timeout=wait_s,
                                           metadata=self._control)
        except grpc.RpcError as err:
            self._check_control(err)
            if err.code() in UNAVAILABLE_CODES:
                raise Unavailable(f"Triton at {self.url} is unreachable") from None
            raise FailedPrecondition(f"Triton could not load {name}: {err.details()}") from None
        deadline = time.monotonic() + wait_s
        while not self.model_ready(name):
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"{name} was loaded but not ready after {wait_s:.0f}s")
            time.sleep(0.05)

    def unload(self, name: str) -> None:
        try:
            self._stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name=name), timeout=30,
                                             metadata=self._control)
        except grpc.RpcError as err:
            self._check_control(err)
            if err.code() in UNAVAILABLE_CODES:
                raise Unavailable(f"Triton at {self.url} is unreachable") from None
            raise FailedPrecondition(f"Triton could not unload {name}: {err.details()}") from None

    def model_statistics(self, timeout: float = 2.0) -> dict[str, ModelCounters]:
        """Every loaded model's counters (``ModelStatistics``); an unloaded model has none, a reloaded one starts
        from zero. :class:`Unavailable` when the replica does not answer."""
        try:
            reply = self._stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=""), timeout=timeout)
        except grpc.RpcError as err:
            raise Unavailable(f"Triton at {self.url}: no statistics ({err.details()})") from None
        found: dict[str, ModelCounters] = {}
        for m in reply.model_stats:
            if m.batch_stats:
                compute = sum(b.compute_input.ns + b.compute_infer.ns + b.compute_output.ns for b in m.batch_stats)
            else:  # no batch statistics: one execution per request
                i = m.inference_stats
                compute = i.compute_input.ns + i.compute_infer.ns + i.compute_output.ns
            before = found.get(m.name, ModelCounters(0, 0, 0))
            found[m.name] = ModelCounters(before.compute_ns + compute, before.executions + m.execution_count,
                                          before.inferences + m.inference_count)
        return found

    def statistics(self, model: str, timeout: float = 2.0) -> list[service_pb2.ModelStatistics]:
        """Triton's ``ModelStatistics`` of one model (every loaded version); none when it is not loaded here."""
        try:
            return list(self._stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=model),
                                                   timeout=timeout).model_stats)
        except grpc.RpcError:
            return []

    # -- inference -------------------------------------------------------------------------------
    def infer(self, model: str, inputs: Sequence[RawTensor], outputs: Sequence[str]) -> list[RawTensor]:
        try:
            reply = self._stub.ModelInfer(_request(model, inputs, outputs), timeout=self.infer_timeout_s)
        except grpc.RpcError as err:
            raise _infer_error(model, err) from None
        return _outputs(reply)

    async def infer_async(self, model: str, inputs: Sequence[RawTensor], outputs: Sequence[str]) -> list[RawTensor]:
        """The same call on the caller's event loop (one asyncio channel per loop, reused)."""
        if self._aio_stub is None:
            self._aio_channel = grpc.aio.insecure_channel(self.url, options=CHANNEL_OPTIONS)
            self._aio_stub = service_pb2_grpc.GRPCInferenceServiceStub(self._aio_channel)
        try:
            reply = await self._aio_stub.ModelInfer(_request(model, inputs, outputs), timeout=self.infer_timeout_s)
        except grpc.RpcError as err:
            raise _infer_error(model, err) from None
        return _outputs(reply)


def _request(model: str, inputs: Sequence[RawTensor], outputs: Sequence[str]) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(
        model_name=model,
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in inputs],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
        raw_input_contents=[t.raw for t in inputs])


def _outputs(reply: service_pb2.ModelInferResponse) -> list[RawTensor]:
    return [RawTensor(o.name, o.datatype, tuple(o.shape), raw)
            for o, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)]


class ModelNotLoaded(Unavailable):
    """Triton has no ready model of that name ("unknown model"): a replica that restarted (explicit model control
    starts empty), one still loading its deployments, or a route gone stale; whoever routed the request decides
    which (:meth:`margin.inference.replicas.TritonReplicas.infer_async`, :class:`margin.inference.gateway.Gateway`).
    ``replica`` is the Triton that said so."""

    def __init__(self, message: str, replica: TritonClient | None = None, retry_after_s: float | None = None):
        super().__init__(message, retry_after_s)
        self.replica = replica


def _infer_error(model: str, err: grpc.RpcError) -> Exception:
    if err.code() in UNAVAILABLE_CODES:
        return Unavailable(f"Triton is unreachable: {err.details()}")
    if err.code() == grpc.StatusCode.NOT_FOUND or "unknown model" in (err.details() or ""):
        return ModelNotLoaded(f"Triton has no model {model} loaded: {err.details()}")
    return FailedPrecondition(f"Triton refused the request for {model}: {err.details()}")
