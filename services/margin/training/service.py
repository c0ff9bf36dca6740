"""Wires the training core into a gRPC service (parts and reaper: :mod:`margin.common.jobservice`)."""
from __future__ import annotations

from margin.common import config
from margin.common.jobservice import JobServiceParts, job_service_spec
from margin.common.service import ServiceContext, ServiceSpec
from margin.training.core import TrainingCore
from margin.training.servicer import TrainingServicer
from margin.v1 import training_pb2, training_pb2_grpc

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingJobs"].full_name


def training_builder(redis_url: str, registry_addr: str, budget_addr: str, max_world_size: int,
                     lease_seconds: float):
    def make_core(p: JobServiceParts) -> TrainingCore:
        return TrainingCore(p.store, p.events, p.dispatcher, p.registry, p.catalog, max_world_size,
                            p.budgets.remaining)

    def register(core: TrainingCore):
        servicer = TrainingServicer(core)
        return lambda server: training_pb2_grpc.add_TrainingJobsServicer_to_server(servicer, server)

    def build(ctx: ServiceContext) -> ServiceSpec:
        return job_service_spec(ctx, redis_url=redis_url, registry_addr=registry_addr, budget_addr=budget_addr,
                                lease_seconds=lease_seconds, id_prefix="job", service_name=SERVICE_NAME,
                                make_core=make_core, register=register)
    return build


def builder_from_env():
    return training_builder(config.REDIS_URL.get(), config.REGISTRY_ADDR.get(), config.BUDGET_ADDR.get(),
                            config.MAX_WORLD_SIZE.get_int(), config.JOB_LEASE_SECONDS.get_float())
