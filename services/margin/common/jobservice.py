"""What every job service (training, compression) wires the same way: the price catalog, Redis events, the
Celery dispatcher, the registry client, the budget client (what is left of a tenant's budget, asked of the budget
service over gRPC), the lease reaper, and their orderly shutdown."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from margin.common import config
from margin.common.costs import PriceCatalog
from margin.common.dispatch import Dispatcher
from margin.common.jobcontrol import JobControl, Reaper
from margin.common.jobevents import JobEvents
from margin.common.jobs import JobStore
from margin.common.server import Register
from margin.common.service import ServiceContext, ServiceSpec
from margin.sdk.budgets import BudgetsClient
from margin.sdk.registry_source import RegistrySource


@dataclass
class JobServiceParts:
    """What a job service's core is built from."""

    catalog: PriceCatalog
    store: JobStore
    events: JobEvents
    dispatcher: Dispatcher
    registry: RegistrySource
    budgets: BudgetsClient  # its ``remaining(tenant, category)`` is the core's tenant budget check


def job_service_spec(ctx: ServiceContext, *, redis_url: str, registry_addr: str, budget_addr: str,
                     lease_seconds: float, id_prefix: str, service_name: str,
                     make_core: Callable[[JobServiceParts], object],
                     register: Callable[[object], Register]) -> ServiceSpec:
    """Build the parts, the core (``make_core``; it must expose ``.jobs``, a :class:`JobControl`) and its
    servicer registration (``register(core)``), with a reaper re-queueing jobs whose lease lapsed."""
    catalog = PriceCatalog.load()
    store = JobStore(ctx.sessions, catalog, id_prefix=id_prefix, ledger_key=config.ledger_id_key(ctx.admin_key))
    parts = JobServiceParts(catalog, store, JobEvents.from_url(redis_url), Dispatcher(redis_url),
                            RegistrySource(registry_addr), BudgetsClient(budget_addr, ctx.admin_key))
    core = make_core(parts)
    jobs: JobControl = core.jobs
    reaper = Reaper(jobs, grace_seconds=lease_seconds)

    def stop() -> None:
        reaper.stop()
        for part in (parts.registry, parts.budgets, parts.dispatcher, parts.events):
            part.close()

    return ServiceSpec(register=[register(core)], service_names=[service_name], on_started=reaper.start,
                       on_stop=stop, extra={"core": core})
