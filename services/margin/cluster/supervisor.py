"""The local cluster's supervisor: starts each process, waits until healthy, restarts what crashes,
and stops everything in reverse order on SIGTERM. Runs detached; ``margin up`` starts it."""
from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
from pathlib import Path

from margin.cluster import state
from margin.cluster.processes import ManagedProcess, ProcessSpec, redis_spec, service_specs
from margin.common.logs import setup_logging
from margin.inference.triton_process import triton_spec

log = logging.getLogger("margin.supervisor")

START_TIMEOUT_S = 60.0
MAX_RESTARTS = 5            # within RESTART_WINDOW_S, then the process is left down
RESTART_WINDOW_S = 60.0


class Supervisor:
    def __init__(self, home: Path):
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[ManagedProcess] = []
        self.stopping = threading.Event()
        self.status = "starting"
        self.error = ""

    def write(self, waiting_for: ManagedProcess | None = None) -> None:
        redis = next((c for c in self.children if c.spec.kind == "redis"), None)
        state.write_state({
            "status": self.status, "error": self.error, "supervisor_pid": os.getpid(), "home": str(self.home),
            "redis_url": f"redis://{redis.spec.address}/0" if redis else None,
            "waiting_for": ({"name": waiting_for.spec.name, "log": str(waiting_for.log_path),
                             "since": time.time()} if waiting_for else None),
            "services": {c.spec.name: c.describe() for c in self.children}})

    def start(self) -> None:
        redis = self._start_child(redis_spec(self.home))
        # Triton's model control answers only this key, which only the gateway gets (in its environment): nothing
        # else on this machine — a webhook, another process — can load or unload a model over its HTTP or gRPC port.
        # A new one each start, kept in memory only (restarts of Triton and the gateway reuse their specs).
        control_key = secrets.token_urlsafe(32)
        triton = self._start_child(triton_spec(self.home, self.home / "model-repository", control_key=control_key))
        for spec in service_specs(self.home, state.admin_key(), f"redis://{redis.spec.address}/0",
                                  triton.spec.address, f"http://127.0.0.1:{triton.spec.ports['metrics']}/metrics",
                                  triton_control_key=control_key):
            self._start_child(spec)
        self.status = "ready"
        self.write()

    def _start_child(self, spec: ProcessSpec) -> ManagedProcess:
        """Start one process and wait until it is healthy, the state file saying which one is awaited
        (so a slow start is diagnosable from outside)."""
        child = ManagedProcess(spec, self.logs)
        self.children.append(child)
        child.start(die_with_parent=True)
        self.write(waiting_for=child)
        started = time.monotonic()
        child.wait_healthy(START_TIMEOUT_S)
        log.info("%s healthy on %s after %.1fs", spec.name, spec.address, time.monotonic() - started)
        return child

    def watch(self) -> None:
        while not self.stopping.wait(0.5):
            for child in self.children:
                if child.gave_up or child.proc.poll() is None:
                    continue
                now = time.monotonic()
                while child.restarts and now - child.restarts[0] > RESTART_WINDOW_S:
                    child.restarts.popleft()
                if len(child.restarts) >= MAX_RESTARTS:
                    child.gave_up = True
                    self.status, self.error = "degraded", f"{child.spec.name} keeps crashing; see {child.log_path}"
                    log.error(self.error)
                else:
                    log.warning("%s exited with code %s: restarting", child.spec.name, child.proc.returncode)
                    child.restarts.append(now)
                    child.start(die_with_parent=True)
                self.write()

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.status = "stopped"
        self.write()


def main() -> None:
    setup_logging("supervisor")
    supervisor = Supervisor(state.home())
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stopping.set())
    try:
        supervisor.start()
    except Exception as exc:
        log.exception("local cluster failed to start")
        supervisor.status, supervisor.error = "failed", str(exc)
        supervisor.stop()
        supervisor.status = "failed"
        supervisor.write()
        raise SystemExit(1) from None
    supervisor.watch()
    supervisor.stop()


if __name__ == "__main__":
    main()
