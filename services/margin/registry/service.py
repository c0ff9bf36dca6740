"""Wires the registry core into a gRPC service."""
from __future__ import annotations

from pathlib import Path

from margin.common import config
from margin.common.service import ServiceContext, ServiceSpec
from margin.registry.artifacts import LocalArtifactStore
from margin.registry.core import RegistryCore, RegistryLimits
from margin.registry.servicer import RegistryServicer
from margin.v1 import registry_pb2, registry_pb2_grpc

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"].full_name


def registry_builder(artifact_dir: Path, max_upload_bytes: int, orphan_grace_seconds: float = 600.0):
    def build(ctx: ServiceContext) -> ServiceSpec:
        store = LocalArtifactStore(artifact_dir)
        core = RegistryCore(ctx.sessions, store, RegistryLimits(max_upload_bytes=max_upload_bytes))
        core.recover(orphan_grace_seconds)
        servicer = RegistryServicer(core)
        return ServiceSpec(
            register=[lambda server: registry_pb2_grpc.add_ModelRegistryServicer_to_server(servicer, server)],
            service_names=[SERVICE_NAME], on_stop=store.close, extra={"core": core})
    return build


def builder_from_env():
    return registry_builder(config.artifact_dir(), config.MAX_UPLOAD_BYTES.get_int())
