"""Gateway overhead benchmark: the same Predict requests straight to Triton and through the Inference gateway.

Starts redis-server, tritonserver, ``margin.budget``, ``margin.registry`` and ``margin.inference`` as real
processes in a temp dir (one SQLite database), uploads a TorchScript MLP 64→128→10, deploys it through
the gateway (dynamic batching), then at each concurrency sends batch-1 requests of one random input
(a) with ``tritonclient.grpc.aio`` to the Triton model the gateway deployed and (b) with a ``grpc.aio``
``InferenceStub`` to the gateway. The two paths run in A-B-B-A order per concurrency level so drift
affects both equally. Reports throughput, p50/p99 latency, their ratios, and the CPU time per request of
the gateway, Triton (with its python-backend stub), Redis and the load generator, from /proc.

    PYTHONPATH=services python bench/gateway_bench.py --seconds 5
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from harness import cpu_model, cpu_seconds, machine_busy, process_tree, run_and_write, start, tenant_key
from margin.cluster.processes import ManagedProcess, ProcessSpec, redis_spec, standalone_service_spec
from margin.common.protoconv import signature_to_proto
from margin.common.tensors import Signature, TensorSpec
from margin.inference.triton_process import triton_spec
from margin.sdk.channel import Connection, connect
from margin.sdk.registry import RegistryClient
from margin.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2
from rich.console import Console
from rich.table import Table

MODEL = "bench-mlp"
SIGNATURE = Signature((TensorSpec("input", "FP32", (-1, 64)),), (TensorSpec("logits", "FP32", (-1, 10)),))
GOAL_RATIO = 0.9          # gateway req/s >= 0.9 x direct, at concurrency 8
GOAL_P50_ADDED_MS = 1.0   # gateway p50 - direct p50 <= 1 ms, at concurrency 8
GOAL_CONCURRENCY = 8
PATHS = ("direct", "gateway")


# -- processes -------------------------------------------------------------------------------------
def service_spec(name: str, module: str, workdir: Path, admin_key: str, extra: dict[str, str]) -> ProcessSpec:
    return standalone_service_spec(name, module, workdir, admin_key, **extra)


@dataclass
class CpuProbe:
    """CPU seconds used by each watched party between ``snap`` calls, and Triton's request and batch
    counts for the model (inference_count / execution_count = the mean dynamic batch size)."""
    groups: dict[str, Callable[[], list[int]]]
    triton_address: str
    triton_model: str

    def snap(self) -> dict[str, float]:
        snap = {name: cpu_seconds(pids()) for name, pids in self.groups.items()}
        snap["client"] = sum(os.times()[:2])
        snap["machine_busy"], snap["machine_total"] = machine_busy()
        client = triton_grpc.InferenceServerClient(self.triton_address)
        try:
            stats = client.get_inference_statistics(self.triton_model, as_json=True)["model_stats"][0]
        finally:
            client.close()
        snap["triton_inferences"] = float(stats.get("inference_count", 0))
        snap["triton_executions"] = float(stats.get("execution_count", 0))
        return snap

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: after[k] - before[k] for k in before}


# -- setup -----------------------------------------------------------------------------------------
def build_model(workdir: Path) -> tuple[torch.jit.ScriptModule, Path]:
    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                                  torch.nn.Linear(128, 10)))
    path = workdir / "mlp.pt"
    module.save(str(path))
    return module, path


def upload(conn: Connection, path: Path) -> int:
    client = RegistryClient(conn)
    client.create_model(MODEL, description="gateway benchmark MLP 64-128-10")
    return client.upload_file(path, registry_pb2.UploadMetadata(
        model=MODEL, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, signature=signature_to_proto(SIGNATURE),
        description="gateway benchmark")).number


def deploy(gateway_address: str, key: str, number: int, max_batch: int, delay_us: int) -> inference_pb2.Deployment:
    with grpc.insecure_channel(gateway_address) as channel:
        return inference_pb2_grpc.InferenceStub(channel).Deploy(inference_pb2.DeployRequest(
            version=common_pb2.VersionRef(model=MODEL, number=number),
            batching=inference_pb2.BatchingConfig(max_batch_size=max_batch, max_queue_delay_microseconds=delay_us)),
            metadata=(("authorization", f"Bearer {key}"),), timeout=300)


def triton_model_name(triton_address: str, deployment: str) -> str:
    """The Triton name the gateway gave the deployment (``t<tenant_id>--<model>-v<n>``), from Triton itself."""
    client = triton_grpc.InferenceServerClient(triton_address)
    try:
        index = client.get_model_repository_index(as_json=True).get("models", [])
    finally:
        client.close()
    names = [m["name"] for m in index if m["name"].endswith(f"--{deployment}") and m.get("state") == "READY"]
    if len(names) != 1:
        raise RuntimeError(f"expected one READY Triton model for {deployment}, Triton has {index}")
    return names[0]


# -- load generation -------------------------------------------------------------------------------
Call = Callable[[], Awaitable[object]]


@dataclass
class Segment:
    requests: int
    seconds: float
    latencies: list[float]
    cpu: dict[str, float]


@dataclass
class PathStats:
    segments: list[Segment] = field(default_factory=list)

    def summary(self) -> dict:
        lat = np.array([x for s in self.segments for x in s.latencies]) * 1000
        requests = sum(s.requests for s in self.segments)
        seconds = sum(s.seconds for s in self.segments)
        cpu = {k: sum(s.cpu[k] for s in self.segments) for k in self.segments[0].cpu}
        per_req_us = {k: cpu[k] / requests * 1e6 for k in ("gateway", "triton", "redis", "client")}
        return {"requests": requests, "seconds": seconds, "rps": requests / seconds,
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "mean_ms": float(lat.mean()), "max_ms": float(lat.max()),
                "segment_rps": [s.requests / s.seconds for s in self.segments],
                "cpu_seconds": cpu, "cpu_us_per_request": per_req_us,
                "machine_busy_cores": cpu["machine_busy"] / seconds,
                "machine_cores": cpu["machine_total"] / seconds,
                "triton_mean_batch": cpu["triton_inferences"] / max(cpu["triton_executions"], 1)}


async def drive(call: Call, concurrency: int, seconds: float, probe: CpuProbe | None = None) -> Segment:
    """``concurrency`` workers each looping ``call`` until the deadline; per-request latencies."""
    latencies: list[float] = []
    loop_deadline = 0.0

    async def worker() -> None:
        while time.perf_counter() < loop_deadline:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    before = probe.snap() if probe else None
    t_start = time.perf_counter()
    loop_deadline = t_start + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    cpu = CpuProbe.delta(before, probe.snap()) if probe else {}
    return Segment(len(latencies), elapsed, latencies, cpu)


class Clients:
    """The two ways to send the same batch-1 request."""

    def __init__(self, triton_address: str, triton_name: str, gateway_address: str, key: str, number: int):
        self.triton_name, self.number = triton_name, number
        self.triton = triton_aio.InferenceServerClient(triton_address)
        self.channel = grpc.aio.insecure_channel(gateway_address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.md = (("authorization", f"Bearer {key}"),)
        self.outputs = [triton_aio.InferRequestedOutput("logits")]

    async def close(self) -> None:
        await self.triton.close()
        await self.channel.close()

    def triton_inputs(self, x: np.ndarray) -> list:
        tensor = triton_aio.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return [tensor]

    def gateway_request(self, x: np.ndarray) -> inference_pb2.PredictRequest:
        return inference_pb2.PredictRequest(
            version=common_pb2.VersionRef(model=MODEL, number=self.number),
            inputs=[common_pb2.Tensor(name="input", dtype=common_pb2.DTYPE_FP32, shape=x.shape, raw=x.tobytes())])

    async def direct_out(self, x: np.ndarray) -> np.ndarray:
        result = await self.triton.infer(self.triton_name, self.triton_inputs(x), outputs=self.outputs)
        return result.as_numpy("logits")

    async def gateway_out(self, x: np.ndarray) -> np.ndarray:
        reply = await self.stub.Predict(self.gateway_request(x), metadata=self.md, timeout=30)
        out = reply.outputs[0]
        return np.frombuffer(out.raw, dtype=np.float32).reshape(tuple(out.shape))

    def calls(self, x: np.ndarray) -> dict[str, Call]:
        """Request objects built once, as a real client would; responses are not decoded on either path."""
        inputs, request = self.triton_inputs(x), self.gateway_request(x)
        return {"direct": lambda: self.triton.infer(self.triton_name, inputs, outputs=self.outputs),
                "gateway": lambda: self.stub.Predict(request, metadata=self.md, timeout=30)}


async def verify(clients: Clients, module: torch.jit.ScriptModule, samples: int, seed: int) -> dict:
    """Random inputs through both paths: gateway == direct == the TorchScript module run here."""
    rng = np.random.default_rng(seed)
    worst_gw_vs_direct = worst_vs_torch = 0.0
    ok = True
    for _ in range(samples):
        x = rng.standard_normal((1, 64)).astype(np.float32)
        direct, gateway = await asyncio.gather(clients.direct_out(x), clients.gateway_out(x))
        expected = module(torch.from_numpy(x)).detach().numpy()
        ok &= bool(np.allclose(gateway, direct, atol=1e-6) and np.allclose(direct, expected, atol=1e-5))
        worst_gw_vs_direct = max(worst_gw_vs_direct, float(np.abs(gateway - direct).max()))
        worst_vs_torch = max(worst_vs_torch, float(np.abs(direct - expected).max()))
    return {"samples": samples, "all_close": ok, "max_abs_diff_gateway_vs_direct": worst_gw_vs_direct,
            "max_abs_diff_direct_vs_torch": worst_vs_torch}


async def measure(clients: Clients, module: torch.jit.ScriptModule, probe: CpuProbe, args: argparse.Namespace,
                  console: Console) -> dict:
    x = np.random.default_rng(args.seed).standard_normal((1, 64)).astype(np.float32)
    verification = await verify(clients, module, args.verify, args.seed + 1)
    if not verification["all_close"]:
        raise RuntimeError(f"gateway and direct outputs differ: {verification}")
    calls = clients.calls(x)
    levels = []
    half = args.seconds / 2
    for concurrency in args.concurrency:
        for path in PATHS:
            await drive(calls[path], concurrency, args.warmup)
        stats = {path: PathStats() for path in PATHS}
        for path in ("direct", "gateway", "gateway", "direct"):  # A-B-B-A: linear drift cancels
            stats[path].segments.append(await drive(calls[path], concurrency, half, probe))
        level = {"concurrency": concurrency, **{path: stats[path].summary() for path in PATHS}}
        d, g = level["direct"], level["gateway"]
        level["rps_ratio"] = g["rps"] / d["rps"]
        level["p50_added_ms"] = g["p50_ms"] - d["p50_ms"]
        level["p99_added_ms"] = g["p99_ms"] - d["p99_ms"]
        levels.append(level)
        console.print(f"  concurrency {concurrency:>3}: direct {d['rps']:,.0f} req/s p50 {d['p50_ms']:.2f} ms | "
                      f"gateway {g['rps']:,.0f} req/s p50 {g['p50_ms']:.2f} ms")
    post = await verify(clients, module, args.verify, args.seed + 2)
    return {"levels": levels, "verification": {"before": verification, "after": post}}


async def profile_gateway(clients: Clients, gateway_pid: int, args: argparse.Namespace, workdir: Path,
                          console: Console) -> dict | None:
    """Optionally, py-spy record the gateway at the goal concurrency (a separate run, not in the figures)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        console.print("[yellow]--profile: py-spy not found (pip install py-spy); skipped[/]")
        return None
    out = args.profile
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = max(3, int(args.seconds))
    raw = workdir / "profile.txt"
    cmd = [py_spy, "record", "--pid", str(gateway_pid), "--duration", str(seconds), "--rate", "250",
           "--format", "raw", "--output", str(raw), "--threads", "--nonblocking"]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        x = np.random.default_rng(args.seed).standard_normal((1, 64)).astype(np.float32)
        await asyncio.sleep(0.5)
        await drive(clients.calls(x)["gateway"], GOAL_CONCURRENCY, seconds)
    finally:
        spy.wait(seconds + 60)
    if not raw.exists():
        console.print("[yellow]--profile: py-spy wrote nothing[/]")
        return None
    shutil.copyfile(raw, out)
    return summarize_profile(raw)


PROFILE_BUCKETS = (  # first match from the leaf-most frame outward wins
    ("rate limiter (Redis EVALSHA)", ("RateLimiter.take",)),
    ("Triton call (sync gRPC client)", ("TritonClient.infer",)),
    ("metering", ("Meter.",)),
    ("gateway logic (route, validate, price, convert)", ("Gateway.", "InferenceServicer.", "convert.",
                                                         "ServiceInterceptor.", "TenantStore.")),
    ("gRPC server machinery and thread hand-offs", ("grpc/_server.py", "concurrent/futures/thread.py")),
)


def summarize_profile(raw: Path, top: int = 15) -> dict:
    """py-spy collapsed stacks (non-idle threads) → share of samples per bucket and the top leaf frames."""
    buckets: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")[1:]  # the first is the thread
        bucket = "other (background threads, interpreter)"
        for frame in reversed(frames):
            hit = next((name for name, keys in PROFILE_BUCKETS if any(k in frame for k in keys)), None)
            if hit:
                bucket = hit
                break
        buckets[bucket] = buckets.get(bucket, 0) + n
        leaf = frames[-1].rsplit(":", 1)[0] + ")" if frames else "?"
        leaves[leaf] = leaves.get(leaf, 0) + n
    total = max(total, 1)
    return {"samples": total, "mode": "py-spy record --nonblocking: non-idle threads (running or waiting for the GIL)",
            "buckets": [{"bucket": k, "share": v / total} for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])],
            "top_leaf_frames": [{"frame": k, "share": v / total}
                                for k, v in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]]}


# -- report ----------------------------------------------------------------------------------------
def report(result: dict, console: Console) -> None:
    s = result["settings"]
    table = Table(title=f"Inference gateway vs direct Triton: batch 1, {s['seconds']:.0f} s per path per level "
                        f"(A-B-B-A), dynamic batching max {s['max_batch_size']}, "
                        f"queue delay {s['max_queue_delay_us']} us",
                  caption="ratio = gateway req/s / direct req/s; p50 added = gateway p50 - direct p50")
    for col in ("concurrency", "direct req/s", "gateway req/s", "ratio", "direct p50 ms", "direct p99 ms",
                "gateway p50 ms", "gateway p99 ms", "p50 added ms"):
        table.add_column(col, justify="right")
    for lv in result["levels"]:
        d, g = lv["direct"], lv["gateway"]
        table.add_row(str(lv["concurrency"]), f"{d['rps']:,.0f}", f"{g['rps']:,.0f}", f"{lv['rps_ratio']:.2f}x",
                      f"{d['p50_ms']:.2f}", f"{d['p99_ms']:.2f}", f"{g['p50_ms']:.2f}", f"{g['p99_ms']:.2f}",
                      f"{lv['p50_added_ms']:+.2f}")
    console.print(table)

    cpu = Table(title="CPU time per request (us, utime+stime from /proc) and machine load",
                caption=f"{result['machine']['cpu_count']} cores shared by every process; triton includes its "
                        "python-backend stub; on direct rows the gateway and redis figures are their idle load")
    for col in ("concurrency", "path", "gateway", "triton", "redis", "client", "sum", "busy cores",
                "Triton mean batch"):
        cpu.add_column(col, justify="right")
    for lv in result["levels"]:
        for path in PATHS:
            per = lv[path]["cpu_us_per_request"]
            cpu.add_row(str(lv["concurrency"]), path, f"{per['gateway']:.0f}", f"{per['triton']:.0f}",
                        f"{per['redis']:.0f}", f"{per['client']:.0f}", f"{sum(per.values()):.0f}",
                        f"{lv[path]['machine_busy_cores']:.2f}/{lv[path]['machine_cores']:.0f}",
                        f"{lv[path]['triton_mean_batch']:.2f}")
    console.print(cpu)

    for goal in result["goals"]:
        mark = "[green]PASS[/]" if goal["met"] else "[red]MISS[/]"
        console.print(f"{mark}  {goal['name']}: {goal['goal']} - measured {goal['value']:.3f}")
    v = result["verification"]
    diff = max(v["before"]["max_abs_diff_gateway_vs_direct"], v["after"]["max_abs_diff_gateway_vs_direct"])
    console.print(f"outputs: gateway == direct == TorchScript on {v['before']['samples'] + v['after']['samples']} "
                  f"random inputs: {v['before']['all_close'] and v['after']['all_close']} "
                  f"(max |gateway - direct| {diff:.1e})")
    if result.get("profile"):
        prof = result["profile"]
        console.print(f"py-spy profile of the gateway at concurrency {GOAL_CONCURRENCY} "
                      f"({prof['samples']} samples of non-idle threads), by where the stack is:")
        for row in prof["buckets"]:
            console.print(f"  {row['share'] * 100:5.1f}%  {row['bucket']}")
        console.print("  top leaf frames:")
        for row in prof["top_leaf_frames"]:
            console.print(f"  {row['share'] * 100:5.1f}%  {row['frame']}")


def run(args: argparse.Namespace, console: Console) -> dict:
    admin_key = secrets.token_urlsafe(32)
    workdir = Path(tempfile.mkdtemp(prefix="margin-gateway-bench-"))
    started: list[ManagedProcess] = []
    conn: Connection | None = None
    try:
        repository = workdir / "model-repository"
        redis_proc = start(redis_spec(workdir), workdir, started, 30)
        triton = start(triton_spec(workdir, repository), workdir, started, 120)
        # Budget first: each service creates its schema on start, and SQLite DDL from two processes can race.
        budget = start(service_spec("budget", "margin.budget", workdir, admin_key, {}), workdir, started, 30)
        registry = start(service_spec("registry", "margin.registry", workdir, admin_key, {}), workdir, started, 30)
        gateway = start(service_spec("inference", "margin.inference", workdir, admin_key, {
            "MARGIN_TRITON_URL": triton.spec.address, "MARGIN_REGISTRY_ADDR": registry.spec.address,
            "MARGIN_BUDGET_ADDR": budget.spec.address, "MARGIN_REDIS_URL": f"redis://{redis_proc.spec.address}/0",
            "MARGIN_MODEL_REPOSITORY": str(repository),
            "MARGIN_RATE_LIMIT_RPS": str(args.rate_limit), "MARGIN_RATE_LIMIT_BURST": str(args.rate_limit)}),
            workdir, started, 60)

        key = tenant_key(budget, admin_key, "gateway bench")
        module, path = build_model(workdir)
        conn = connect(registry.spec.address, key)
        number = upload(conn, path)
        deployment = deploy(gateway.spec.address, key, number, args.max_batch_size, args.queue_delay_us)
        if deployment.state != inference_pb2.DEPLOYMENT_STATE_READY:
            raise RuntimeError(f"deploy failed: {deployment}")
        triton_name = triton_model_name(triton.spec.address, deployment.name)
        console.print(f"deployed {deployment.name} as Triton model {triton_name}; measuring "
                      f"{args.concurrency} x (direct, gateway) for {args.seconds:g} s each")

        probe = CpuProbe({"gateway": lambda: [gateway.proc.pid], "triton": lambda: process_tree(triton.proc.pid),
                          "redis": lambda: [redis_proc.proc.pid]}, triton.spec.address, triton_name)

        async def main() -> tuple[dict, dict | None]:
            clients = Clients(triton.spec.address, triton_name, gateway.spec.address, key, number)
            try:
                measured = await measure(clients, module, probe, args, console)
                profile = (await profile_gateway(clients, gateway.proc.pid, args, workdir, console)
                           if args.profile else None)
                return measured, profile
            finally:
                await clients.close()

        measured, profile = asyncio.run(main())
        for process in started:
            if process.proc.poll() is not None:
                raise RuntimeError(f"{process.spec.name} died during the run\n{process.log_tail()}")
    finally:
        if conn:
            conn.close()
        for process in reversed(started):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    at_goal = next((lv for lv in measured["levels"] if lv["concurrency"] == GOAL_CONCURRENCY), None)
    goals = []
    if at_goal:
        goals = [
            {"name": "throughput", "goal": f"gateway req/s >= {GOAL_RATIO} x direct at concurrency "
                                           f"{GOAL_CONCURRENCY}", "value": at_goal["rps_ratio"],
             "met": at_goal["rps_ratio"] >= GOAL_RATIO},
            {"name": "p50_added", "goal": f"gateway p50 - direct p50 <= {GOAL_P50_ADDED_MS} ms at concurrency "
                                          f"{GOAL_CONCURRENCY}", "value": at_goal["p50_added_ms"],
             "met": at_goal["p50_added_ms"] <= GOAL_P50_ADDED_MS},
        ]
    return {
        "machine": {"node": platform.node(), "cpu_count": os.cpu_count(), "cpu": cpu_model(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "grpcio": grpc.__version__, "torch": torch.__version__},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {"seconds": args.seconds, "warmup_s": args.warmup, "concurrency": args.concurrency,
                     "order": "A-B-B-A per level (direct, gateway, gateway, direct), seconds/2 each",
                     "batch": 1, "model": "TorchScript MLP 64-128-10 on the python backend (CPU)",
                     "max_batch_size": args.max_batch_size, "max_queue_delay_us": args.queue_delay_us,
                     "rate_limit_rps": args.rate_limit, "rate_limit_burst": args.rate_limit,
                     "gateway_grpc_workers": int(os.environ.get("MARGIN_GRPC_WORKERS", "16")),
                     "direct_client": "tritonclient.grpc.aio", "gateway_client": "grpc.aio InferenceStub",
                     "triton_model": triton_name, "deployment": deployment.name,
                     "deploy_calibration": {"capacity_rps": deployment.capacity_rps,
                                            "latency_p50_ms": deployment.latency_p50_ms}},
        "levels": measured["levels"],
        "verification": measured["verification"],
        "goals": goals,
        "profile": profile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per path per concurrency")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per path per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--queue-delay-us", type=int, default=0, help="Triton dynamic batching queue delay")
    parser.add_argument("--rate-limit", type=int, default=1_000_000,
                        help="gateway rate limit and burst (high: the limiter runs but never refuses)")
    parser.add_argument("--verify", type=int, default=16, help="random inputs compared before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=Path, default=None,
                        help="also py-spy record the gateway at concurrency 8 (extra run) into this raw file")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gateway.json"))
    args = parser.parse_args()
    if args.seconds <= 0 or args.warmup < 0 or min(args.concurrency) < 1:
        parser.error("--seconds must be > 0, --warmup >= 0, --concurrency >= 1")

    run_and_write(run, report, args)


if __name__ == "__main__":
    main()
