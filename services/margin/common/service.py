"""Bootstrap shared by every service's ``main``: config, logging, database, auth, metrics, server.

A service provides a ``build(ctx) -> ServiceSpec`` function; ``start_service`` turns it into a running
server (port 0 in tests) and ``run_service_main`` is the blocking entry point used in containers.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from margin.common import config
from margin.common.db import make_engine, make_sessionmaker
from margin.common.interceptor import AioServiceInterceptor, ServiceInterceptor
from margin.common.logs import setup_logging
from margin.common.metrics import start_metrics_endpoint
from margin.common.server import AioRunningServer, Register, RunningServer, build_server, serve_until_signal
from margin.common.tenancy import TenantStore

log = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    engine: Engine
    sessions: sessionmaker
    tenants: TenantStore
    admin_key: str | None


@dataclass
class ServiceSpec:
    register: Sequence[Register]
    service_names: Sequence[str]
    admin_methods: Sequence[str] = ()
    on_stop: Callable[[], None] | None = None
    on_started: Callable[[RunningServer | AioRunningServer], None] | None = None  # e.g. a dependency watcher
    asyncio: bool = False  # servicer methods are coroutines: serve them on a grpc.aio server
    extra: dict = field(default_factory=dict)  # the core(s), for tests and benchmarks


@dataclass
class StartedService:
    server: RunningServer | AioRunningServer
    spec: ServiceSpec
    context: ServiceContext

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, grace: float | None = 0) -> None:
        self.server.stop(grace)
        if self.spec.on_stop:
            self.spec.on_stop()
        self.context.engine.dispose()


Build = Callable[[ServiceContext], ServiceSpec]


def start_service(build: Build, *, database_url: str, admin_key: str | None, port: int = 0,
                  host: str = "127.0.0.1", max_workers: int = 16,
                  auth_cache_seconds: float | None = None) -> StartedService:
    """``auth_cache_seconds``: how long a verified key is trusted (default: ``MARGIN_AUTH_CACHE_SECONDS``)."""
    if auth_cache_seconds is None:
        auth_cache_seconds = config.AUTH_CACHE_SECONDS.get_float()
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    ctx = ServiceContext(engine, sessions, TenantStore(sessions, admin_key, auth_cache_seconds), admin_key)
    spec = build(ctx)
    if spec.asyncio:
        server = AioRunningServer(spec.register, spec.service_names, port, host,
                                  [AioServiceInterceptor(ctx.tenants.authenticate, spec.admin_methods)])
    else:
        server = build_server(spec.register, spec.service_names, port=port, host=host,
                              interceptors=[ServiceInterceptor(ctx.tenants.authenticate, spec.admin_methods)],
                              max_workers=max_workers)
    if spec.on_started:
        spec.on_started(server)
    return StartedService(server, spec, ctx)


def run_service_main(name: str, build: Build, *, admin_key_required: bool = False) -> None:
    """Blocking entry point: configure from the environment, serve, drain on SIGTERM."""
    setup_logging(name)
    try:
        admin_key = config.admin_key() if admin_key_required or config.ADMIN_KEY.raw() else None
        started = start_service(
            build, database_url=config.database_url(), admin_key=admin_key, port=config.GRPC_PORT.get_int(),
            host=config.GRPC_HOST.get(), max_workers=config.GRPC_WORKERS.get_int(),
            auth_cache_seconds=config.AUTH_CACHE_SECONDS.get_float())
        start_metrics_endpoint(config.METRICS_PORT.get_int())
    except config.ConfigError as err:
        log.error("configuration error: %s", err)
        sys.exit(2)
    serve_until_signal(started.server, config.GRACE_SECONDS.get_float(), on_stop=started.spec.on_stop)
