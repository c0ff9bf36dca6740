"""What the local cluster runs: Redis and Margin's services, each with a health check."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

STOP_TIMEOUT_S = 15.0
LOCAL_FLEET_INTERVAL_S = 5.0  # the local cluster's metering interval (15 s by default in a cluster)
READY_FILE_ENV = "MARGIN_WORKER_READY_FILE"
PR_SET_PDEATHSIG = 1


def set_parent_death_signal() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent (the supervisor) dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class MissingDependency(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    port: int
    kind: str                      # "grpc" | "redis" | "triton" | "celery"
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # other ports it listens on, by use ("http", "metrics")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def healthy(self, timeout: float = 1.0) -> bool:
        if self.kind == "celery":  # the worker writes this file once it consumes its queues
            return Path(self.env[READY_FILE_ENV]).exists()
        if self.kind == "triton":
            return _triton_ready(self.address, timeout)
        try:
            if self.kind == "redis":
                return bool(redis.Redis(port=self.port, socket_timeout=timeout).ping())
            with grpc.insecure_channel(self.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
        except (grpc.RpcError, redis.RedisError, OSError):
            return False


def _triton_ready(url: str, timeout: float) -> bool:
    """Triton's own readiness (KServe v2 ServerReady over gRPC); False on any failure."""
    try:
        import tritonclient.grpc as triton_grpc

        client = triton_grpc.InferenceServerClient(url)
        try:
            return bool(client.is_server_ready(client_timeout=timeout))
        finally:
            client.close()
    except Exception:
        return False


class ManagedProcess:
    """One child process with a log file, a health check, restarts counted, and a clean stop."""

    def __init__(self, spec: ProcessSpec, logs: Path):
        self.spec = spec
        self.log_path = logs / f"{spec.name}.log"
        self.proc: subprocess.Popen | None = None
        self.restarts: deque[float] = deque()
        self.gave_up = False

    def start(self, die_with_parent: bool = False) -> None:
        """Start the process; with ``die_with_parent`` the kernel SIGTERMs it if its parent dies."""
        env = {**os.environ, **self.spec.env}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.spec.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         preexec_fn=set_parent_death_signal if die_with_parent else None)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with code {self.proc.returncode}\n{self.log_tail()}")
            if self.spec.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.spec.name} was not healthy after {timeout:.0f}s\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def describe(self) -> dict:
        return {"address": self.spec.address if self.spec.port else "",
                "pid": self.proc.pid if self.proc else None, "log": str(self.log_path),
                "restarts": len(self.restarts), "up": bool(self.proc and self.proc.poll() is None),
                "metrics_port": int(self.spec.env.get("MARGIN_METRICS_PORT", 0)) or self.spec.ports.get("metrics")}


# Margin's services on the local cluster, in start order. Later issues add theirs here.
SERVICES: list[tuple[str, str]] = [
    ("budget", "margin.budget"),
    ("registry", "margin.registry"),
    ("training", "margin.training"),
    ("compression", "margin.compression"),
    ("inference", "margin.inference"),
]


def standalone_service_spec(name: str, module: str, workdir: Path, admin_key: str | None = None,
                            port: int | None = None, **extra_env: str) -> ProcessSpec:
    """One Margin service as its own process on a SQLite database in ``workdir`` — for benchmarks and
    tests that need real processes without the whole local cluster."""
    port = port or free_port()
    services_dir = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [services_dir, os.environ.get("PYTHONPATH")])),
           "MARGIN_HOME": str(workdir), "DATABASE_URL": f"sqlite:///{workdir / 'margin.db'}",
           "MARGIN_ARTIFACT_DIR": str(workdir / "artifacts"), "MARGIN_GRPC_HOST": "127.0.0.1",
           "MARGIN_GRPC_PORT": str(port), "MARGIN_METRICS_PORT": "-1", "MARGIN_LOG_FORMAT": "text",
           **({"MARGIN_ADMIN_KEY": admin_key} if admin_key else {}), **extra_env}
    return ProcessSpec(name, [sys.executable, "-m", module], port, "grpc", env)


def redis_spec(home: Path) -> ProcessSpec:
    binary = shutil.which("redis-server")
    if binary is None:
        raise MissingDependency("redis-server is not installed: run `make setup` (it installs it with apt-get)")
    data = home / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "60 1",
            "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"]
    return ProcessSpec("redis", argv, port, "redis")


def service_specs(home: Path, admin_key: str, redis_url: str, triton_url: str,
                  triton_metrics_url: str = "", triton_control_key: str = "") -> list[ProcessSpec]:
    """Margin's services, each told where Redis, Triton (and its metrics) and every other service are; the inference
    gateway alone gets Triton's control key (``triton_control_key``: model control answers no one else)."""
    ports = {name: free_port() for name, _ in SERVICES}
    shared = {"MARGIN_HOME": str(home), "MARGIN_GRPC_HOST": "127.0.0.1", "MARGIN_ADMIN_KEY": admin_key,
              "MARGIN_LOG_FORMAT": "json", "MARGIN_REDIS_URL": redis_url, "MARGIN_TRITON_URL": triton_url,
              "MARGIN_TRITON_METRICS_URL": triton_metrics_url,
              "MARGIN_MODEL_REPOSITORY": str(home / "model-repository"),
              "MARGIN_FLEET_INTERVAL_SECONDS": os.environ.get("MARGIN_FLEET_INTERVAL_SECONDS",
                                                              str(LOCAL_FLEET_INTERVAL_S)),
              **{f"MARGIN_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()}}
    own = {"inference": {"MARGIN_TRITON_CONTROL_KEY": triton_control_key} if triton_control_key else {}}
    services = [ProcessSpec(name, [sys.executable, "-m", module], ports[name], "grpc",
                            {**shared, "MARGIN_GRPC_PORT": str(ports[name]), "MARGIN_METRICS_PORT": str(free_port()),
                             **own.get(name, {})})
                for name, module in SERVICES]
    return [*services, worker_spec(home, shared)]


def worker_spec(home: Path, env: dict[str, str], queues: str = "train.cpu", name: str = "worker-cpu") -> ProcessSpec:
    """One Celery worker consuming ``queues`` with one training process at a time (this machine's cores)."""
    ready = home / "run" / f"{name}.ready"
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "celery", "-A", "margin.worker.app", "worker", "-Q", queues, "--concurrency", "1",
            "--hostname", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "INFO"]
    return ProcessSpec(name, argv, 0, "celery", {**env, READY_FILE_ENV: str(ready), "MARGIN_WORKER_QUEUES": queues})
