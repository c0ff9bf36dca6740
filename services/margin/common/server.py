"""Server factory and lifecycle shared by every service.

``build_server`` binds a port (0 in tests) and returns the running server with the bound port; only
``serve_until_signal`` blocks. Health (``grpc.health.v1``) and reflection are always on, so
``grpcurl`` and Kubernetes' native gRPC probes work. SIGTERM drains: health turns NOT_SERVING, then
``server.stop(grace)`` lets in-flight calls finish.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 << 20
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.so_reuseport", 0)]

Register = Callable[[grpc.Server], None]


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        self.set_serving(False)
        self.server.stop(grace).wait()


def build_server(register: Sequence[Register], service_names: Sequence[str], *, port: int = 0,
                 host: str = "127.0.0.1", interceptors: Sequence[grpc.ServerInterceptor] = (),
                 max_workers: int = 16) -> RunningServer:
    """Build, bind and start a server hosting the given services plus health and reflection."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=list(interceptors),
        options=SERVER_OPTIONS,
    )
    for add in register:
        add(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(_reflected(service_names), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    server.start()
    running = RunningServer(server, bound, health_servicer, tuple(service_names))
    running.set_serving(True)
    log.info("serving %s on %s:%d", ", ".join(service_names), host, bound)
    return running


class AioRunningServer:
    """An asyncio gRPC server on an event loop of its own thread, driven like :class:`RunningServer`.

    Servicers with ``async def`` methods run on that loop; the rest of the process (cores, watchers,
    tests) stays synchronous and talks to the server through these thread-safe methods."""

    def __init__(self, register: Sequence[Register], service_names: Sequence[str], port: int, host: str,
                 interceptors: Sequence[grpc.aio.ServerInterceptor]):
        self.service_names = tuple(service_names)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()
        self.server, self.port, self.health = self._run(self._start(register, port, host, interceptors))
        self.set_serving(True)
        log.info("serving %s on %s:%d (asyncio)", ", ".join(service_names), host, self.port)

    async def _start(self, register, port, host, interceptors):
        server = grpc.aio.server(interceptors=list(interceptors), options=SERVER_OPTIONS)
        for add in register:
            add(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(_reflected(self.service_names), server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise RuntimeError(f"could not bind {host}:{port}")
        await server.start()
        return server, bound, health_servicer

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

        async def apply() -> None:
            for name in ("", *self.service_names):
                await self.health.set(name, status)
        self._run(apply())

    def stop(self, grace: float | None = None) -> None:
        self.set_serving(False)
        self._run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _reflected(service_names: Sequence[str]) -> tuple[str, ...]:
    return (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)


def serve_until_signal(running: RunningServer | AioRunningServer, grace: float,
                       on_stop: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM/SIGINT, then drain for at most ``grace`` seconds."""
    stop = threading.Event()

    def _handle(signum, _frame):
        log.info("received %s: draining for up to %.0fs", signal.Signals(signum).name, grace)
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    stop.wait()
    running.stop(grace)
    if on_stop:
        on_stop()
    log.info("stopped")
