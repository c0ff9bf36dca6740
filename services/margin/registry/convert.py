"""margin.v1 registry messages <-> registry domain objects."""
from __future__ import annotations

from margin.common import protoconv
from margin.common.errors import InvalidArgument
from margin.registry.domain import CostRecord, ModelRecord, UploadRequest, VersionRecord, VersionSelector
from margin.v1 import common_pb2, registry_pb2

FORMAT_TO_PROTO = {
    "torchscript": registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
    "safetensors": registry_pb2.ARTIFACT_FORMAT_SAFETENSORS,
    "onnx": registry_pb2.ARTIFACT_FORMAT_ONNX,
    "dataset-npz": registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ,
    "model-package": registry_pb2.ARTIFACT_FORMAT_MODEL_PACKAGE,
}
FORMAT_FROM_PROTO = {v: k for k, v in FORMAT_TO_PROTO.items()}


def selector(ref: common_pb2.VersionRef) -> VersionSelector:
    if not ref.model:
        raise InvalidArgument("version.model is required")
    if ref.number and ref.alias:
        raise InvalidArgument("name a version by number or by alias, not both")
    return VersionSelector(ref.model, ref.number, ref.alias)


def version_ref(sel: VersionSelector) -> common_pb2.VersionRef:
    return common_pb2.VersionRef(model=sel.model, number=sel.number, alias=sel.alias)


def cost_to_proto(cost: CostRecord) -> common_pb2.Cost:
    return common_pb2.Cost(
        total=protoconv.money(cost.total_micros, cost.currency),
        compute=protoconv.money(cost.compute_micros, cost.currency),
        energy=protoconv.money(cost.energy_micros, cost.currency),
        device_class=cost.device_class, device_hours=cost.device_hours, energy_kwh=cost.energy_kwh)


def cost_from_proto(msg: common_pb2.Cost) -> CostRecord:
    for part in (msg.total, msg.compute, msg.energy):
        if part.micros < 0:
            raise InvalidArgument("cost amounts must be >= 0")
    for name in ("device_hours", "energy_kwh"):
        if protoconv.finite(getattr(msg, name), f"metadata.cost.{name}") < 0:
            raise InvalidArgument(f"metadata.cost.{name} must be >= 0")
    currency = msg.total.currency or "USD"
    return CostRecord(currency=currency, total_micros=msg.total.micros, compute_micros=msg.compute.micros,
                      energy_micros=msg.energy.micros, device_class=msg.device_class,
                      device_hours=msg.device_hours, energy_kwh=msg.energy_kwh)


def upload_request(meta: registry_pb2.UploadMetadata) -> UploadRequest:
    if meta.format not in FORMAT_FROM_PROTO:
        raise InvalidArgument(f"metadata.format must be one of {sorted(FORMAT_TO_PROTO)}")
    return UploadRequest(
        model=meta.model, format=FORMAT_FROM_PROTO[meta.format], sha256=meta.sha256.lower(),
        size_bytes=meta.size_bytes, signature=protoconv.signature_from_proto(meta.signature),
        architecture=protoconv.from_struct(meta.architecture, "metadata.architecture"),
        parent=selector(meta.parent) if meta.HasField("parent") else None,
        recipe=protoconv.from_struct(meta.recipe, "metadata.recipe"), metrics=dict(meta.metrics),
        cost=cost_from_proto(meta.cost) if meta.HasField("cost") else None, description=meta.description,
        idempotency_key=meta.idempotency_key)


def model_to_proto(m: ModelRecord) -> registry_pb2.Model:
    return registry_pb2.Model(name=m.name, description=m.description, labels=m.labels,
                              create_time=protoconv.timestamp(m.created_at), latest_version=m.latest_version,
                              aliases=m.aliases)


def version_to_proto(v: VersionRecord) -> registry_pb2.ModelVersion:
    msg = registry_pb2.ModelVersion(
        model=v.model, number=v.number, format=FORMAT_TO_PROTO[v.format],
        signature=protoconv.signature_to_proto(v.signature), architecture=protoconv.struct(v.architecture),
        recipe=protoconv.struct(v.recipe), metrics=v.metrics, sha256=v.sha256, size_bytes=v.size_bytes,
        create_time=protoconv.timestamp(v.created_at), aliases=v.aliases, description=v.description)
    if v.parent:
        msg.parent.CopyFrom(version_ref(v.parent))
    if v.cost:
        msg.cost.CopyFrom(cost_to_proto(v.cost))
    return msg
