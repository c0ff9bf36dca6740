"""Recovery from a Triton restart: how long until every deployment serves again, and what clients see meanwhile.

Starts the local cluster (``margin up`` in a temp ``MARGIN_HOME``: Redis, tritonserver, every service, supervised),
uploads ``--deployments`` small TorchScript MLPs (64→32→10, one seed each) and deploys them. Then, twice — first with
ONE deployment (the time of one model load alone, measured in the same run), then with all of them — it runs a
Predict loop over the deployments (``--clients`` threads), SIGKILLs tritonserver, lets the supervisor restart it,
and measures from the kill:

- when Triton answers ServerReady again (the supervisor's restart plus Triton's start);
- when the gateway's health (grpc.health.v1) turned NOT_SERVING and back to SERVING;
- when each deployment served its first Predict again, and so when all of them had;
- how long the gateway took to load the deployments on the restarted Triton (its own log line);
- every failed call, by status code: all must be UNAVAILABLE (retryable, with a ``retry-after-ms`` hint).

Exits non-zero when any failed call was not UNAVAILABLE (or lacked the hint) or a deployment never came back.
Writes ``bench/results/recovery.json``.

    PYTHONPATH=services python bench/recovery_bench.py
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import platform
import re
import signal
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import cpu_model, cpu_seconds, machine_busy, process_tree, run_and_write
from margin.common import config
from margin.common.protoconv import signature_to_proto
from margin.common.tensors import Signature, TensorSpec
from margin.sdk.channel import connect
from margin.sdk.registry import RegistryClient
from margin.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
MODEL = "recovery"
SIGNATURE = Signature((TensorSpec("input", "FP32", (-1, 64)),), (TensorSpec("logits", "FP32", (-1, 10)),))
RELOADED = re.compile(r"replica (\S+) is ready; loaded (\d+) deployment\(s\) it lacked in ([\d.]+) s")
SERVING = health_pb2.HealthCheckResponse.SERVING
FAILURE_PAUSE_S = 0.25  # a client backs off after a failure (the gateway's hint says 1 s; shorter, to time recovery)


def mlp(seed: int, path: Path) -> Path:
    torch.manual_seed(seed)
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                         torch.nn.Linear(32, 10))).save(str(path))
    return path


class Clients:
    """``threads`` Predict loops over ``numbers`` (a request, then a 20 ms pause; 250 ms more after a failure, as a
    client backing off), and a monitor of Triton's and the gateway's health every 50 ms; everything stamped on one
    monotonic clock."""

    def __init__(self, gateway: str, key: str, triton: str, numbers: list[int], threads: int):
        self.channel = grpc.insecure_channel(gateway)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.md = (("authorization", f"Bearer {key}"),)
        self.triton = triton
        self.numbers = numbers
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        self.requests = {n: inference_pb2.PredictRequest(
            version=common_pb2.VersionRef(model=MODEL, number=n),
            inputs=[common_pb2.Tensor(name="input", dtype=common_pb2.DTYPE_FP32, shape=x.shape, raw=x.tobytes())])
            for n in numbers}
        self.lock = threading.Lock()
        self.successes: list[tuple[float, int]] = []          # (when, version)
        self.failures: list[tuple[float, str, str, str]] = []  # (when, code, details, retry-after-ms)
        self.triton_ready: list[tuple[float, bool]] = []       # changes only
        self.gateway_health: list[tuple[float, int]] = []      # changes only
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(k,), daemon=True) for k in range(threads)]
        self.threads.append(threading.Thread(target=self._monitor, daemon=True))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        self.channel.close()

    def _loop(self, k: int) -> None:
        turn = k
        while not self.stop.is_set():
            number = self.numbers[turn % len(self.numbers)]
            turn += 1
            try:
                self.stub.Predict(self.requests[number], metadata=self.md, timeout=30)
                with self.lock:
                    self.successes.append((time.monotonic(), number))
            except grpc.RpcError as err:
                retry = dict(err.trailing_metadata() or ()).get("retry-after-ms", "")
                with self.lock:
                    self.failures.append((time.monotonic(), err.code().name, err.details() or "", retry))
                time.sleep(FAILURE_PAUSE_S)
            time.sleep(0.02)

    def _monitor(self) -> None:
        triton = triton_grpc.InferenceServerClient(self.triton)
        try:
            while not self.stop.is_set():
                try:
                    ready = bool(triton.is_server_ready(client_timeout=0.5))
                except Exception:  # refused, reset, timed out: not ready
                    ready = False
                try:
                    status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    status = -1
                now = time.monotonic()
                if not self.triton_ready or self.triton_ready[-1][1] != ready:
                    self.triton_ready.append((now, ready))
                if not self.gateway_health or self.gateway_health[-1][1] != status:
                    self.gateway_health.append((now, status))
                time.sleep(0.05)
        finally:
            triton.close()


def gateway_reloads(log: Path, start: int) -> list[dict]:
    """The gateway's "loaded N deployment(s) it lacked in T s" lines written after byte ``start`` of its log."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return [{"replica": m[1], "loaded": int(m[2]), "seconds": float(m[3])} for m in RELOADED.finditer(text)]


REASONS = (("unreachable", "Triton down (connection refused or reset)"),
           ("being given its deployments", "Triton back, its deployments loading"),
           ("being loaded again", "a replica taking requests lacked the model (restart between probes)"),
           ("has no replica", "no replica"))


def reason(details: str) -> str:
    return next((label for key, label in REASONS if key in details), details[:80])


def back_times(clients: Clients, killed: float) -> dict[int, float]:
    """Per deployment, its first success after the first failed call since the kill (Triton down)."""
    with clients.lock:
        first_failure = min((t for t, *_ in clients.failures if t > killed), default=None)
        if first_failure is None:
            return {}
        back: dict[int, float] = {}
        for when, number in clients.successes:
            if when > first_failure and number not in back:
                back[number] = when
        return back


def restart_round(services: dict, key: str, numbers: list[int], args: argparse.Namespace, home: Path,
                  console: Console) -> dict:
    """A Predict loop over ``numbers``; Triton SIGKILLed once the loop serves; measured until every deployment has
    served again (and ``--settle`` seconds more)."""
    from margin.cluster import state

    log = home / "logs" / "inference.log"
    log_start = log.stat().st_size
    clients = Clients(services["inference"]["address"], key, services["triton"]["address"], numbers, args.clients)
    clients.start()
    try:
        deadline = time.monotonic() + 60
        while len({n for _, n in clients.successes}) < len(numbers):
            if time.monotonic() > deadline:
                raise RuntimeError("the Predict loop did not serve every deployment before the kill")
            time.sleep(0.1)
        pid = state.read_state()["services"]["triton"]["pid"]
        busy_before, _ = machine_busy()
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        console.print(f"  SIGKILLed tritonserver (pid {pid}) with {len(numbers)} deployment(s) under the loop")
        deadline = killed + args.timeout
        while len(back_times(clients, killed)) < len(numbers) and time.monotonic() < deadline:
            time.sleep(0.1)
        busy_after, _ = machine_busy()
        recovered = time.monotonic()
        new_pid = state.read_state()["services"]["triton"]["pid"]
        triton_cpu = cpu_seconds(process_tree(new_pid))  # since its start: Triton and its python-backend stubs
        load_average = os.getloadavg()[0]
        time.sleep(args.settle)
    finally:
        clients.close()
    back = back_times(clients, killed)
    after = [f for f in clients.failures if f[0] > killed]
    codes = collections.Counter(code for _, code, _, _ in after)
    hinted = sum(1 for *_, retry in after if retry and int(retry) > 0)
    triton_back = next((t - killed for t, ready in clients.triton_ready if t > killed and ready), None)
    not_serving = next((t - killed for t, s in clients.gateway_health if t > killed and s != SERVING), None)
    serving = next((t - killed for t, s in clients.gateway_health if t > killed and s == SERVING
                    and not_serving is not None and t - killed > not_serving), None)
    reloads = gateway_reloads(log, log_start)
    examples = {}
    for _, code, details, _ in after:
        examples.setdefault(code, details[:200])
    reasons = collections.Counter(f"{code}: {reason(details)}" for _, code, details, _ in after)
    return {
        "deployments": len(numbers), "clients": args.clients,
        "all_back": len(back) == len(numbers),
        "all_back_s": max(back.values()) - killed if len(back) == len(numbers) else None,
        "first_back_s": min(back.values()) - killed if back else None,
        "per_deployment_back_s": {str(n): round(t - killed, 3) for n, t in sorted(back.items())},
        "triton_ready_s": triton_back,
        "health_not_serving_s": not_serving, "health_serving_s": serving,
        "gateway_reload_s": max((r["seconds"] for r in reloads), default=None),
        "gateway_reload_lines": reloads,
        "triton_cpu_s": triton_cpu, "machine_busy_cores": (busy_after - busy_before) / (recovered - killed),
        "load_average_1m": load_average,
        "successes_after_kill": sum(1 for t, _ in clients.successes if t > killed),
        "failed_calls": dict(codes), "failed_with_retry_hint": hinted, "failed_total": len(after),
        "example_details": examples, "failed_by_reason": dict(reasons),
    }


def run(args: argparse.Namespace, console: Console) -> dict:
    home = Path(tempfile.mkdtemp(prefix="margin-recovery-"))
    os.environ["MARGIN_HOME"] = str(home)
    from margin.cluster import local, state  # after MARGIN_HOME: the cluster lives there

    with console.status("starting the local cluster…"):
        cluster = local.up()
    try:
        services = cluster["services"]
        key = state.demo_key_path().read_text().strip()
        registry = RegistryClient(connect(services["registry"]["address"], key))
        registry.ensure_model(MODEL, description="recovery benchmark")
        gateway = connect(services["inference"]["address"], key)
        stub = inference_pb2_grpc.InferenceStub(gateway.channel)
        numbers = []
        with console.status(f"uploading and deploying {args.deployments} MLPs…"):
            for seed in range(1, args.deployments + 1):
                number = registry.upload_file(mlp(seed, home / f"mlp{seed}.pt"), registry_pb2.UploadMetadata(
                    model=MODEL, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                    signature=signature_to_proto(SIGNATURE))).number
                numbers.append(number)
        rounds = {}
        for label, wanted in (("one", numbers[:1]), ("all", numbers)):
            for number in wanted:
                d = stub.Deploy(inference_pb2.DeployRequest(
                    version=common_pb2.VersionRef(model=MODEL, number=number),
                    batching=inference_pb2.BatchingConfig(max_batch_size=16, max_queue_delay_microseconds=500)),
                    metadata=gateway.metadata, timeout=300)
                if d.state != inference_pb2.DEPLOYMENT_STATE_READY:
                    raise RuntimeError(f"deploy {MODEL} v{number} failed: {d.message}")
            console.print(f"round '{label}': {len(wanted)} deployment(s) READY")
            rounds[label] = restart_round(services, key, wanted, args, home, console)
            console.print(f"  all back after {rounds[label]['all_back_s']} s; failed calls "
                          f"{rounds[label]['failed_calls']}")
        gateway.close()
    finally:
        local.down()
    one, every = rounds["one"], rounds["all"]
    only_unavailable = all(set(r["failed_calls"]) <= {"UNAVAILABLE"}
                           and r["failed_with_retry_hint"] == r["failed_total"] for r in rounds.values())
    ratio = (every["all_back_s"] / one["all_back_s"]) if every["all_back_s"] and one["all_back_s"] else None
    return {
        "benchmark": "recovery", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "gpu": torch.cuda.is_available()},
        "settings": {"deployments": args.deployments, "clients": args.clients, "settle_s": args.settle,
                     "reload_concurrency": config.RELOAD_CONCURRENCY.get_int()},
        "rounds": rounds,
        "all_vs_one_ratio": ratio,
        "only_unavailable": only_unavailable,
        "ok": only_unavailable and all(r["all_back"] for r in rounds.values()),
    }


def _s(value) -> str:
    return "—" if value is None else f"{value:.2f} s"


def report(result: dict, console: Console) -> None:
    s = result["settings"]
    table = Table(title=f"Triton SIGKILLed under a Predict loop ({s['clients']} clients), restarted by the "
                        f"supervisor: time from the kill (reload concurrency {s['reload_concurrency']})",
                  caption="'one' = one deployment: the time of one model load alone, in the same run")
    for col in ("deployments", "Triton ready", "health NOT_SERVING", "health SERVING", "gateway reload",
                "first back", "all back", "Triton CPU", "busy cores", "served after kill", "failed calls by code",
                "with retry hint"):
        table.add_column(col, justify="right")
    cores = result["machine"]["cpu_count"]
    for label in ("one", "all"):
        r = result["rounds"][label]
        table.add_row(str(r["deployments"]), _s(r["triton_ready_s"]), _s(r["health_not_serving_s"]),
                      _s(r["health_serving_s"]), _s(r["gateway_reload_s"]), _s(r["first_back_s"]),
                      _s(r["all_back_s"]), _s(r["triton_cpu_s"]),
                      f"{r['machine_busy_cores']:.2f}/{cores} (load {r['load_average_1m']:.1f})",
                      str(r["successes_after_kill"]),
                      ", ".join(f"{k} {v}" for k, v in sorted(r["failed_calls"].items())) or "none",
                      f"{r['failed_with_retry_hint']}/{r['failed_total']}")
    console.print(table)
    every = result["rounds"]["all"]
    if result["all_vs_one_ratio"] is not None:
        console.print(f"all {every['deployments']} back in {result['all_vs_one_ratio']:.2f}× the time one deployment "
                      f"takes (one after another it would be ≈{every['deployments']}× the load)")
    for label in ("one", "all"):
        r = result["rounds"][label]
        console.print(f"failed calls with {r['deployments']} deployment(s), by reason: "
                      + "; ".join(f"{k} × {v}" for k, v in sorted(r["failed_by_reason"].items())))
    mark = "[green]PASS[/]" if result["only_unavailable"] else "[red]FAIL[/]"
    console.print(f"{mark}  every failed call UNAVAILABLE with a retry hint")
    if not result["ok"]:
        console.print("[red]FAIL[/]  see above: a failed call was not UNAVAILABLE, or a deployment never came back")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployments", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4, help="Predict loops (threads)")
    parser.add_argument("--timeout", type=float, default=300, help="give up on a deployment after this long")
    parser.add_argument("--settle", type=float, default=2.0, help="keep the loop running this long after all are back")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "recovery.json")
    args = parser.parse_args()
    holder = {}

    def run_keep(a, console):
        holder["result"] = run(a, console)
        return holder["result"]

    run_and_write(run_keep, report, args)
    raise SystemExit(0 if holder["result"]["ok"] else 1)


if __name__ == "__main__":
    main()
