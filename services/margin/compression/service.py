"""Wires the compression core into a gRPC service, with the reaper that re-queues jobs whose worker vanished."""
from __future__ import annotations

from margin.common import config
from margin.common.costs import PriceCatalog
from margin.common.dispatch import Dispatcher
from margin.common.jobcontrol import Reaper
from margin.common.jobevents import JobEvents
from margin.common.jobs import JobStore
from margin.common.service import ServiceContext, ServiceSpec
from margin.compression.core import CompressionCore
from margin.compression.servicer import CompressionServicer
from margin.sdk.registry_source import RegistrySource
from margin.v1 import compression_pb2, compression_pb2_grpc

SERVICE_NAME = compression_pb2.DESCRIPTOR.services_by_name["Compression"].full_name


def compression_builder(redis_url: str, registry_addr: str, lease_seconds: float):
    def build(ctx: ServiceContext) -> ServiceSpec:
        catalog = PriceCatalog.load()
        events, dispatcher = JobEvents.from_url(redis_url), Dispatcher(redis_url)
        registry = RegistrySource(registry_addr)
        core = CompressionCore(JobStore(ctx.sessions, catalog, id_prefix="cj"), events, dispatcher, registry,
                               catalog)
        reaper = Reaper(core.jobs, grace_seconds=lease_seconds)

        def stop() -> None:
            reaper.stop()
            for part in (registry, dispatcher, events):
                part.close()

        servicer = CompressionServicer(core)
        return ServiceSpec(
            register=[lambda server: compression_pb2_grpc.add_CompressionServicer_to_server(servicer, server)],
            service_names=[SERVICE_NAME], on_started=reaper.start, on_stop=stop, extra={"core": core})
    return build


def builder_from_env():
    return compression_builder(config.REDIS_URL.get(), config.REGISTRY_ADDR.get(), config.JOB_LEASE_SECONDS.get_float())
