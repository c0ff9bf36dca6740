"""margin.v1 training messages <-> the training domain (TrainSpec, Job, Estimate, event dicts)."""
from __future__ import annotations

from datetime import datetime

from margin.common import protoconv
from margin.common.errors import InvalidArgument
from margin.common.jobs import Job
from margin.common.jobstates import STATE_TO_PROTO
from margin.modelzoo.spec import BaseRef, TrainSpec
from margin.training.estimate import Estimate
from margin.v1 import common_pb2, training_pb2

PRECISION_FROM_PROTO = {training_pb2.PRECISION_UNSPECIFIED: "fp32", training_pb2.PRECISION_FP32: "fp32",
                        training_pb2.PRECISION_BF16: "bf16", training_pb2.PRECISION_FP16: "fp16"}
PRECISION_TO_PROTO = {"fp32": training_pb2.PRECISION_FP32, "bf16": training_pb2.PRECISION_BF16,
                      "fp16": training_pb2.PRECISION_FP16}


def _ref(msg: common_pb2.VersionRef, what: str) -> BaseRef:
    if not msg.model:
        raise InvalidArgument(f"{what}.model is required")
    if msg.number and msg.alias:
        raise InvalidArgument(f"name {what} by number or by alias, not both")
    return BaseRef(msg.model, msg.number, msg.alias)


def spec_from_proto(msg: training_pb2.TrainingSpec) -> TrainSpec:
    if msg.precision not in PRECISION_FROM_PROTO:
        raise InvalidArgument(f"spec.precision {msg.precision} is not a known precision")
    source = msg.dataset.WhichOneof("source")
    return TrainSpec(
        model=msg.model, family=msg.family, architecture=protoconv.from_struct(msg.architecture, "spec.architecture"),
        dataset=msg.dataset.builtin if source == "builtin" else "",
        dataset_version=_ref(msg.dataset.registry, "spec.dataset.registry") if source == "registry" else None,
        base=_ref(msg.base_version, "spec.base_version") if msg.HasField("base_version") else None,
        freeze_layers=tuple(msg.freeze_layers), epochs=msg.epochs, batch_size=msg.batch_size or 64,
        learning_rate=msg.learning_rate or 1e-3, optimizer=msg.optimizer or "adam",
        validation_fraction=msg.validation_fraction or 0.2, seed=msg.seed,
        precision=PRECISION_FROM_PROTO[msg.precision], world_size=msg.world_size or 1,
        device_class=msg.device_class or "cpu",
        package=_ref(msg.package, "spec.package") if msg.HasField("package") else None,
        config=protoconv.from_struct(msg.config, "spec.config"), max_seconds=msg.max_seconds)


def spec_to_proto(spec: TrainSpec) -> training_pb2.TrainingSpec:
    msg = training_pb2.TrainingSpec(
        model=spec.model, family=spec.family, architecture=protoconv.struct(spec.architecture),
        freeze_layers=spec.freeze_layers, epochs=spec.epochs, batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, optimizer=spec.optimizer, validation_fraction=spec.validation_fraction,
        seed=spec.seed, precision=PRECISION_TO_PROTO[spec.precision], world_size=spec.world_size,
        device_class=spec.device_class, config=protoconv.struct(spec.config), max_seconds=spec.max_seconds)
    if spec.package:
        msg.package.CopyFrom(_ref_to_proto(spec.package))
    if spec.base:
        msg.base_version.CopyFrom(_ref_to_proto(spec.base))
    if spec.dataset:
        msg.dataset.builtin = spec.dataset
    elif spec.dataset_version:
        msg.dataset.registry.CopyFrom(_ref_to_proto(spec.dataset_version))
    return msg


def _ref_to_proto(ref: BaseRef) -> common_pb2.VersionRef:
    return common_pb2.VersionRef(model=ref.model, number=ref.number, alias=ref.alias)


def estimate_to_proto(e: dict, currency: str) -> training_pb2.CostEstimate:
    if not e:
        return training_pb2.CostEstimate()
    return training_pb2.CostEstimate(
        cost=common_pb2.MoneyRange(low=protoconv.money(e["low_micros"], currency),
                                   expected=protoconv.money(e["expected_micros"], currency),
                                   high=protoconv.money(e["high_micros"], currency)),
        device_hours=e["device_hours"], device_hours_low=e["device_hours_low"],
        device_hours_high=e["device_hours_high"], energy_kwh=e["energy_kwh"], device_class=e["device_class"],
        basis=e["basis"])


def estimate_message(estimate: Estimate, price_micros_per_hour: int, currency: str) -> training_pb2.CostEstimate:
    msg = estimate_to_proto(estimate.to_dict(), currency)
    msg.price_per_device_hour.CopyFrom(protoconv.money(price_micros_per_hour, currency))
    return msg


def job_to_proto(job: Job, currency: str) -> training_pb2.TrainingJob:
    total = job.total_cost()
    msg = training_pb2.TrainingJob(
        id=job.id, state=STATE_TO_PROTO[job.state], spec=spec_to_proto(TrainSpec.from_dict(job.spec)),
        budget=protoconv.money(job.budget_micros, currency), estimate=estimate_to_proto(job.estimate, currency),
        cost=protoconv.cost(total, currency),
        epoch=int(job.progress.get("epoch") or 0), step=int(job.progress.get("step") or 0),
        metrics={k: float(v) for k, v in job.metrics.items()}, message=job.message,
        create_time=protoconv.timestamp(job.created_at), start_time=protoconv.timestamp(job.started_at),
        end_time=protoconv.timestamp(job.ended_at), attempts=job.attempts,
        distributed_efficiency=float(job.efficiency.get("eta", 0.0)),
        scaling_efficiency=float(job.efficiency.get("scaling", 0.0)), idempotency_key=job.idempotency_key,
        total_epochs=int(job.progress.get("total_epochs") or 0),
        eta_seconds=float(job.progress.get("eta_seconds") or 0),
        loss=float(job.progress.get("loss") or 0.0),
        attempt_costs=[protoconv.cost(a.as_cost(job.device_class), currency) for a in job.attempt_costs])
    if job.result:
        msg.result_version.CopyFrom(common_pb2.VersionRef(model=job.result["model"], number=job.result["number"]))
        msg.exported_versions.extend(common_pb2.VersionRef(model=job.result["model"], number=number)
                                     for number in job.result.get("exported", []))
    if job.checkpoint:
        msg.checkpoint.CopyFrom(training_pb2.JobCheckpoint(
            key=job.checkpoint["key"], epoch=job.checkpoint["epoch"], step=job.checkpoint["step"],
            size_bytes=job.checkpoint.get("bytes", 0)))
    return msg


def snapshot_event(job: Job, currency: str) -> training_pb2.JobEvent:
    """The job as it is now, as the first event a watcher gets."""
    p = job.progress
    return training_pb2.JobEvent(
        job_id=job.id, state=STATE_TO_PROTO[job.state], epoch=int(p.get("epoch") or 0),
        total_epochs=int(p.get("total_epochs") or 0), step=int(p.get("step") or 0), loss=float(p.get("loss") or 0.0),
        metrics={k: float(v) for k, v in job.metrics.items()}, cost_so_far=protoconv.money(job.cost_micros, currency),
        eta_seconds=float(p.get("eta_seconds") or 0.0), time=protoconv.timestamp(job.ended_at or job.created_at),
        message=job.message, attempt=job.fence)


def event_to_proto(job_id: str, e: dict, currency: str) -> training_pb2.JobEvent:
    loss = e.get("loss")
    msg = training_pb2.JobEvent(
        job_id=job_id, state=STATE_TO_PROTO.get(e.get("state", ""), common_pb2.JOB_STATE_UNSPECIFIED),
        epoch=int(e.get("epoch") or 0), total_epochs=int(e.get("total_epochs") or 0), step=int(e.get("step") or 0),
        loss=float(loss) if isinstance(loss, (int, float)) and loss == loss else 0.0,
        metrics={k: float(v) for k, v in (e.get("metrics") or {}).items()},
        cost_so_far=protoconv.money(int(e.get("cost_micros") or 0), currency),
        eta_seconds=float(e.get("eta_seconds") or 0.0), message=e.get("message", ""),
        attempt=int(e.get("attempt") or 0))
    if e.get("time"):
        msg.time.CopyFrom(protoconv.timestamp(datetime.fromisoformat(e["time"])))
    return msg
