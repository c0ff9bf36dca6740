"""Open Inference Protocol (KServe v2 gRPC, ``inference.GRPCInferenceService``) messages <-> the gateway's domain.

The messages are the ones ``tritonclient`` ships (``tritonclient.grpc.service_pb2``), so Triton's and KServe's
clients work against Margin unchanged. What a request names, in Margin's terms:

- ``model_name`` is the tenant's model; ``model_version`` is empty (the ``production`` alias when the model has it,
  otherwise cost-aware routing), a version number, or an alias.
- Request ``parameters`` carry a routing policy for an empty ``model_version``: ``min_<metric>`` (a quality floor,
  e.g. ``min_accuracy: 0.9``) and ``max_latency_ms``. Triton's ``priority`` and ``timeout`` are accepted and have
  no effect; sequence batching is not offered; anything else is refused, so a misspelt policy is not ignored.
- Tensors travel as ``raw_input_contents`` (what tritonclient sends) or, for clients that use them, typed
  ``contents``; either becomes the same raw bytes. Shared memory is not offered.
- A response names what served it in ``parameters``: :data:`DEPLOYMENT`, :data:`VERSION`, and the request's cost
  estimate :data:`COST_MICROS` (the deployment's served cost per request; the ledger is authoritative).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2

from margin.common import protoconv
from margin.common.errors import InvalidArgument, MarginError, Unimplemented
from margin.inference.deployments import Deployment
from margin.inference.gateway import DEFAULT_ALIAS, Prediction, Target
from margin.inference.routing import Policy
from margin.inference.triton_client import RawTensor
from margin.inference.triton_export import TRITON_DTYPES

DEPLOYMENT, VERSION, COST_MICROS, COMPUTE_US = ("margin.deployment", "margin.version", "margin.cost_micros",
                                                "margin.compute_us")
FLOOR_PREFIX, LATENCY = "min_", "max_latency_ms"
IGNORED_PARAMETERS = frozenset({"priority", "timeout"})
MAX_VERSION = 2**31 - 1
SHARED_MEMORY = "shared_memory_region"
NO_SHARED_MEMORY = ("Margin's gateway offers no shared memory (tenants share it); send tensors in "
                    "raw_input_contents")

# Datatype -> (field of InferTensorContents, numpy dtype) for clients that send typed contents instead of raw bytes.
CONTENTS = {"FP32": ("fp32_contents", np.float32), "FP64": ("fp64_contents", np.float64),
            "INT8": ("int_contents", np.int8), "INT16": ("int_contents", np.int16),
            "INT32": ("int_contents", np.int32), "INT64": ("int64_contents", np.int64),
            "UINT8": ("uint_contents", np.uint8), "BOOL": ("bool_contents", np.bool_)}


# -- requests ----------------------------------------------------------------------------------------------------
def target(model: str, version: str, parameters=None) -> Target:
    """What ``model_name``/``model_version`` name, and for an inference the routing policy in its ``parameters``."""
    if not model:
        raise InvalidArgument("model_name is required: the name of one of your models")
    policy = routing_policy(parameters) if parameters else None
    if not version:
        return Target(model, policy=policy, default_alias=DEFAULT_ALIAS)
    if policy is not None:
        raise InvalidArgument(f"a routing policy ({', '.join(sorted(parameters))}) chooses the version; leave "
                              f"model_version empty, or drop the policy to be served {version!r}")
    if version.isascii() and version.isdigit():
        number = int(version)
        if not 0 < number <= MAX_VERSION:
            raise InvalidArgument(f"model_version {version} is not a version number (1 to {MAX_VERSION})")
        return Target(model, number=number)
    return Target(model, alias=version)


def routing_policy(parameters) -> Policy | None:
    """``min_<metric>`` and ``max_latency_ms`` from request parameters; None when there are none."""
    metric, minimum, latency = "", 0.0, 0.0
    for name, value in parameters.items():
        if name in IGNORED_PARAMETERS:
            continue
        if name.startswith(FLOOR_PREFIX) and len(name) > len(FLOOR_PREFIX):
            if metric:
                raise InvalidArgument(f"one quality floor per request: got {FLOOR_PREFIX}{metric} and {name}")
            metric, minimum = name.removeprefix(FLOOR_PREFIX), _number(name, value)
        elif name == LATENCY:
            latency = _number(name, value)
        elif name.startswith("sequence_"):
            raise InvalidArgument(f"{name}: Margin serves stateless models; sequence batching is not offered")
        else:
            raise InvalidArgument(f"unknown request parameter {name!r}; Margin reads {FLOOR_PREFIX}<metric> (a quality "
                                  f"floor), {LATENCY}, and accepts {', '.join(sorted(IGNORED_PARAMETERS))}")
    if not metric and not latency:
        return None
    return Policy(metric, minimum, latency)


def _number(name: str, value: service_pb2.InferParameter) -> float:
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("double_param", "int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter {name} must be a number, got {kind or 'nothing'}")
    return protoconv.finite(float(getattr(value, kind)), name)


def inputs(req: service_pb2.ModelInferRequest) -> list[RawTensor]:
    """The request's tensors as raw bytes (``raw_input_contents`` as they are, or typed ``contents`` encoded)."""
    if not req.inputs:
        raise InvalidArgument("an inference request needs at least one input tensor")
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs: send one per input, in "
                              "the order of inputs (or none, and typed contents)")
    tensors = []
    for i, t in enumerate(req.inputs):
        if SHARED_MEMORY in t.parameters:
            raise Unimplemented(NO_SHARED_MEMORY)
        tensors.append(RawTensor(t.name, t.datatype, tuple(t.shape), raw[i] if raw else _from_contents(t)))
    return tensors


def _from_contents(t: service_pb2.ModelInferRequest.InferInputTensor) -> bytes:
    count = math.prod(t.shape) if all(d >= 0 for d in t.shape) else -1
    if t.datatype == "BYTES":
        values = list(t.contents.bytes_contents)
        _check_count(t, len(values), count)
        return b"".join(len(v).to_bytes(4, "little") + v for v in values)
    if t.datatype not in CONTENTS:
        raise InvalidArgument(f"input {t.name!r}: {t.datatype or 'no datatype'} cannot travel as typed contents; "
                              "send it in raw_input_contents")
    field, dtype = CONTENTS[t.datatype]
    values = getattr(t.contents, field)
    _check_count(t, len(values), count)
    if np.dtype(dtype).kind in "iu":
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidArgument(f"input {t.name!r}: values outside the range of {t.datatype}")
        return wide.astype(dtype).tobytes()
    return np.asarray(values, dtype=dtype).tobytes()


def _check_count(t, got: int, want: int) -> None:
    if got != want:
        raise InvalidArgument(f"input {t.name!r} of shape {list(t.shape)} has {got} values in contents "
                              f"(raw_input_contents is empty)")


def outputs(req: service_pb2.ModelInferRequest) -> list[str]:
    """The requested output names (empty: every output)."""
    for o in req.outputs:
        if SHARED_MEMORY in o.parameters:
            raise Unimplemented(NO_SHARED_MEMORY)
        if "classification" in o.parameters:
            raise InvalidArgument(f"output {o.name!r}: classification is not offered; ask for the tensor and take "
                                  "its top classes client-side")
    return [o.name for o in req.outputs]


# -- responses ---------------------------------------------------------------------------------------------------
def infer_response(p: Prediction, req: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    d = p.deployment
    reply = service_pb2.ModelInferResponse(
        model_name=req.model_name, model_version=str(d.version), id=req.id,
        outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=o.shape)
                 for o in p.outputs],
        raw_output_contents=[o.raw for o in p.outputs])
    params = reply.parameters
    params[DEPLOYMENT].string_param = d.name
    params[VERSION].int64_param = d.version
    params[COST_MICROS].double_param = p.cost_micros
    params[COMPUTE_US].int64_param = p.compute_us
    return reply


def stream_error(err: MarginError, req: service_pb2.ModelInferRequest | None) -> service_pb2.ModelStreamInferResponse:
    """A stream message that failed: its status and message (what a unary ModelInfer would have answered), and a
    response naming the request's id, so that a client can tell which message it was."""
    reply = service_pb2.ModelStreamInferResponse(error_message=f"{err.code_name}: {err}")
    if req is not None:
        reply.infer_response.id = req.id
        reply.infer_response.model_name = req.model_name
        reply.infer_response.model_version = req.model_version
    return reply


def model_metadata(model: str, served: Deployment, versions: Iterable[int]) -> service_pb2.ModelMetadataResponse:
    """The signature of the version a request would reach (``served``) and every version deployed."""
    def tensors(specs):
        return [service_pb2.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.dtype, shape=s.shape)
                for s in specs]
    return service_pb2.ModelMetadataResponse(name=model, versions=[str(v) for v in sorted(set(versions))],
                                             platform="margin", inputs=tensors(served.signature.inputs),
                                             outputs=tensors(served.signature.outputs))


def model_config(d: Deployment) -> service_pb2.ModelConfigResponse:
    """What a tenant may know of a deployment's Triton configuration: its signature and batching."""
    batch = d.batching.max_batch_size if d.signature.batched else 0

    def dims(shape: Sequence[int]) -> list[int]:
        return list(shape[1:] if batch else shape)
    config = model_config_pb2.ModelConfig(
        name=d.model, platform="margin", max_batch_size=batch,
        input=[model_config_pb2.ModelInput(name=s.name, data_type=_data_type(s.dtype), dims=dims(s.shape))
               for s in d.signature.inputs],
        output=[model_config_pb2.ModelOutput(name=s.name, data_type=_data_type(s.dtype), dims=dims(s.shape))
                for s in d.signature.outputs])
    if batch:
        config.dynamic_batching.max_queue_delay_microseconds = d.batching.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(d.batching.preferred_batch_sizes)
    return service_pb2.ModelConfigResponse(config=config)


def _data_type(dtype: str) -> int:
    return model_config_pb2.DataType.Value(TRITON_DTYPES[dtype])


def repository_index(deployments: Iterable[Deployment], ready_only: bool) -> service_pb2.RepositoryIndexResponse:
    return service_pb2.RepositoryIndexResponse(models=[
        service_pb2.RepositoryIndexResponse.ModelIndex(name=d.model, version=str(d.version), state=d.state,
                                                       reason=d.message)
        for d in deployments if d.state == "READY" or not ready_only])


# -- statistics --------------------------------------------------------------------------------------------------
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")


def model_statistics(d: Deployment, parts: Iterable[service_pb2.ModelStatistics]) -> service_pb2.ModelStatistics:
    """One deployment's statistics, summed over the replicas of its pool (``parts``, Triton's own), under the
    tenant's model name and version number."""
    out = service_pb2.ModelStatistics(name=d.model, version=str(d.version))
    batches: dict[int, service_pb2.InferBatchStatistics] = {}
    for part in parts:
        out.last_inference = max(out.last_inference, part.last_inference)
        out.inference_count += part.inference_count
        out.execution_count += part.execution_count
        _add(out.inference_stats, part.inference_stats, DURATIONS)
        for b in part.batch_stats:
            into = batches.setdefault(b.batch_size, service_pb2.InferBatchStatistics(batch_size=b.batch_size))
            _add(into, b, BATCH_DURATIONS)
    out.batch_stats.extend(batches[size] for size in sorted(batches))
    return out


def _add(into, part, fields: Sequence[str]) -> None:
    for name in fields:
        total, more = getattr(into, name), getattr(part, name)
        total.count += more.count
        total.ns += more.ns
