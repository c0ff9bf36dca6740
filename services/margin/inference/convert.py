"""margin.v1 inference messages <-> the gateway's domain objects."""
from __future__ import annotations

from margin.common import protoconv
from margin.common.errors import InvalidArgument, MarginError
from margin.inference.deployments import Batching, Deployment, DeploySpec
from margin.inference.gateway import Prediction, Target
from margin.inference.routing import Policy
from margin.inference.triton_client import RawTensor
from margin.v1 import common_pb2, inference_pb2

STATES = {"LOADING": inference_pb2.DEPLOYMENT_STATE_LOADING, "READY": inference_pb2.DEPLOYMENT_STATE_READY,
          "FAILED": inference_pb2.DEPLOYMENT_STATE_FAILED, "UNLOADED": inference_pb2.DEPLOYMENT_STATE_UNLOADED,
          "SCALED_TO_ZERO": inference_pb2.DEPLOYMENT_STATE_SCALED_TO_ZERO}


def deploy_spec(req: inference_pb2.DeployRequest) -> DeploySpec:
    b = req.batching
    batching = Batching(b.max_batch_size, tuple(b.preferred_batch_sizes), b.max_queue_delay_microseconds) \
        if req.HasField("batching") else Batching()
    minimum = req.min_replicas if req.HasField("min_replicas") else 1
    return DeploySpec(model=req.version.model, number=req.version.number, alias=req.version.alias,
                      device_class=req.device_class or "cpu", instances=req.instances or 1, batching=batching,
                      min_replicas=minimum, max_replicas=req.max_replicas or max(minimum, 1),
                      scale_to_zero_after_s=req.scale_to_zero_after_seconds)


def deployment_to_proto(d: Deployment, served: tuple[int, str] | None = None,
                        allocated: int | None = None) -> inference_pb2.Deployment:
    """``served``: the deployment's served cost per million and its source; ``allocated``: its allocated cost per
    million requests lately (:mod:`margin.inference.served_cost`)."""
    served_micros, source = served or (d.cost_per_million_micros, "deploy")
    msg = inference_pb2.Deployment(
        name=d.name, version=common_pb2.VersionRef(model=d.model, number=d.version), state=STATES[d.state],
        device_class=d.device_class, instances=d.instances,
        batching=inference_pb2.BatchingConfig(max_batch_size=d.batching.max_batch_size,
                                              preferred_batch_sizes=d.batching.preferred_batch_sizes,
                                              max_queue_delay_microseconds=d.batching.max_queue_delay_us),
        price_per_hour=protoconv.money(d.price_micros_per_hour), capacity_rps=d.capacity_rps,
        cost_per_million=protoconv.money(d.cost_per_million_micros), replicas=d.min_replicas,
        min_replicas=d.min_replicas, max_replicas=d.max_replicas, create_time=protoconv.timestamp(d.created_at),
        message=d.message, latency_p50_ms=d.latency_p50_ms, scale_to_zero_after_seconds=d.scale_to_zero_after_s,
        last_cold_start_ms=d.last_cold_start_ms, served_cost_per_million=protoconv.money(served_micros),
        served_cost_source=source)
    if d.last_cold_start_at is not None:
        msg.last_cold_start_time.CopyFrom(protoconv.timestamp(d.last_cold_start_at))
    if allocated is not None:
        msg.allocated_cost_per_million.CopyFrom(protoconv.money(allocated))
    return msg


def target(req: inference_pb2.PredictRequest) -> Target:
    v = req.version
    if v.number and v.alias:
        raise InvalidArgument("name a version by number or by alias, not both")
    policy = None
    if req.HasField("routing"):
        policy = Policy(req.routing.floor.metric, protoconv.finite(req.routing.floor.minimum, "routing.floor.minimum"),
                        protoconv.finite(req.routing.max_latency_ms, "routing.max_latency_ms"))
    return Target(v.model, v.number, v.alias, policy)


def inputs(req: inference_pb2.PredictRequest) -> list[RawTensor]:
    if not req.inputs:
        raise InvalidArgument("a Predict request needs at least one input tensor")
    return [RawTensor(t.name, protoconv.dtype_name(t.dtype), tuple(t.shape), t.raw)
            for t in req.inputs]


def prediction_to_proto(p: Prediction, request_id: str) -> inference_pb2.PredictResponse:
    d = p.deployment
    return inference_pb2.PredictResponse(
        outputs=[common_pb2.Tensor(name=o.name, dtype=protoconv.dtype_value(o.datatype), shape=o.shape,
                                   raw=o.raw) for o in p.outputs],
        served_version=common_pb2.VersionRef(model=d.model, number=d.version), deployment=d.name,
        usage=inference_pb2.Usage(compute_microseconds=p.compute_us, cost=protoconv.money(round(p.cost_micros)),
                                  cost_micros=p.cost_micros),
        request_id=request_id)


def stream_error(err: MarginError, request_id: str) -> inference_pb2.PredictResponse:
    """A PredictStream message that failed: what a unary Predict would have answered, as that message's response."""
    retry_after_s = getattr(err, "retry_after_s", None)
    return inference_pb2.PredictResponse(
        request_id=request_id,
        error=inference_pb2.PredictError(code=err.code_name, message=str(err),
                                         retry_after_ms=int(retry_after_s * 1000) if retry_after_s else 0))
