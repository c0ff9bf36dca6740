"""margin.v1 compression messages <-> plain dicts (job specs, recipes, variant reports)."""
from __future__ import annotations

from google.protobuf import json_format

from margin.common import protoconv
from margin.common.jobs import Job
from margin.common.jobstates import STATE_TO_PROTO
from margin.v1 import common_pb2, compression_pb2

OBJECTIVES = {compression_pb2.OBJECTIVE_UNSPECIFIED: "min_cost_per_million",
              compression_pb2.OBJECTIVE_MIN_COST_PER_MILLION: "min_cost_per_million",
              compression_pb2.OBJECTIVE_MIN_LATENCY: "min_latency", compression_pb2.OBJECTIVE_MIN_SIZE: "min_size"}


def to_dict(msg, what: str = "") -> dict:
    """A request part as the JSON-shaped dict job specs keep; a non-finite number in one of its Structs (a
    distill step's student_architecture) is INVALID_ARGUMENT naming where, under ``what``."""
    protoconv.check_structs(msg, what)
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def recipe_to_proto(data: dict) -> compression_pb2.Recipe:
    return json_format.ParseDict(data, compression_pb2.Recipe(), ignore_unknown_fields=True)


def variant_to_proto(v: dict, currency: str) -> compression_pb2.VariantReport:
    msg = compression_pb2.VariantReport(
        recipe=recipe_to_proto(v["recipe"]), device_class=v["device_class"], size_bytes=v["size_bytes"],
        compression_ratio=v["compression_ratio"], parameters=v["parameters"], sparsity=v.get("sparsity", 0.0),
        latency_p50_ms_batch1=v["latency_p50_ms_batch1"], latency_p99_ms_batch1=v["latency_p99_ms_batch1"],
        latency_p50_ms_batch32=v["latency_p50_ms_batch32"], latency_p99_ms_batch32=v["latency_p99_ms_batch32"],
        throughput_per_second=v["throughput_per_second"], quality_metric=v["quality_metric"], quality=v["quality"],
        quality_delta=v["quality_delta"], quality_min=v.get("quality_min", 0.0),
        cost_per_million=protoconv.money(v["cost_per_million_micros"], currency),
        run_cost=protoconv.money(v["run_cost_micros"], currency), break_even_inferences=v["break_even_inferences"],
        meets_floor=v["meets_floor"], pareto_optimal=v["pareto_optimal"])
    if v.get("version"):
        msg.version.CopyFrom(common_pb2.VersionRef(model=v["version"]["model"], number=v["version"]["number"]))
    return msg


def job_to_proto(job: Job, currency: str) -> compression_pb2.CompressionJob:
    spec, result = job.spec, job.result
    msg = compression_pb2.CompressionJob(
        id=job.id, state=STATE_TO_PROTO[job.state],
        source=common_pb2.VersionRef(model=spec["source"]["model"], number=spec["source"]["number"]),
        variants=[variant_to_proto(v, currency) for v in result.get("variants", [])],
        chosen=result.get("chosen", -1), outcome=result.get("outcome", "") or job.message,
        cost=protoconv.cost(job.total_cost(), currency), budget=protoconv.money(job.budget_micros, currency),
        create_time=protoconv.timestamp(job.created_at), end_time=protoconv.timestamp(job.ended_at),
        idempotency_key=job.idempotency_key, estimate_basis=job.estimate.get("basis", ""))
    if job.estimate:
        msg.estimate.CopyFrom(common_pb2.MoneyRange(
            **{k: protoconv.money(job.estimate[f"{k}_micros"], currency) for k in ("low", "expected", "high")}))
    if result.get("baseline"):
        msg.baseline.CopyFrom(variant_to_proto(result["baseline"], currency))
    if spec.get("recipe"):
        msg.recipe.CopyFrom(recipe_to_proto(spec["recipe"]))
    if spec.get("auto"):
        msg.auto.CopyFrom(json_format.ParseDict(spec["auto"], compression_pb2.AutoCompressRequest(),
                                                ignore_unknown_fields=True))
        if not msg.auto.candidates:  # the built-in search space: say which recipes it tries
            msg.auto.candidates.extend(recipe_to_proto(c) for c in spec["candidates"])
    return msg


def event_to_proto(job_id: str, e: dict, currency: str) -> compression_pb2.CompressionEvent:
    msg = compression_pb2.CompressionEvent(
        job_id=job_id, state=STATE_TO_PROTO.get(e.get("state", ""), common_pb2.JOB_STATE_UNSPECIFIED),
        stage=e.get("stage", ""), step=int(e.get("step") or 0), total_steps=int(e.get("total_steps") or 0),
        cost_so_far=protoconv.money(int(e.get("cost_micros") or 0), currency), message=e.get("message", ""))
    if e.get("variant"):
        msg.variant.CopyFrom(variant_to_proto(e["variant"], currency))
    return msg


def snapshot_event(job: Job, currency: str) -> compression_pb2.CompressionEvent:
    return compression_pb2.CompressionEvent(
        job_id=job.id, state=STATE_TO_PROTO[job.state], stage=job.progress.get("stage", ""),
        step=int(job.progress.get("step") or 0), total_steps=int(job.progress.get("total_steps") or 0),
        cost_so_far=protoconv.money(job.cost_micros, currency), message=job.message,
        time=protoconv.timestamp(job.ended_at or job.created_at))
