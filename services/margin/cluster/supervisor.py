"""The local cluster's supervisor: starts each process, waits until healthy, restarts what crashes,
and stops everything in reverse order on SIGTERM. Runs detached; ``margin up`` starts it."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

from margin.cluster import state
from margin.cluster.processes import ProcessSpec, redis_spec, service_specs
from margin.common.logs import setup_logging

log = logging.getLogger("margin.supervisor")

START_TIMEOUT_S = 60.0
MAX_RESTARTS = 5            # within RESTART_WINDOW_S, then the process is left down
RESTART_WINDOW_S = 60.0
STOP_TIMEOUT_S = 15.0


class Child:
    def __init__(self, spec: ProcessSpec, logs: Path):
        self.spec = spec
        self.log_path = logs / f"{spec.name}.log"
        self.proc: subprocess.Popen | None = None
        self.restarts: deque[float] = deque()
        self.gave_up = False

    def start(self) -> None:
        env = {**os.environ, **self.spec.env}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.spec.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

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
        return {"address": self.spec.address, "pid": self.proc.pid if self.proc else None, "log": str(self.log_path),
                "restarts": len(self.restarts), "up": bool(self.proc and self.proc.poll() is None),
                "metrics_port": int(self.spec.env.get("MARGIN_METRICS_PORT", 0)) or None}


class Supervisor:
    def __init__(self, home: Path):
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self.status = "starting"
        self.error = ""

    def write(self) -> None:
        redis = next((c for c in self.children if c.spec.kind == "redis"), None)
        state.write_state({
            "status": self.status, "error": self.error, "supervisor_pid": os.getpid(), "home": str(self.home),
            "redis_url": f"redis://{redis.spec.address}/0" if redis else None,
            "services": {c.spec.name: c.describe() for c in self.children}})

    def start(self) -> None:
        redis = Child(redis_spec(self.home), self.logs)
        self.children.append(redis)
        redis.start()
        redis.wait_healthy(START_TIMEOUT_S)
        for spec in service_specs(self.home, state.admin_key(), f"redis://{redis.spec.address}/0"):
            child = Child(spec, self.logs)
            self.children.append(child)
            child.start()
            child.wait_healthy(START_TIMEOUT_S)
            log.info("%s healthy on %s", spec.name, spec.address)
        self.status = "ready"
        self.write()

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
                    child.start()
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
