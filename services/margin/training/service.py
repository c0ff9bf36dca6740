"""Wires the training core into a gRPC service, with the reaper that re-queues jobs whose worker vanished."""
from __future__ import annotations

from margin.common import config
from margin.common.costs import PriceCatalog
from margin.common.dispatch import Dispatcher
from margin.common.jobcontrol import Reaper
from margin.common.jobevents import JobEvents
from margin.common.jobs import JobStore
from margin.common.service import ServiceContext, ServiceSpec
from margin.sdk.registry_source import RegistrySource
from margin.training.core import TrainingCore
from margin.training.servicer import TrainingServicer
from margin.v1 import training_pb2, training_pb2_grpc

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingJobs"].full_name


def training_builder(redis_url: str, registry_addr: str, max_world_size: int, lease_seconds: float):
    def build(ctx: ServiceContext) -> ServiceSpec:
        catalog = PriceCatalog.load()
        events = JobEvents.from_url(redis_url)
        dispatcher = Dispatcher(redis_url)
        registry = RegistrySource(registry_addr)
        core = TrainingCore(JobStore(ctx.sessions, catalog), events, dispatcher, registry, catalog, max_world_size)
        reaper = Reaper(core.jobs, grace_seconds=lease_seconds)

        def stop() -> None:
            reaper.stop()
            registry.close()
            dispatcher.close()
            events.close()

        servicer = TrainingServicer(core)
        return ServiceSpec(
            register=[lambda server: training_pb2_grpc.add_TrainingJobsServicer_to_server(servicer, server)],
            service_names=[SERVICE_NAME], on_started=reaper.start, on_stop=stop, extra={"core": core})
    return build


def builder_from_env():
    return training_builder(config.REDIS_URL.get(), config.REGISTRY_ADDR.get(), config.MAX_WORLD_SIZE.get_int(),
                            config.JOB_LEASE_SECONDS.get_float())
