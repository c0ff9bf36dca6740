"""Wires the compression core into a gRPC service (parts and reaper: :mod:`margin.common.jobservice`)."""
from __future__ import annotations

from margin.common import config
from margin.common.jobservice import JobServiceParts, job_service_spec
from margin.common.service import ServiceContext, ServiceSpec
from margin.compression.core import CompressionCore
from margin.compression.servicer import CompressionServicer
from margin.v1 import compression_pb2, compression_pb2_grpc

SERVICE_NAME = compression_pb2.DESCRIPTOR.services_by_name["Compression"].full_name


def compression_builder(redis_url: str, registry_addr: str, budget_addr: str, lease_seconds: float):
    def make_core(p: JobServiceParts) -> CompressionCore:
        return CompressionCore(p.store, p.events, p.dispatcher, p.registry, p.catalog, p.budgets.remaining)

    def register(core: CompressionCore):
        servicer = CompressionServicer(core)
        return lambda server: compression_pb2_grpc.add_CompressionServicer_to_server(servicer, server)

    def build(ctx: ServiceContext) -> ServiceSpec:
        return job_service_spec(ctx, redis_url=redis_url, registry_addr=registry_addr, budget_addr=budget_addr,
                                lease_seconds=lease_seconds, id_prefix="cj", service_name=SERVICE_NAME,
                                make_core=make_core, register=register)
    return build


def builder_from_env():
    return compression_builder(config.REDIS_URL.get(), config.REGISTRY_ADDR.get(), config.BUDGET_ADDR.get(),
                               config.JOB_LEASE_SECONDS.get_float())
