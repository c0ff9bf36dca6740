"""Cost truth: does the ledger equal the bill, on the real local cluster, under a recorded trace?

Starts the local cluster (``margin up`` in a temp ``MARGIN_HOME``: Redis, tritonserver, every service, a Celery
worker; metering every 5 s), uploads two TorchScript MLPs and deploys them on the one Triton: **A** (64→256→10,
min 1 replica) and **B** (64→32→10, min 0, scaled to zero after 5 s idle). Then it plays
``bench/traces/costtruth.json`` — idle, a ramp, a burst, idle — sending A's traffic both through the gateway and
straight to Triton (which the gateway never sees: only Triton's own statistics do), and one request to B every
20 s, each finding B scaled to zero (a cold start, timed by the client).

Over the trace's window (aligned to the metering interval) it reads the fleet view (``GetSpend`` view FLEET) and
prints, per pool and in all: the bill (replica-seconds × price), Σ allocations (tenants' serving + jobs' time), the
platform's idle line and the ratio (Σ allocations + idle) / bill (goal 1.000000: every micro allocated); and as an
independent check, each pool's bill against its process's own up-time from /proc × price. Also the allocation per
deployment (A's direct traffic included), the revenue and margin at a price list of $2 per million requests, and
the cold start p50/p99. Writes ``bench/results/costtruth.json``.

    PYTHONPATH=services python bench/costtruth_bench.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as triton_grpc
from harness import cpu_model, run_and_write
from margin.common.costs import PriceCatalog, format_money
from margin.common.protoconv import signature_to_proto, timestamp
from margin.common.tensors import Signature, TensorSpec
from margin.sdk.channel import connect
from margin.sdk.registry import RegistryClient
from margin.v1 import budget_pb2, budget_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
MODEL = "costtruth"
SIGNATURE = Signature((TensorSpec("input", "FP32", (-1, 64)),), (TensorSpec("logits", "FP32", (-1, 10)),))
PRICE_PER_MILLION = 2_000_000  # µ$: what the tenant charges per million requests (the margin report)
GOAL_RATIO = 1.0               # Σ allocations + idle = bill, to the micro
GOAL_PROC_PCT = 2.0            # each pool's bill within 2 % of its process's up-time × price


def mlp(hidden: int, seed: int, path: Path) -> Path:
    torch.manual_seed(seed)
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                         torch.nn.Linear(hidden, 10))).save(str(path))
    return path


def process_started(pid: int) -> float:
    """When ``pid`` started (epoch seconds), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime"))
    return boot + start / ticks


def rate(spec, fraction: float) -> float:
    return spec[0] + (spec[1] - spec[0]) * fraction if isinstance(spec, list) else float(spec)


class Trace:
    """Plays the phases: each second, the requests of that second evenly spaced, on a thread pool."""

    def __init__(self, phases: list[dict], gateway, direct, pool: ThreadPoolExecutor):
        self.phases, self.gateway, self.direct, self.pool = phases, gateway, direct, pool
        self.sent = {"gateway": 0, "direct": 0}
        self.failed = {"gateway": 0, "direct": 0}
        self._lock = threading.Lock()

    @property
    def seconds(self) -> int:
        return sum(p["seconds"] for p in self.phases)

    def _call(self, kind: str, fn) -> None:
        try:
            fn()
            ok = True
        except Exception:
            ok = False
        with self._lock:
            self.sent[kind] += 1
            self.failed[kind] += not ok

    def play(self, start: float) -> None:
        t = start
        for phase in self.phases:
            for second in range(phase["seconds"]):
                fraction = second / max(phase["seconds"] - 1, 1)
                for kind, fn in (("gateway", self.gateway), ("direct", self.direct)):
                    n = round(rate(phase[f"{kind}_rps"], fraction))
                    for i in range(n):
                        at = t + i / max(n, 1)
                        time.sleep(max(0.0, at - time.time()))
                        self.pool.submit(self._call, kind, fn)
                t += 1
                time.sleep(max(0.0, t - time.time()))


def cold_starts(stub, md, every_s: float, until: float, x: np.ndarray, name: str) -> list[dict]:
    """One request to B every ``every_s``: those that found it scaled to zero are cold starts, timed here."""
    out = []
    request = inference_pb2.PredictRequest(version=common_pb2.VersionRef(model=MODEL, number=2),
                                           inputs=[common_pb2.Tensor(name="input", dtype=common_pb2.DTYPE_FP32,
                                                                     shape=x.shape, raw=x.tobytes())])
    while time.time() + every_s < until:
        time.sleep(every_s)
        state = stub.GetDeployment(inference_pb2.GetDeploymentRequest(name=name), metadata=md).state
        began = time.perf_counter()
        stub.Predict(request, metadata=md, timeout=120)
        took = (time.perf_counter() - began) * 1000
        after = stub.GetDeployment(inference_pb2.GetDeploymentRequest(name=name), metadata=md)
        out.append({"scaled_to_zero_before": state == inference_pb2.DEPLOYMENT_STATE_SCALED_TO_ZERO,
                    "client_ms": took, "load_ms": after.last_cold_start_ms})
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(args: argparse.Namespace, console: Console) -> dict:
    trace_spec = json.loads(args.trace.read_text())
    home = Path(tempfile.mkdtemp(prefix="margin-costtruth-"))
    os.environ["MARGIN_HOME"] = str(home)
    from margin.cluster import local, processes, state  # after MARGIN_HOME: the cluster lives there

    interval = processes.LOCAL_FLEET_INTERVAL_S
    price = PriceCatalog.load().device("cpu").micros_per_hour
    with console.status("starting the local cluster…"):
        cluster = local.up()
    try:
        services = cluster["services"]
        key, admin_key = state.demo_key_path().read_text().strip(), state.admin_key()
        registry = RegistryClient(connect(services["registry"]["address"], key))
        registry.ensure_model(MODEL, description="cost truth benchmark")
        for hidden, seed in ((256, 1), (32, 2)):
            registry.upload_file(mlp(hidden, seed, home / f"mlp{hidden}.pt"), registry_pb2.UploadMetadata(
                model=MODEL, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, signature=signature_to_proto(SIGNATURE)))
        admin = connect(services["budget"]["address"], admin_key)
        budgets = budget_pb2_grpc.BudgetsStub(admin.channel)
        budgets.SetPriceList(budget_pb2.SetPriceListRequest(price_list=budget_pb2.PriceList(
            tenant=local.DEMO_TENANT, entries=[budget_pb2.PriceListEntry(
                model=MODEL, per_million=common_pb2.Money(micros=PRICE_PER_MILLION))])), metadata=admin.metadata)
        gateway = connect(services["inference"]["address"], key)
        stub = inference_pb2_grpc.InferenceStub(gateway.channel)
        batching = inference_pb2.BatchingConfig(max_batch_size=16, max_queue_delay_microseconds=500)
        a = stub.Deploy(inference_pb2.DeployRequest(version=common_pb2.VersionRef(model=MODEL, number=1),
                                                    batching=batching), metadata=gateway.metadata)
        b = stub.Deploy(inference_pb2.DeployRequest(
            version=common_pb2.VersionRef(model=MODEL, number=2), batching=batching, min_replicas=0,
            scale_to_zero_after_seconds=int(trace_spec["scale_to_zero_after_s"])), metadata=gateway.metadata)
        triton = triton_grpc.InferenceServerClient(services["triton"]["address"])
        triton_a = next(m["name"] for m in triton.get_model_repository_index(as_json=True)["models"]
                        if m["name"].endswith(f"--{a.name}"))
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        request = inference_pb2.PredictRequest(version=common_pb2.VersionRef(model=MODEL, number=1),
                                               inputs=[common_pb2.Tensor(name="input", dtype=common_pb2.DTYPE_FP32,
                                                                         shape=x.shape, raw=x.tobytes())])
        direct_input = triton_grpc.InferInput("input", [1, 64], "FP32")
        direct_input.set_data_from_numpy(x)
        with ThreadPoolExecutor(16) as pool:
            trace = Trace(trace_spec["phases"], lambda: stub.Predict(request, metadata=gateway.metadata, timeout=30),
                          lambda: triton.infer(triton_a, [direct_input]), pool)
            start = (int(time.time() / interval) + 1) * interval
            end = start + trace.seconds
            console.print(f"playing {args.trace.name} ({trace.seconds} s) from {dt.datetime.fromtimestamp(start)}; "
                          f"A = {a.name}, B = {b.name} (min 0, to zero after {trace_spec['scale_to_zero_after_s']} s)")
            time.sleep(max(0.0, start - time.time()))
            colds: list[dict] = []
            cold = threading.Thread(target=lambda: colds.extend(cold_starts(
                stub, gateway.metadata, trace_spec["cold_start_every_s"], end, x, b.name)))
            cold.start()
            trace.play(start)
            cold.join()
        with console.status("billing the trace's last interval…"):
            time.sleep(max(0.0, end - time.time()) + interval + 3)
        window = {"since": timestamp(dt.datetime.fromtimestamp(start + 0.001, dt.UTC)),
                  "until": timestamp(dt.datetime.fromtimestamp(end + 0.001, dt.UTC))}
        fleet = budgets.GetSpend(budget_pb2.GetSpendRequest(view=budget_pb2.SPEND_VIEW_FLEET, **window),
                                 metadata=admin.metadata).fleet
        margin = budgets.GetSpend(budget_pb2.GetSpendRequest(
            view=budget_pb2.SPEND_VIEW_MARGIN, tenant=local.DEMO_TENANT, **window), metadata=admin.metadata).margin
        deployments = {d.name: d for d in stub.ListDeployments(inference_pb2.ListDeploymentsRequest(model=MODEL),
                                                               metadata=gateway.metadata).deployments}
        ledger = [e for e in budgets.ListLedger(budget_pb2.ListLedgerRequest(
            page_size=1000, category=budget_pb2.SPEND_CATEGORY_SERVING, **window), metadata=gateway.metadata).entries]
        pids = {"triton/default": services["triton"]["pid"], "worker/train.cpu": services["worker-cpu"]["pid"]}
        pools = []
        for line in fleet.pools:
            pid = pids.get(line.pool)
            up = min(end, time.time()) - max(start, process_started(pid)) if pid else None
            independent = up * price / 3600 if up is not None else None
            pools.append({
                "pool": line.pool, "kind": line.kind, "replica_seconds": line.replica_seconds,
                "bill_micros": line.bill.micros, "allocated_micros": line.allocated.micros,
                "idle_micros": line.idle.micros, "utilization": line.utilization, "intervals": line.intervals,
                "process_up_seconds": up, "process_up_times_price_micros": independent,
                "bill_vs_process_pct": None if not independent else 100 * (line.bill.micros / independent - 1)})
        served = {}
        for name, d in deployments.items():
            entries = [e for e in ledger if e.deployment == name]
            served[name] = {"allocated_micros": sum(e.amount.micros for e in entries),
                            "gateway_requests": sum(e.quantity for e in entries),
                            "served_cost_per_million_micros": d.served_cost_per_million.micros,
                            "served_cost_source": d.served_cost_source,
                            "allocated_cost_per_million_micros": d.allocated_cost_per_million.micros or None}
        cold_ms = [c["client_ms"] for c in colds if c["scaled_to_zero_before"]]
        load_ms = [c["load_ms"] for c in colds if c["scaled_to_zero_before"]]
        total = fleet.tenants.micros + fleet.jobs.micros + fleet.platform_idle.micros
        return {
            "machine": {"node": platform.node(), "cpu_count": os.cpu_count(), "cpu": cpu_model(),
                        "python": platform.python_version()},
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "trace": trace_spec, "window": {"start": start, "end": end, "seconds": end - start},
            "metering_interval_s": interval, "idle_policy": fleet.idle_policy, "price_micros_per_hour": price,
            "requests": {"sent": trace.sent, "failed": trace.failed},
            "bill_micros": fleet.bill.micros, "tenants_micros": fleet.tenants.micros, "jobs_micros": fleet.jobs.micros,
            "platform_idle_micros": fleet.platform_idle.micros, "allocated_plus_idle_micros": total,
            "ratio": total / fleet.bill.micros if fleet.bill.micros else None, "balanced": fleet.balanced,
            "pools": pools, "deployments": served,
            "margin": {"revenue_micros": margin.revenue.micros, "cost_micros": margin.cost.micros,
                       "gross_margin_micros": margin.gross_margin.micros,
                       "price_per_million_micros": PRICE_PER_MILLION},
            "cold_starts": {"count": len(cold_ms), "requests_to_b": len(colds),
                            "client_p50_ms": percentile(cold_ms, 0.5), "client_p99_ms": percentile(cold_ms, 0.99),
                            "load_p50_ms": percentile(load_ms, 0.5), "load_p99_ms": percentile(load_ms, 0.99),
                            "client_mean_ms": statistics.fmean(cold_ms) if cold_ms else None, "each": colds},
        }
    finally:
        local.down()


def report(result: dict, console: Console) -> None:
    table = Table(title=f"Cost truth: {result['window']['seconds']:.0f} s of {result['trace']['description'][:60]}…, "
                        f"metering every {result['metering_interval_s']:g} s, idle policy {result['idle_policy']}")
    for col in ("pool", "replica-s", "bill", "allocated", "idle", "(alloc+idle)/bill", "utilization",
                "/proc up-time × price", "bill vs /proc"):
        table.add_column(col, justify="left" if col == "pool" else "right")
    for p in result["pools"]:
        ratio = (p["allocated_micros"] + p["idle_micros"]) / p["bill_micros"] if p["bill_micros"] else float("nan")
        table.add_row(p["pool"], f"{p['replica_seconds']:.1f}", format_money(p["bill_micros"]),
                      format_money(p["allocated_micros"]), format_money(p["idle_micros"]), f"{ratio:.6f}",
                      f"{p['utilization']:.1%}",
                      format_money(round(p["process_up_times_price_micros"] or 0)),
                      "—" if p["bill_vs_process_pct"] is None else f"{p['bill_vs_process_pct']:+.2f} %")
    table.add_section()
    table.add_row("all", "", format_money(result["bill_micros"]),
                  format_money(result["tenants_micros"] + result["jobs_micros"]),
                  format_money(result["platform_idle_micros"]), f"{result['ratio']:.6f}", "", "", "")
    console.print(table)
    deployments = Table(title="Where the serving bill went (A's direct requests to Triton included)")
    for col in ("deployment", "allocated", "gateway requests", "served $/1M (source)", "billed $/1M"):
        deployments.add_column(col, justify="left" if col == "deployment" else "right")
    for name, d in result["deployments"].items():
        deployments.add_row(name, format_money(d["allocated_micros"]), f"{d['gateway_requests']:,}",
                            f"{format_money(d['served_cost_per_million_micros'])} ({d['served_cost_source']})",
                            format_money(d["allocated_cost_per_million_micros"])
                            if d["allocated_cost_per_million_micros"] else "—")
    console.print(deployments)
    c, m, r = result["cold_starts"], result["margin"], result["requests"]
    console.print(f"requests: {r['sent']} sent, {r['failed']} failed; cold starts of B: {c['count']} of "
                  f"{c['requests_to_b']} requests, client p50 {c['client_p50_ms'] or 0:.0f} ms / p99 "
                  f"{c['client_p99_ms'] or 0:.0f} ms (the load itself p50 {c['load_p50_ms'] or 0:.0f} ms)")
    console.print(f"margin at {format_money(m['price_per_million_micros'])} per million: revenue "
                  f"{format_money(m['revenue_micros'])}, allocated cost {format_money(m['cost_micros'])}, gross "
                  f"margin {format_money(m['gross_margin_micros'])}")
    worst = max((abs(p["bill_vs_process_pct"]) for p in result["pools"] if p["bill_vs_process_pct"] is not None),
                default=None)
    for met, text in ((result["balanced"] and result["ratio"] == GOAL_RATIO,
                       f"ledger = bill: (Σ allocations + idle) / bill = {result['ratio']:.6f} (goal 1.000000)"),
                      (worst is not None and worst <= GOAL_PROC_PCT,
                       f"each pool's bill within {GOAL_PROC_PCT:g} % of its process's /proc up-time × price: worst "
                       f"{worst if worst is not None else float('nan'):.2f} %")):
        console.print(f"{'[green]met[/]' if met else '[red]missed[/]'}  {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=REPO / "bench/traces/costtruth.json")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/costtruth.json")
    run_and_write(run, report, parser.parse_args())


if __name__ == "__main__":
    main()
