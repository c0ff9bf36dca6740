"""Where the gateway's microseconds go: the floor under any Python gRPC hop, and Margin's own share above it.

Two measurements that ``bench/gateway_bench.py`` cannot make by itself:

1. **The grpc.aio floor.** A ``grpc.aio`` server (its own process) that answers every ``ModelInfer`` with a canned
   ``ModelInferResponse`` — no model, no upstream call, nothing decoded — driven by the same ``tritonclient.grpc.aio``
   client code as the gateway bench, at each concurrency: its CPU time per request is what one unary call costs a
   Python gRPC server on this machine before it does anything. A gateway cannot spend less per request.
2. **Margin's Python hot path.** The OIP ``ModelInfer`` path as the gateway runs it — decode the request, route,
   validate, take the rate limit, coalesce, meter, price, encode the response — on a real stack (tritonserver,
   Redis, registry, budget; tests/integration/inference_stack.py), with the Triton call replaced by an answer
   already at hand, so only Margin's own Python is timed; and cProfile's top functions of it.

    PYTHONPATH=services python bench/gateway_floor.py
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from harness import cpu_seconds, run_and_write
from margin.cluster.processes import free_port
from rich.console import Console
from rich.table import Table
from tritonclient.grpc import service_pb2

ROOT = Path(__file__).resolve().parent.parent
CANNED = service_pb2.ModelInferResponse(
    model_name="m", outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32",
                                                                              shape=[1, 10])],
    raw_output_contents=[bytes(40)]).SerializeToString()


# -- 1. the grpc.aio floor -------------------------------------------------------------------------
async def serve_canned(port: int) -> None:
    async def answer(request: bytes, context) -> bytes:
        return CANNED
    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(answer)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def drive(address: str, pid: int, concurrency: int, seconds: float) -> dict:
    client = triton_aio.InferenceServerClient(address)
    tensor = triton_aio.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    done = 0

    async def worker(deadline: float) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await client.infer("m", [tensor])
            done += 1
    try:
        await worker(time.perf_counter() + 0.5)
        done, cpu0, t0 = 0, cpu_seconds([pid]), time.perf_counter()
        await asyncio.gather(*(worker(t0 + seconds) for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds([pid]) - cpu0
    finally:
        await client.close()
    return {"concurrency": concurrency, "rps": done / elapsed, "server_cpu_us_per_request": cpu / done * 1e6}


def grpc_floor(concurrency: list[int], seconds: float, repeats: int) -> list[dict]:
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve-canned", str(port)], stdout=subprocess.PIPE,
                              text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the canned server did not start")
        rows = []
        for c in concurrency:
            runs = [asyncio.run(drive(f"127.0.0.1:{port}", server.pid, c, seconds)) for _ in range(repeats)]
            cpu = sorted(r["server_cpu_us_per_request"] for r in runs)
            rows.append({"concurrency": c, "rps": max(r["rps"] for r in runs),
                         "server_cpu_us_per_request": cpu[len(cpu) // 2], "runs": runs})
        return rows
    finally:
        server.terminate()
        server.wait(10)


# -- 2. Margin's Python hot path -------------------------------------------------------------------
def hot_path(requests: int) -> dict:
    """The OIP ModelInfer path minus gRPC, on a real stack; Triton's answer is at hand."""
    sys.path.insert(0, str(ROOT))
    from margin.inference import oip
    from margin.inference.ratelimit import Limits
    from margin.inference.triton_client import RawTensor

    from tests.integration.inference_stack import deploy, inference_stack

    with inference_stack(Path(tempfile.mkdtemp(prefix="margin-hot-path-"))) as stack:
        deploy(stack, 1)
        gateway = stack.inference.spec.extra["gateway"]
        key = stack.cluster.keys["acme"]
        principal = stack.inference.context.tenants.authenticate(key)
        gateway._budget._ttl = 3600  # the budget status stays cached, as between two reads in production
        gateway._limiter.set_limits(principal.tenant_id, Limits(10**9, 10**9))  # the limiter runs, never refuses
        answer = [RawTensor("logits", "FP32", (1, 10), bytes(40))]

        async def at_hand(model, inputs, outputs):
            return answer
        stack.inference.spec.extra["pools"].for_class("cpu").infer_async = at_hand
        wire = service_pb2.ModelInferRequest(
            model_name="digits", model_version="1", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=[1, 64])],
            raw_input_contents=[bytes(256)]).SerializeToString()

        async def one() -> bytes:
            request = service_pb2.ModelInferRequest.FromString(wire)
            prediction = await gateway.predict_async(
                principal, key, oip.target(request.model_name, request.model_version, request.parameters),
                oip.inputs(request), oip.outputs(request))
            return oip.infer_response(prediction, request).SerializeToString()

        async def many(n: int) -> None:
            for _ in range(n):
                await one()
        asyncio.run(many(1000))
        start = time.perf_counter()
        asyncio.run(many(requests))
        per_request = (time.perf_counter() - start) / requests * 1e6
        profiler = cProfile.Profile()
        profiler.runcall(asyncio.run, many(requests))
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    return {"requests": requests, "us_per_request": per_request, "cprofile_top": out.getvalue()}


# -- report ----------------------------------------------------------------------------------------
def run(args: argparse.Namespace, console: Console) -> dict:
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
            "grpc_floor": grpc_floor(args.concurrency, args.seconds, args.repeats),
            "hot_path": hot_path(args.requests)}


def report(result: dict, console: Console) -> None:
    table = Table(title="A grpc.aio server answering ModelInfer with a canned reply (no model, no upstream): "
                        "the floor under any Python gRPC hop",
                  caption="client: tritonclient.grpc.aio, batch-1 FP32[1,64]; server CPU from /proc, the median "
                          "of the repeats")
    for col in ("concurrency", "req/s", "server CPU us/request"):
        table.add_column(col, justify="right")
    for row in result["grpc_floor"]:
        table.add_row(str(row["concurrency"]), f"{row['rps']:,.0f}", f"{row['server_cpu_us_per_request']:.0f}")
    console.print(table)
    hot = result["hot_path"]
    console.print(f"Margin's Python hot path (OIP ModelInfer: decode, route, validate, rate limit, coalesce, meter, "
                  f"price, encode; no gRPC): {hot['us_per_request']:.1f} us per request over {hot['requests']:,}")
    console.print(hot["cprofile_top"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--serve-canned", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gateway_floor.json"))
    args = parser.parse_args()
    if args.serve_canned:
        asyncio.run(serve_canned(args.serve_canned))
        return
    run_and_write(run, report, args)


if __name__ == "__main__":
    main()
