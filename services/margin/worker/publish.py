"""Register a finished run in the tenant's registry: safetensors + architecture, lineage, recipe, metrics, cost.

The upload carries the idempotency key ``training-job:<job id>``, so a job that is resumed after it already
uploaded gets the same version back: exactly one version per job.
"""
from __future__ import annotations

from safetensors.torch import save
from torch import nn

from margin.common import protoconv
from margin.modelzoo.architectures import signature
from margin.modelzoo.spec import TrainSpec
from margin.sdk.channel import Connection
from margin.sdk.registry import RegistryClient
from margin.v1 import common_pb2, registry_pb2


def register(conn: Connection, job_id: str, spec: TrainSpec, model: nn.Module, metrics: dict[str, float],
             cost: dict, currency: str) -> registry_pb2.ModelVersion:
    client = RegistryClient(conn)
    client.ensure_model(spec.model, description=f"trained by job {job_id}")
    weights = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    meta = registry_pb2.UploadMetadata(
        model=spec.model, format=registry_pb2.ARTIFACT_FORMAT_SAFETENSORS,
        signature=protoconv.signature_to_proto(signature(spec.architecture)),
        architecture=protoconv.struct(spec.model_spec()),
        recipe=protoconv.struct({"kind": "training", "job_id": job_id, "spec": spec.to_dict()}),
        metrics=metrics, cost=protoconv.cost(cost, currency), idempotency_key=f"training-job:{job_id}",
        description=f"{spec.family} trained by job {job_id}")
    if spec.base:
        meta.parent.CopyFrom(common_pb2.VersionRef(model=spec.base.model, number=spec.base.number,
                                                   alias=spec.base.alias))
    return client.upload_bytes(weights, meta)
