"""Gateway overhead benchmark: the same batch-1 requests straight to Triton, through a bare Python proxy, through
Margin's KServe v2 (Open Inference Protocol) endpoint and through ``margin.v1.Inference.Predict``.

Starts redis-server, tritonserver, ``margin.budget``, ``margin.registry``, ``margin.inference`` (the gateway) and
``bench/bare_proxy.py`` as real processes in a temp dir (one SQLite database). For each model — (a) a TorchScript
MLP 64→128→10 and (b) MiniLM-L6 as served (``margin.compression.minilm``'s SentenceEncoder from the packaged
weights, traced) — it uploads a TORCHSCRIPT version, deploys it through the gateway's Deploy (dynamic batching, max
batch 32, queue delay 0), checks that every path answers what direct Triton answers (and direct Triton what the
module run here answers), then at each concurrency (1, 8, 32) sends one fixed request over and over on each path:

- ``direct``: ``tritonclient.grpc.aio`` to Triton, under the Triton model name the gateway gave the deployment;
- ``proxy``: the same client to ``bench/bare_proxy.py`` (bytes forwarded to Triton, nothing decoded): the floor of
  one Python round trip per request;
- ``oip``: the same client to the gateway, model = the Margin model, version "" (routing), with the tenant's key;
- ``predict``: a ``grpc.aio`` ``InferenceStub.Predict`` with a prebuilt ``PredictRequest`` (Predict is not OIP, so
  this one path cannot use the shared tritonclient code).

The paths run in A-B-B-A order per level (direct, proxy, oip, predict, predict, oip, proxy, direct; seconds/2
each) so that drift affects all alike. Reports throughput, p50/p99 latency, both against direct, each process's CPU
time per request from /proc (gateway, proxy, Triton with its python-backend stubs, Redis, this load generator),
Triton's mean dynamic batch on each path, and issue 15's goals (PASS/MISS) with the proxy's figures beside them.
With ``--profile``, py-spy records the gateway during an extra oip run on the MLP at concurrency 8.

    PYTHONPATH=services python bench/gateway_bench.py --seconds 4
    PYTHONPATH=services python bench/gateway_bench.py --models mlp --paths direct proxy predict
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
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
from margin.cluster.processes import ManagedProcess, ProcessSpec, free_port, redis_spec, standalone_service_spec
from margin.common.protoconv import signature_to_proto
from margin.common.tensors import Signature, TensorSpec
from margin.compression import minilm
from margin.inference.triton_process import triton_spec
from margin.sdk.channel import connect
from margin.sdk.registry import RegistryClient
from margin.sdk.tensors import from_tensor, to_tensor
from margin.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2
from rich.console import Console
from rich.table import Table

PATHS = ("direct", "proxy", "oip", "predict")
PARTIES = ("gateway", "proxy", "triton", "redis", "client")  # whose CPU time is measured
GOAL_CONCURRENCY = 8      # throughput and gateway-CPU goals
LATENCY_CONCURRENCY = 1   # added-p50 goal
PROFILED_MODEL = "mlp"
BARE_PROXY = Path(__file__).resolve().parent / "bare_proxy.py"
SENTENCE = "A small gateway adds very little time to every request that it forwards."  # the MiniLM request
MLP_SIGNATURE = Signature((TensorSpec("input", "FP32", (-1, 64)),), (TensorSpec("logits", "FP32", (-1, 10)),))

Inputs = dict[str, np.ndarray]  # one request's tensors by input name, in signature order
Call = Callable[[], Awaitable[object]]


# -- the two models --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCase:
    """One benchmarked model: how to build it, what one request and the verification inputs are, and its goals."""
    key: str                # the --models choice
    model: str              # its Margin model name
    description: str
    build: Callable[[Path], tuple[torch.jit.ScriptModule, Path, Signature]]  # saved TorchScript in the folder
    request: Callable[[int], Inputs]                 # seed -> the one request every load call sends
    samples: Callable[[int, int], list[Inputs]]      # (count, seed) -> inputs compared across paths
    output: str
    atol: float             # max |path - direct| and |direct - module run here|
    min_oip_ratio: float    # oip req/s >= this x direct at GOAL_CONCURRENCY
    max_gateway_cpu_us: float | None = None  # oip gateway CPU per request at GOAL_CONCURRENCY, where there is a goal


def build_mlp(workdir: Path) -> tuple[torch.jit.ScriptModule, Path, Signature]:
    """A seeded TorchScript MLP 64→128→10, saved."""
    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                                  torch.nn.Linear(128, 10))).eval()
    path = workdir / "mlp.pt"
    module.save(str(path))
    return module, path, MLP_SIGNATURE


def mlp_samples(count: int, seed: int) -> list[Inputs]:
    """``count`` random batch-1 FP32 inputs."""
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(count)]


@functools.cache
def tokenizer():
    """The packaged MiniLM tokenizer, loaded once."""
    return minilm.load_tokenizer()


def sentence_inputs(sentence: str) -> Inputs:
    """One sentence tokenized as served: batch 1, INT64 input_ids and attention_mask."""
    ids, mask = minilm.tokenize(tokenizer(), [sentence])
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def build_minilm(workdir: Path) -> tuple[torch.jit.ScriptModule, Path, Signature]:
    """The SentenceEncoder from the packaged weights, traced to TorchScript as the compression service serves it."""
    config = minilm.package_config()
    module = minilm.trace(minilm.load_encoder(config, minilm.weights_file()), tokenizer())
    path = workdir / "minilm.pt"
    module.save(str(path))
    return module, path, minilm.signature(config)


def minilm_samples(count: int, seed: int) -> list[Inputs]:
    """``count`` sentences of the package's README (other lengths than the load request's), one request each."""
    sentences = minilm.calibration_sentences()
    picked = np.random.default_rng(seed).choice(len(sentences), size=min(count, len(sentences)), replace=False)
    return [sentence_inputs(sentences[i]) for i in picked]


CASES = {
    "mlp": ModelCase("mlp", "bench-mlp", "TorchScript MLP 64-128-10 (FP32)", build_mlp,
                     lambda seed: mlp_samples(1, seed)[0], mlp_samples, "logits", atol=1e-5,
                     min_oip_ratio=0.6, max_gateway_cpu_us=300.0),
    "minilm": ModelCase("minilm", "bench-minilm", "MiniLM-L6 SentenceEncoder, traced (FP32)", build_minilm,
                        lambda seed: sentence_inputs(SENTENCE), minilm_samples, "embedding", atol=1e-4,
                        min_oip_ratio=0.95),
}


# -- processes -------------------------------------------------------------------------------------
@dataclass
class Cluster:
    """The running processes and the tenant key the bench calls the gateway with."""
    redis: ManagedProcess
    triton: ManagedProcess
    registry: ManagedProcess
    gateway: ManagedProcess
    proxy: ManagedProcess | None
    key: str


def proxy_spec(upstream: str) -> ProcessSpec:
    """``bench/bare_proxy.py`` on a free port; kind "triton": it is healthy once Triton's ServerReady answers
    through it."""
    port = free_port()
    argv = [sys.executable, str(BARE_PROXY), "--listen", f"127.0.0.1:{port}", "--upstream", upstream]
    return ProcessSpec("proxy", argv, port, "triton")


def start_cluster(args: argparse.Namespace, workdir: Path, started: list[ManagedProcess]) -> Cluster:
    """Start every process (each stopped by the caller's ``finally``) and create the bench tenant's key."""
    admin_key = secrets.token_urlsafe(32)
    repository = workdir / "model-repository"
    redis_proc = start(redis_spec(workdir), workdir, started, 30)
    triton = start(triton_spec(workdir, repository), workdir, started, 120)
    # Budget first: each service creates its schema on start, and SQLite DDL from two processes can race.
    budget = start(standalone_service_spec("budget", "margin.budget", workdir, admin_key), workdir, started, 30)
    registry = start(standalone_service_spec("registry", "margin.registry", workdir, admin_key), workdir, started, 30)
    gateway = start(standalone_service_spec(
        "inference", "margin.inference", workdir, admin_key,
        MARGIN_TRITON_URL=triton.spec.address, MARGIN_REGISTRY_ADDR=registry.spec.address,
        MARGIN_BUDGET_ADDR=budget.spec.address, MARGIN_REDIS_URL=f"redis://{redis_proc.spec.address}/0",
        MARGIN_MODEL_REPOSITORY=str(repository),
        MARGIN_RATE_LIMIT_RPS=str(args.rate_limit), MARGIN_RATE_LIMIT_BURST=str(args.rate_limit)),
        workdir, started, 60)
    proxy = start(proxy_spec(triton.spec.address), workdir, started, 30) if "proxy" in args.paths else None
    key = tenant_key(budget, admin_key, "gateway bench")
    return Cluster(redis_proc, triton, registry, gateway, proxy, key)


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


def cpu_probe(cluster: Cluster, triton_name: str) -> CpuProbe:
    proxy = cluster.proxy
    return CpuProbe({"gateway": lambda: [cluster.gateway.proc.pid],
                     "proxy": lambda: [proxy.proc.pid] if proxy else [],
                     "triton": lambda: process_tree(cluster.triton.proc.pid),
                     "redis": lambda: [cluster.redis.proc.pid]}, cluster.triton.spec.address, triton_name)


# -- upload and deploy -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """A case's model as deployed: the module (for local checks), its version and the names it is served under."""
    module: torch.jit.ScriptModule
    number: int
    deployment: inference_pb2.Deployment
    triton_name: str


def upload(registry_address: str, key: str, case: ModelCase, path: Path, signature: Signature) -> int:
    conn = connect(registry_address, key)
    try:
        client = RegistryClient(conn)
        client.create_model(case.model, description=f"gateway benchmark: {case.description}")
        return client.upload_file(path, registry_pb2.UploadMetadata(
            model=case.model, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
            signature=signature_to_proto(signature), description="gateway benchmark")).number
    finally:
        conn.close()


def deploy(gateway_address: str, key: str, model: str, number: int, max_batch: int,
           delay_us: int) -> inference_pb2.Deployment:
    with grpc.insecure_channel(gateway_address) as channel:
        deployment = inference_pb2_grpc.InferenceStub(channel).Deploy(inference_pb2.DeployRequest(
            version=common_pb2.VersionRef(model=model, number=number),
            batching=inference_pb2.BatchingConfig(max_batch_size=max_batch, max_queue_delay_microseconds=delay_us)),
            metadata=(("authorization", f"Bearer {key}"),), timeout=300)
    if deployment.state != inference_pb2.DEPLOYMENT_STATE_READY:
        raise RuntimeError(f"deploy of {model} v{number} failed: {deployment}")
    return deployment


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


def serve_case(case: ModelCase, cluster: Cluster, workdir: Path, args: argparse.Namespace) -> Served:
    """Build, upload and deploy one model through the gateway."""
    module, path, signature = case.build(workdir)
    number = upload(cluster.registry.spec.address, cluster.key, case, path, signature)
    deployment = deploy(cluster.gateway.spec.address, cluster.key, case.model, number, args.max_batch_size,
                        args.queue_delay_us)
    return Served(module, number, deployment, triton_model_name(cluster.triton.spec.address, deployment.name))


# -- the paths -------------------------------------------------------------------------------------
async def infer(client: triton_aio.InferenceServerClient, model: str, version: str, headers: dict[str, str] | None,
                inputs: list[triton_aio.InferInput],
                outputs: list[triton_aio.InferRequestedOutput]) -> triton_aio.InferResult:
    """The one tritonclient.grpc.aio call that the direct, proxy and oip paths all make."""
    return await client.infer(model, inputs, model_version=version, outputs=outputs, headers=headers)


def triton_inputs(inputs: Inputs) -> list[triton_aio.InferInput]:
    tensors = []
    for name, array in inputs.items():
        tensor = triton_aio.InferInput(name, list(array.shape), triton_grpc.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def parameter_value(param) -> object:
    """The value of a KServe v2 ``InferParameter`` (whichever of its oneof is set)."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


class TritonClientPath:
    """A KServe v2 path (direct, proxy, oip): one tritonclient.grpc.aio client to ``address``."""

    def __init__(self, address: str, model: str, version: str = "", headers: dict[str, str] | None = None):
        self.client = triton_aio.InferenceServerClient(address)
        self.model, self.version, self.headers = model, version, headers

    def prepare(self, inputs: Inputs, output: str) -> Call:
        """The request's tensors built once, as a real client would; the response is not decoded."""
        tensors, outputs = triton_inputs(inputs), [triton_aio.InferRequestedOutput(output)]
        return lambda: infer(self.client, self.model, self.version, self.headers, tensors, outputs)

    async def result(self, inputs: Inputs, output: str) -> tuple[np.ndarray, dict]:
        """The output tensor and the response parameters."""
        result = await self.prepare(inputs, output)()
        params = result.get_response().parameters
        return result.as_numpy(output), {k: parameter_value(v) for k, v in params.items()}

    async def close(self) -> None:
        await self.client.close()


class PredictPath:
    """``margin.v1.Inference.Predict`` through the gateway with a grpc.aio stub (not OIP: its own request type)."""

    def __init__(self, address: str, model: str, number: int, key: str):
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.model, self.number = model, number
        self.metadata = (("authorization", f"Bearer {key}"),)

    def prepare(self, inputs: Inputs, output: str) -> Call:
        """A PredictRequest built once; the reply is not decoded."""
        request = inference_pb2.PredictRequest(
            version=common_pb2.VersionRef(model=self.model, number=self.number),
            inputs=[to_tensor(name, array) for name, array in inputs.items()], outputs=[output])
        return lambda: self.stub.Predict(request, metadata=self.metadata, timeout=30)

    async def result(self, inputs: Inputs, output: str) -> tuple[np.ndarray, dict]:
        """The output tensor and the reply's deployment, version and cost, named as the OIP parameters."""
        reply = await self.prepare(inputs, output)()
        return from_tensor(reply.outputs[0]), {"margin.deployment": reply.deployment,
                                               "margin.version": reply.served_version.number,
                                               "margin.cost_micros": reply.usage.cost_micros}

    async def close(self) -> None:
        await self.channel.close()


BenchPath = TritonClientPath | PredictPath


def open_paths(names: list[str], cluster: Cluster, case: ModelCase, served: Served) -> dict[str, BenchPath]:
    """The paths asked for, in PATHS order (direct first: the reference)."""
    makers = {
        "direct": lambda: TritonClientPath(cluster.triton.spec.address, served.triton_name),
        "proxy": lambda: TritonClientPath(cluster.proxy.spec.address, served.triton_name),
        "oip": lambda: TritonClientPath(cluster.gateway.spec.address, case.model, "",
                                        {"authorization": f"Bearer {cluster.key}"}),
        "predict": lambda: PredictPath(cluster.gateway.spec.address, case.model, served.number, cluster.key),
    }
    return {name: makers[name]() for name in PATHS if name in names}


# -- verification ----------------------------------------------------------------------------------
def run_local(module: torch.jit.ScriptModule, inputs: Inputs) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(a) for a in inputs.values())).numpy()


async def outputs_of(paths: dict[str, BenchPath], inputs: Inputs, output: str) -> dict[str, tuple[np.ndarray, dict]]:
    """Every path's answer to the same request, sent concurrently; a path that fails fails the bench, named."""
    answers = await asyncio.gather(*(p.result(inputs, output) for p in paths.values()), return_exceptions=True)
    for name, answer in zip(paths, answers, strict=True):
        if isinstance(answer, BaseException):
            raise RuntimeError(f"the {name} path failed: {answer}") from answer
    return dict(zip(paths, answers, strict=True))


def served_problems(name: str, params: dict, served: Served) -> list[str]:
    """The gateway's paths must say which deployment and version served the request, and its cost."""
    if name not in ("oip", "predict"):
        return []
    want = {"margin.deployment": served.deployment.name, "margin.version": served.number}
    problems = [f"{name}: {k} = {params.get(k)!r}, expected {v!r}" for k, v in want.items() if params.get(k) != v]
    if not isinstance(params.get("margin.cost_micros"), float):
        problems.append(f"{name}: margin.cost_micros missing or not a double: {params.get('margin.cost_micros')!r}")
    return problems


def max_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")


async def verify(paths: dict[str, BenchPath], case: ModelCase, served: Served, count: int, seed: int) -> dict:
    """Each sample through every path: each path == direct, and direct == the module run here, within
    ``case.atol``; the gateway's paths also report the deployment, version and cost."""
    diffs = {("direct_vs_local" if name == "direct" else f"{name}_vs_direct"): 0.0 for name in paths}
    problems: list[str] = []
    for inputs in case.samples(count, seed):
        answers = await outputs_of(paths, inputs, case.output)
        direct = answers["direct"][0]
        diffs["direct_vs_local"] = max(diffs["direct_vs_local"], max_diff(direct, run_local(served.module, inputs)))
        for name, (out, params) in answers.items():
            if name != "direct":
                diffs[f"{name}_vs_direct"] = max(diffs[f"{name}_vs_direct"], max_diff(out, direct))
            problems += served_problems(name, params, served)
    ok = all(d <= case.atol for d in diffs.values()) and not problems
    return {"samples": count, "atol": case.atol, "all_close": ok, "max_abs_diff": diffs, "problems": problems[:8]}


# -- load generation -------------------------------------------------------------------------------
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
        return {"requests": requests, "seconds": seconds, "rps": requests / seconds,
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "mean_ms": float(lat.mean()), "max_ms": float(lat.max()),
                "segment_rps": [s.requests / s.seconds for s in self.segments],
                "cpu_seconds": cpu, "cpu_us_per_request": {k: cpu[k] / requests * 1e6 for k in PARTIES},
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


def abba(names: tuple[str, ...]) -> tuple[str, ...]:
    """A-B-B-A order: linear drift affects every path alike."""
    return (*names, *reversed(names))


def against_direct(summaries: dict[str, dict]) -> None:
    """Add each path's throughput ratio and added latency relative to direct."""
    direct = summaries["direct"]
    for s in summaries.values():
        s["rps_ratio"] = s["rps"] / direct["rps"]
        s["p50_added_ms"] = s["p50_ms"] - direct["p50_ms"]
        s["p99_added_ms"] = s["p99_ms"] - direct["p99_ms"]


async def measure_level(calls: dict[str, Call], concurrency: int, args: argparse.Namespace,
                        probe: CpuProbe) -> dict:
    """Warm every path, then A-B-B-A segments of seconds/2 each."""
    for call in calls.values():
        await drive(call, concurrency, args.warmup)
    stats = {name: PathStats() for name in calls}
    for name in abba(tuple(calls)):
        stats[name].segments.append(await drive(calls[name], concurrency, args.seconds / 2, probe))
    summaries = {name: s.summary() for name, s in stats.items()}
    against_direct(summaries)
    return {"concurrency": concurrency, "paths": summaries}


def level_line(level: dict) -> str:
    return f"  concurrency {level['concurrency']:>3}: " + " | ".join(
        f"{name} {s['rps']:,.0f} req/s p50 {s['p50_ms']:.2f} ms" for name, s in level["paths"].items())


async def checked(paths: dict[str, BenchPath], case: ModelCase, served: Served, args: argparse.Namespace,
                  seed: int, when: str) -> dict:
    """:func:`verify`, failing the bench when the outputs disagree."""
    result = await verify(paths, case, served, args.verify, seed)
    if not result["all_close"]:
        raise RuntimeError(f"{case.key}: outputs differ {when} the load: {result}")
    return result


async def measure_case(case: ModelCase, cluster: Cluster, served: Served, args: argparse.Namespace, workdir: Path,
                       console: Console) -> dict:
    """Verify, measure every level, verify again; the optional profile run."""
    paths = open_paths(args.paths, cluster, case, served)
    try:
        before = await checked(paths, case, served, args, args.seed + 1, "before")
        request = case.request(args.seed)
        calls = {name: path.prepare(request, case.output) for name, path in paths.items()}
        probe = cpu_probe(cluster, served.triton_name)
        levels = []
        for concurrency in args.concurrency:
            levels.append(await measure_level(calls, concurrency, args, probe))
            console.print(level_line(levels[-1]))
        after = await checked(paths, case, served, args, args.seed + 2, "after")
        profile = None
        if args.profile and case.key == PROFILED_MODEL and args.profile_path in calls:
            process = cluster.proxy if args.profile_path == "proxy" else cluster.gateway
            profile = await profile_gateway(calls[args.profile_path], process.proc.pid, args, workdir, console)
            if profile:
                profile["path"] = args.profile_path
    finally:
        for path in paths.values():
            await path.close()
    return {"request": {name: {"dtype": str(a.dtype), "shape": list(a.shape)} for name, a in request.items()},
            "levels": levels, "verification": {"before": before, "after": after}, "profile": profile}


# -- goals -----------------------------------------------------------------------------------------
def figure(levels: list[dict], concurrency: int, path: str, key: str = "", party: str = "") -> float | None:
    """One measured figure (a CPU figure when ``party`` is given); None where that level or path did not run."""
    level = next((lv for lv in levels if lv["concurrency"] == concurrency), None)
    stats = level["paths"].get(path) if level else None
    if stats is None:
        return None
    return stats["cpu_us_per_request"][party] if party else stats[key]


def goal(name: str, text: str, value: float | None, op: str, bound: float | None, proxy: float | None) -> dict:
    """A goal's verdict: met is None (not measured) when the value or its bound is missing."""
    met = None if value is None or bound is None else bool(value >= bound if op == ">=" else value <= bound)
    return {"name": name, "goal": text, "value": value, "bound": bound, "proxy": proxy, "met": met}


def evaluate_goals(case: ModelCase, levels: list[dict]) -> list[dict]:
    """Issue 15's goals for this model, each with the bare proxy's figure beside it (the floor it shows)."""
    c, c1 = GOAL_CONCURRENCY, LATENCY_CONCURRENCY
    goals = [goal("throughput", f"oip req/s >= {case.min_oip_ratio} x direct at concurrency {c}",
                  figure(levels, c, "oip", "rps_ratio"), ">=", case.min_oip_ratio,
                  figure(levels, c, "proxy", "rps_ratio"))]
    if case.max_gateway_cpu_us is not None:
        goals.append(goal("gateway_cpu", f"oip gateway CPU <= {case.max_gateway_cpu_us:.0f} us/request at "
                                         f"concurrency {c} (proxy: the proxy's own CPU)",
                          figure(levels, c, "oip", party="gateway"), "<=", case.max_gateway_cpu_us,
                          figure(levels, c, "proxy", party="proxy")))
    proxy_added = figure(levels, c1, "proxy", "p50_added_ms")
    goals.append(goal("p50_added", f"oip p50 added vs direct <= the proxy's, ms, at concurrency {c1}",
                      figure(levels, c1, "oip", "p50_added_ms"), "<=", proxy_added, proxy_added))
    return goals


# -- profile ---------------------------------------------------------------------------------------
async def profile_gateway(call: Call, gateway_pid: int, args: argparse.Namespace, workdir: Path,
                          console: Console) -> dict | None:
    """py-spy record the gateway while ``call`` runs at the goal concurrency (a separate run, not in the figures)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        console.print("[yellow]--profile: py-spy not found (pip install py-spy); skipped[/]")
        return None
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    seconds = max(3, int(args.seconds))
    raw = workdir / "profile.txt"
    cmd = [py_spy, "record", "--pid", str(gateway_pid), "--duration", str(seconds), "--rate", "250",
           "--format", "raw", "--output", str(raw), "--threads", "--nonblocking"]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(0.5)
        await drive(call, GOAL_CONCURRENCY, seconds)
    finally:
        spy.wait(seconds + 60)
    if not raw.exists():
        console.print("[yellow]--profile: py-spy wrote nothing[/]")
        return None
    shutil.copyfile(raw, args.profile)
    return summarize_profile(raw)


PROFILE_BUCKETS = (  # matched on the frame's file (py-spy: "function (package/module.py:line)"); the leaf-most
    # frame that matches any bucket decides, so library code is charged to the Margin module that called it
    ("OIP endpoint (KServe v2 decode, encode)", ("inference/oip",)),
    ("request coalescing", ("coalesc",)),
    ("rate limiter (Redis)", ("inference/ratelimit.py", "redis/")),
    ("Triton call (gRPC client to Triton)", ("inference/triton_client.py", "inference/replicas.py",
                                             "inference/pools.py", "tritonclient/")),
    ("metering and cost", ("inference/metering.py", "inference/served_cost.py", "inference/budgetgate.py")),
    ("gateway logic (auth, route, validate, convert)", ("inference/gateway.py", "inference/validation.py",
                                                         "inference/routing.py", "inference/convert.py",
                                                         "inference/servicer.py", "common/auth", "common/server",
                                                         "margin/")),
    ("gRPC aio machinery and event loop", ("grpc/", "_cython", "cygrpc", "asyncio/", "selectors.py")),
)


def profile_bucket(frames: list[str]) -> str:
    for frame in reversed(frames):
        hit = next((name for name, keys in PROFILE_BUCKETS if any(k in frame for k in keys)), None)
        if hit:
            return hit
    return "other (background threads, interpreter)"


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
        bucket = profile_bucket(frames)
        buckets[bucket] = buckets.get(bucket, 0) + n
        leaf = frames[-1].rsplit(":", 1)[0] + ")" if frames else "?"
        leaves[leaf] = leaves.get(leaf, 0) + n
    total = max(total, 1)
    return {"samples": total, "mode": "py-spy record --nonblocking: non-idle threads (running or waiting for the GIL)",
            "buckets": [{"bucket": k, "share": v / total} for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])],
            "top_leaf_frames": [{"frame": k, "share": v / total}
                                for k, v in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]]}


# -- report ----------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def levels_table(key: str, result: dict, settings: dict) -> Table:
    request = ", ".join(f"{name} {t['dtype']}{t['shape']}" for name, t in result["request"].items())
    table = Table(title=f"{key}: {result['description']}; every request {request}; "
                        f"{settings['seconds'] / 2:g} s segments A-B-B-A; dynamic batching max "
                        f"{settings['max_batch_size']}, queue delay {settings['max_queue_delay_us']} us",
                  caption="x direct = req/s / direct's; +p50 = p50 - direct's p50; CPU us per request "
                          "(utime+stime, /proc): triton includes its python-backend stubs, a party a path does not "
                          "cross shows its idle load. direct, proxy, oip: one tritonclient.grpc.aio infer "
                          "function; predict: grpc.aio InferenceStub.Predict, prebuilt PredictRequest (not OIP)")
    for col in ("conc", "path", "req/s", "x direct", "p50 ms", "p99 ms", "+p50 ms", *(f"{p} us" for p in PARTIES),
                "busy cores", "mean batch"):
        table.add_column(col, justify="right")
    for lv in result["levels"]:
        for name, s in lv["paths"].items():
            per = s["cpu_us_per_request"]
            table.add_row(str(lv["concurrency"]), name, f"{s['rps']:,.0f}", f"{s['rps_ratio']:.2f}",
                          f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['p50_added_ms']:+.2f}",
                          *(f"{per[p]:.0f}" for p in PARTIES),
                          f"{s['machine_busy_cores']:.2f}/{s['machine_cores']:.0f}", f"{s['triton_mean_batch']:.2f}")
    return table


def print_goals(key: str, goals: list[dict], console: Console) -> None:
    for g in goals:
        mark = {True: "[green]PASS[/]", False: "[red]MISS[/]", None: "[yellow]SKIP[/]"}[g["met"]]
        console.print(f"{mark}  {key} {g['name']}: {g['goal']} - measured {fmt(g['value'], '.3f')}, "
                      f"bound {fmt(g['bound'], '.3f')} (bare proxy: {fmt(g['proxy'], '.3f')})")


def print_verification(key: str, verification: dict, console: Console) -> None:
    before, after = verification["before"], verification["after"]
    worst = {k: max(before["max_abs_diff"][k], after["max_abs_diff"][k]) for k in before["max_abs_diff"]}
    console.print(f"{key} outputs on {before['samples'] + after['samples']} inputs (before and after the load), "
                  f"within {before['atol']:g}: {before['all_close'] and after['all_close']}; max |diff| "
                  + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def print_profile(profile: dict, console: Console) -> None:
    path = profile.get("path", "oip")
    console.print(f"py-spy profile of the {'proxy' if path == 'proxy' else 'gateway'} on the {path} path, MLP, "
                  f"concurrency {GOAL_CONCURRENCY} "
                  f"({profile['samples']} samples of non-idle threads), by where the stack is:")
    for row in profile["buckets"]:
        console.print(f"  {row['share'] * 100:5.1f}%  {row['bucket']}")
    console.print("  top leaf frames:")
    for row in profile["top_leaf_frames"]:
        console.print(f"  {row['share'] * 100:5.1f}%  {row['frame']}")


def report(result: dict, console: Console) -> None:
    for key, model in result["models"].items():
        console.print(levels_table(key, model, result["settings"]))
        print_goals(key, model["goals"], console)
        print_verification(key, model["verification"], console)
    if result.get("profile"):
        print_profile(result["profile"], console)


# -- run -------------------------------------------------------------------------------------------
def case_result(case: ModelCase, served: Served, measured: dict) -> dict:
    d = served.deployment
    return {"model": case.model, "description": case.description, "version": served.number,
            "deployment": d.name, "triton_model": served.triton_name,
            "deploy_calibration": {"capacity_rps": d.capacity_rps, "latency_p50_ms": d.latency_p50_ms},
            "request": measured["request"], "levels": measured["levels"],
            "verification": measured["verification"], "goals": evaluate_goals(case, measured["levels"])}


def settings(args: argparse.Namespace) -> dict:
    return {"seconds": args.seconds, "warmup_s": args.warmup, "concurrency": args.concurrency,
            "models": args.models, "paths": args.paths,
            "order": f"A-B-B-A per level ({', '.join(abba(tuple(p for p in PATHS if p in args.paths)))}), "
                     "seconds/2 each",
            "batch": 1, "max_batch_size": args.max_batch_size, "max_queue_delay_us": args.queue_delay_us,
            "rate_limit_rps": args.rate_limit, "rate_limit_burst": args.rate_limit,
            "minilm_sentence": SENTENCE,
            "clients": {"direct": "tritonclient.grpc.aio to Triton, the deployment's Triton model name",
                        "proxy": "tritonclient.grpc.aio to bench/bare_proxy.py (own process), Triton model name",
                        "oip": "tritonclient.grpc.aio to the gateway, Margin model name, version '' (routing), "
                               "authorization: Bearer <tenant key>",
                        "predict": "grpc.aio InferenceStub.Predict with a prebuilt PredictRequest "
                                   "(VersionRef model + number): Predict is not OIP, so not the tritonclient code"}}


def check_alive(started: list[ManagedProcess]) -> None:
    for process in started:
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.spec.name} died during the run\n{process.log_tail()}")


def run(args: argparse.Namespace, console: Console) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="margin-gateway-bench-"))
    started: list[ManagedProcess] = []
    models, profile = {}, None
    try:
        cluster = start_cluster(args, workdir, started)
        for key in args.models:
            case = CASES[key]
            served = serve_case(case, cluster, workdir, args)
            console.print(f"{key}: deployed {served.deployment.name} as Triton model {served.triton_name}; measuring "
                          f"{args.concurrency} x {args.paths} for {args.seconds:g} s each")
            measured = asyncio.run(measure_case(case, cluster, served, args, workdir, console))
            models[key] = case_result(case, served, measured)
            profile = measured["profile"] or profile
        check_alive(started)
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": {"node": platform.node(), "cpu_count": os.cpu_count(), "cpu": cpu_model(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "grpcio": grpc.__version__, "torch": torch.__version__},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": settings(args),
        "models": models,
        "profile": profile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per path per concurrency")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per path per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--models", nargs="+", choices=tuple(CASES), default=list(CASES))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                        help="paths to drive (direct is always among them: every figure is relative to it)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--queue-delay-us", type=int, default=0, help="Triton dynamic batching queue delay")
    parser.add_argument("--rate-limit", type=int, default=1_000_000,
                        help="gateway rate limit and burst (high: the limiter runs but never refuses)")
    parser.add_argument("--verify", type=int, default=16, help="inputs compared across paths before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=Path, default=None,
                        help="also py-spy record the gateway (the proxy for --profile-path proxy) during an extra "
                             "run of one path on the MLP at concurrency 8 into this raw file")
    parser.add_argument("--profile-path", choices=("oip", "predict", "proxy"), default="oip",
                        help="the path --profile records")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gateway.json"))
    args = parser.parse_args()
    if args.seconds <= 0 or args.warmup < 0 or min(args.concurrency) < 1 or args.verify < 1:
        parser.error("--seconds must be > 0, --warmup >= 0, --concurrency >= 1, --verify >= 1")
    if "direct" not in args.paths:
        args.paths.append("direct")
    args.paths = [p for p in PATHS if p in args.paths]
    args.models = list(dict.fromkeys(args.models))

    run_and_write(run, report, args)


if __name__ == "__main__":
    main()
