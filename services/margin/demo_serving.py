"""The demo's second half: compress the trained digits model with AutoCompress, deploy the chosen variant next to
the original on Triton, and let routing pick between them.

AutoCompress searches the built-in recipes for the variant with the lowest measured cost per million inferences
that keeps accuracy within half a point of the source: the model's own compute, measured on the compression worker
(nothing else can be measured before a variant is served). Once both are deployed, the gateway's routing compares
them *as served* — through Triton, measured at Deploy and then live from Triton's statistics
(:mod:`margin.inference.served_cost`). The validation set is then predicted twice through the gateway — pinned to the
original (``digits@production``) and routed by the policy alone — and the side-by-side report shows both figures and
what each request cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from margin.cli import compress as compress_cli
from margin.cli import render
from margin.common import costs
from margin.sdk import Connection
from margin.sdk.pages import all_pages
from margin.sdk.tensors import from_tensor, to_tensor
from margin.v1 import common_pb2, compression_pb2, compression_pb2_grpc, inference_pb2, inference_pb2_grpc

MAX_ACCURACY_DROP = 0.005       # the quality floor: at most half a point below the source
COMPRESSION_BUDGET = "0.05"     # the AutoCompress job's own cap; the search costs about $0.0001–0.001 on cpu
BATCH = 32


class DemoFailed(RuntimeError):
    """The demo did not get what it promises (a job that failed, missed its target, or chose nothing)."""


@dataclass
class Served:
    """The validation set predicted through the gateway by one route."""
    route: str
    version: str
    accuracy: float
    requests: int
    compute_us: int
    cost_micros: float


def compress(console: Console, conn: Connection, source: common_pb2.VersionRef, source_accuracy: float,
             reports: Path) -> compression_pb2.CompressionJob:
    """AutoCompress ``source`` with the floor ``source_accuracy - MAX_ACCURACY_DROP``; follow it, print the front
    and save its plot. Fails unless a variant was chosen."""
    stub = compression_pb2_grpc.CompressionStub(conn.channel)
    floor = round(source_accuracy - MAX_ACCURACY_DROP, 6)
    job = stub.AutoCompress(compression_pb2.AutoCompressRequest(
        source=source, floor=common_pb2.QualityFloor(metric="accuracy", minimum=floor),
        objective=compression_pb2.OBJECTIVE_MIN_COST_PER_MILLION, device_classes=["cpu"],
        budget=common_pb2.Money(micros=costs.to_micros(COMPRESSION_BUDGET)),
        eval_dataset=common_pb2.DatasetRef(builtin="sklearn:digits")), metadata=conn.metadata)
    console.print(f"AutoCompress job [bold]{job.id}[/]: the cheapest variant per million inferences of "
                  f"{source.model}:{source.number} with accuracy ≥ {floor:.4f} (budget ${COMPRESSION_BUDGET})")
    job = compress_cli.watch(stub, conn.metadata, job.id, console)
    reports.mkdir(parents=True, exist_ok=True)
    compress_cli.report(job, console, reports / f"compression-{job.id}.png")
    if job.state != common_pb2.JOB_STATE_SUCCEEDED or job.chosen < 0:
        raise DemoFailed(f"compression job {job.id} ended {render.job_state(job.state)}: {job.outcome}")
    return job


def deploy_both(stub: inference_pb2_grpc.InferenceStub, metadata: tuple, original: common_pb2.VersionRef,
                variant: common_pb2.VersionRef, console: Console) -> list[inference_pb2.Deployment]:
    """Deploy the original and the chosen variant; undeploy the model's other deployments (earlier demo runs), so
    that routing chooses between these two."""
    batching = inference_pb2.BatchingConfig(max_batch_size=BATCH, max_queue_delay_microseconds=500)
    deployed = []
    with console.status(f"deploying {original.model}@{original.alias or original.number} and "
                        f"{variant.model}:{variant.number} on Triton (export, load, measure capacity)…"):
        for ref in (original, variant):
            deployed.append(stub.Deploy(inference_pb2.DeployRequest(version=ref, batching=batching),
                                        metadata=metadata))
    keep = {d.name for d in deployed}
    others = all_pages(partial(stub.ListDeployments, metadata=metadata),
                       inference_pb2.ListDeploymentsRequest(model=original.model), "deployments")
    for d in others:
        if d.name not in keep and d.state == inference_pb2.DEPLOYMENT_STATE_READY:
            stub.Undeploy(inference_pb2.UndeployRequest(name=d.name), metadata=metadata)
    console.print(render.deployments_table(deployed))
    return deployed


def predict_all(stub: inference_pb2_grpc.InferenceStub, metadata: tuple, route: str,
                request: inference_pb2.PredictRequest, data) -> Served:
    """Predict the validation set in batches of 32 through the gateway with ``request``'s version/routing."""
    correct, cost, compute_us, versions = 0, 0.0, 0, set()
    for i in range(0, len(data.x_val), BATCH):
        request.ClearField("inputs")
        request.inputs.append(to_tensor("input", data.x_val[i:i + BATCH]))
        reply = stub.Predict(request, metadata=metadata)
        correct += int((from_tensor(reply.outputs[0]).argmax(1) == data.y_val[i:i + BATCH]).sum())
        cost += reply.usage.cost_micros
        compute_us += reply.usage.compute_microseconds
        versions.add(f"{reply.served_version.model}:{reply.served_version.number}")
    return Served(route, ", ".join(sorted(versions)), correct / len(data.x_val),
                  (len(data.x_val) + BATCH - 1) // BATCH, compute_us, cost)


def side_by_side(job: compression_pb2.CompressionJob, deployed: list[inference_pb2.Deployment],
                 served: dict[str, Served]) -> Table:
    """The cost report: the original and the chosen variant as the compression job measured them (the model's own
    compute), as served through Triton (what routing compares), and what predicting the validation set cost through
    the gateway (an estimate per request; the ledger allocates the pool's whole bill)."""
    pair = (job.baseline, job.variants[job.chosen])
    table = Table(title="Original vs compressed, side by side (cpu)")
    table.add_column("")
    for d in deployed:
        table.add_column(f"{d.version.model}:{d.version.number}", justify="right")
    runs = [served.get(f"{d.version.model}:{d.version.number}") for d in deployed]
    rows: list[tuple[str, ...]] = [
        ("recipe", "source (as trained)", pair[1].recipe.name or "variant"),
        ("TorchScript size", *(render.human_bytes(v.size_bytes) for v in pair)),
        ("R, serialized bytes", *(f"{v.compression_ratio:.2f}×" for v in pair)),
        ("held-out accuracy", *(f"{v.quality:.4f}" for v in pair)),
        ("worker p50, batch 1 / 32", *(f"{v.latency_p50_ms_batch1:.3f} / {v.latency_p50_ms_batch32:.3f} ms"
                                       for v in pair)),
        ("model compute cost per million (worker)", *(render.money(v.cost_per_million) for v in pair)),
        ("Triton p50, batch 1 (Deploy)", *(f"{d.latency_p50_ms:.2f} ms" for d in deployed)),
        ("Triton cost per million requests (Deploy)", *(render.money(d.cost_per_million) for d in deployed)),
        ("served cost per million (routing)", *(f"{render.money(d.served_cost_per_million)} ({d.served_cost_source})"
                                                for d in deployed)),
        ("gateway: served accuracy", *(f"{r.accuracy:.2%}" if r else "—" for r in runs)),
        ("gateway: estimated cost per 32-image request", *(f"{r.cost_micros / r.requests:.4f} µ$" if r else "—"
                                                          for r in runs)),
        ("making it", "the training job",
         f"{render.money(pair[1].run_cost)}; break-even after "
         + (f"{pair[1].break_even_inferences:,} inferences" if pair[1].break_even_inferences >= 0 else "never")),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def serve(console: Console, conn: Connection, job: compression_pb2.CompressionJob,
          original: common_pb2.VersionRef, data) -> None:
    """Deploy the original and the chosen variant, predict the validation set pinned to the original and routed by
    the quality floor, and print the side-by-side report. Fails if routing serves a variant below the floor."""
    stub = inference_pb2_grpc.InferenceStub(conn.channel)
    chosen = job.variants[job.chosen]
    deployed = deploy_both(stub, conn.metadata, original, chosen.version, console)
    floor = job.auto.floor
    pinned = predict_all(stub, conn.metadata, "pinned", inference_pb2.PredictRequest(version=original), data)
    routed = predict_all(stub, conn.metadata, "routed", inference_pb2.PredictRequest(
        version=common_pb2.VersionRef(model=original.model),
        routing=inference_pb2.RoutingPolicy(floor=common_pb2.QualityFloor(metric="val_accuracy",
                                                                          minimum=floor.minimum))), data)
    deployed = [stub.GetDeployment(inference_pb2.GetDeploymentRequest(name=d.name), metadata=conn.metadata)
                for d in deployed]  # the served figures as they are now, after the traffic
    console.print(side_by_side(job, deployed, {pinned.version: pinned, routed.version: routed}))
    console.print(f"pinned to {original.model}@{original.alias}: served by {pinned.version}; routed by the policy "
                  f"val_accuracy ≥ {floor.minimum:.4f}: served by [bold]{routed.version}[/], the cheapest deployed "
                  f"version meeting it ({routed.accuracy:.2%} on the validation set)")
    if routed.version == pinned.version or routed.cost_micros >= pinned.cost_micros:
        console.print("[dim]As served through Triton, a request of this tiny model costs about the same either way: "
                      "its compute is microseconds, and the python backend and gRPC around it take milliseconds — so "
                      "routing, which compares the cost as served, may keep the original. The compression's saving "
                      "is the model's own compute per inference (the worker's figure above), which a larger model's "
                      "requests are made of.[/]")
    if routed.accuracy < floor.minimum - 1e-9:
        raise DemoFailed(f"routing served {routed.version} at {routed.accuracy:.2%}, below the floor "
                            f"{floor.minimum:.4f}")
