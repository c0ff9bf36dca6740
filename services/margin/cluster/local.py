"""``margin up`` / ``margin down``: start and stop the supervised local cluster."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from margin.cluster import state
from margin.sdk import connect
from margin.sdk.admin import create_tenant_key
from margin.v1 import registry_pb2, registry_pb2_grpc

DEMO_TENANT = "demo"


class ClusterError(RuntimeError):
    pass


def running_state() -> dict | None:
    """The state of a live cluster, or None."""
    current = state.read_state()
    if current.get("status") in ("ready", "degraded", "starting") and state.pid_alive(current.get("supervisor_pid")):
        return current
    return None


def up(timeout: float = 240.0) -> dict:
    current = running_state()
    if current is None:
        _stop_orphans(state.read_state())
        home = state.home()
        state.write_state({"status": "starting"})
        (home / "logs").mkdir(parents=True, exist_ok=True)
        with open(home / "logs" / "supervisor.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "margin.cluster.supervisor"], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "MARGIN_HOME": str(home)})
        current = _wait_ready(proc, timeout)
    ensure_demo_key(current)
    return state.read_state()


def _wait_ready(proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = state.read_state()
        if current.get("status") == "ready" and current.get("supervisor_pid") == proc.pid:
            return current
        if proc.poll() is not None or current.get("status") == "failed":
            proc.wait()
            raise ClusterError(f"the local cluster failed to start: {state.read_state().get('error', '')}")
        time.sleep(0.2)
    proc.terminate()
    raise ClusterError(f"the local cluster was not ready after {timeout:.0f}s{_progress(state.read_state())}; "
                       f"see {state.home() / 'logs'}")


def _progress(current: dict) -> str:
    """What a slow start was waiting on: the process, for how long, and the end of its log."""
    waiting = current.get("waiting_for")
    if not waiting:
        return " (the supervisor had not started any process)"
    try:
        tail = "\n".join(Path(waiting["log"]).read_text(errors="replace").splitlines()[-10:])
    except OSError:
        tail = ""
    healthy = [name for name in current.get("services", {}) if name != waiting["name"]]
    return (f": healthy {healthy}, waiting {time.time() - waiting['since']:.0f}s for {waiting['name']}, "
            f"whose log ends:\n{tail}\n")


def ensure_demo_key(current: dict) -> str:
    """A working API key for the demo tenant, kept in $MARGIN_HOME/demo.key."""
    path = state.demo_key_path()
    if path.exists():
        key = path.read_text().strip()
        conn = connect(current["services"]["registry"]["address"], key)
        try:
            registry_pb2_grpc.ModelRegistryStub(conn.channel).ListModels(
                registry_pb2.ListModelsRequest(page_size=1), metadata=conn.metadata, timeout=10)
            return key
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
        finally:
            conn.close()
    conn = connect(current["services"]["budget"]["address"], state.admin_key())
    try:
        key = create_tenant_key(conn, DEMO_TENANT, "local demo", exist_ok=True)
    finally:
        conn.close()
    state.write_secret(path, key)
    return key


def _stop_orphans(current: dict) -> bool:
    """The supervisor is gone (killed): stop any process it recorded that still runs."""
    orphans = [svc["pid"] for svc in current.get("services", {}).values() if state.pid_alive(svc.get("pid"))]
    for pid in orphans:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(state.pid_alive(p) for p in orphans) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in orphans:
        if state.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    if orphans:
        state.write_state({**current, "status": "stopped"})
    return bool(orphans)


def down(timeout: float = 60.0) -> bool:
    """Stop the supervisor (which stops every process). Returns False when nothing was running."""
    current = state.read_state()
    pid = current.get("supervisor_pid")
    if not state.pid_alive(pid):
        return _stop_orphans(current)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while state.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
        try:  # reap if it is our child (tests); otherwise it is reaped by init
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if state.pid_alive(pid):
        raise ClusterError(f"supervisor {pid} did not stop within {timeout:.0f}s")
    return True
