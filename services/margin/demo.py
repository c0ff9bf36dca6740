"""``make demo``: the main job end to end on the local cluster.

Now: train a small classifier on scikit-learn's digits, register it as safetensors + architecture
(the trainable form) and as TorchScript (the servable form, a child of the first), point the
``production`` alias at it, and print the versions and the lineage with what each step cost.
Later issues extend this into train → compress → serve → cost report.
"""
from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import grpc
import torch
from rich.console import Console
from safetensors.torch import save_file

from margin.cli import render
from margin.cluster import local
from margin.common import costs, protoconv
from margin.common.tensors import Signature, TensorSpec
from margin.modelzoo.architectures import build_model
from margin.modelzoo.datasets import load_builtin, split
from margin.modelzoo.training import train_classifier
from margin.registry.convert import cost_to_proto
from margin.registry.domain import CostRecord
from margin.sdk import RegistryClient, connect
from margin.sdk.pages import all_pages
from margin.sdk.tensors import from_tensor, to_tensor
from margin.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2

MODEL = "digits"
ARCHITECTURE = {"family": "mlp", "input_dim": 64, "hidden": [128], "num_classes": 10}
SIGNATURE = Signature((TensorSpec("input", "FP32", (-1, 64)),), (TensorSpec("logits__0", "FP32", (-1, 10)),))


def measured_cost(catalog: costs.PriceCatalog, seconds: float, device_class: str = "cpu") -> CostRecord:
    run = costs.run_cost(catalog, device_class, seconds / 3600)
    return CostRecord(catalog.currency, run.total_micros, run.compute_micros, run.energy_micros, device_class,
                      run.device_hours, run.energy_kwh)


def run(console: Console | None = None, train_seconds: float = 5.0) -> None:
    console = console or Console()
    with console.status("starting the local cluster (Redis, budget, registry)…"):
        cluster = local.up()
    key = local.state.demo_key_path().read_text().strip()
    console.print(f"[green]local cluster ready[/] — registry at {cluster['services']['registry']['address']}")
    client = RegistryClient(connect(cluster["services"]["registry"]["address"], key))
    catalog = costs.PriceCatalog.load()

    data = split(*load_builtin("sklearn:digits"), validation_fraction=0.2, seed=0)
    model = build_model(ARCHITECTURE)
    with console.status(f"training an MLP on digits for up to {train_seconds:.0f}s on cpu…"):
        result = train_classifier(model, data, epochs=200, batch_size=64, lr=2e-3, max_seconds=train_seconds)
    train_cost = measured_cost(catalog, result.seconds)
    console.print(f"trained {result.epochs} epochs in {result.seconds:.1f}s: validation accuracy "
                  f"{result.val_accuracy:.2%}, cost {costs.format_money(train_cost.total_micros)}")

    try:
        client.create_model(MODEL, "Handwritten digits classifier (scikit-learn digits, 8x8)",
                            {"task": "classification", "dataset": "sklearn-digits"})
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    metrics = {"val_accuracy": result.val_accuracy, "val_loss": result.val_loss, "epochs": float(result.epochs)}
    signature = protoconv.signature_to_proto(SIGNATURE)
    recipe = {"kind": "training", "family": "mlp", "dataset": "sklearn:digits", "epochs": result.epochs,
              "batch_size": 64, "learning_rate": 2e-3, "seed": 0}

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        trainable = client.upload_file(weights, registry_pb2.UploadMetadata(
            model=MODEL, format=registry_pb2.ARTIFACT_FORMAT_SAFETENSORS, signature=signature,
            architecture=protoconv.struct(ARCHITECTURE), recipe=protoconv.struct(recipe), metrics=metrics,
            cost=cost_to_proto(train_cost), description="trained weights + architecture spec"))

        started = time.perf_counter()
        scripted = torch.jit.script(model.eval())
        servable_path = Path(tmp) / "model.pt"
        scripted.save(str(servable_path))
        export_cost = measured_cost(catalog, time.perf_counter() - started)
        servable = client.upload_file(servable_path, registry_pb2.UploadMetadata(
            model=MODEL, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, signature=signature,
            architecture=protoconv.struct(ARCHITECTURE),
            parent=common_pb2.VersionRef(model=MODEL, number=trainable.number),
            recipe=protoconv.struct({"kind": "export", "to": "torchscript"}), metrics=metrics,
            cost=cost_to_proto(export_cost), description="TorchScript for serving"))

    client.stub.SetAlias(registry_pb2.SetAliasRequest(model=MODEL, alias="production", number=servable.number),
                         metadata=client.metadata)
    versions = all_pages(partial(client.stub.ListVersions, metadata=client.metadata),
                         registry_pb2.ListVersionsRequest(model=MODEL), "versions")
    console.print(render.versions_table(MODEL, versions))
    lineage = client.stub.GetLineage(registry_pb2.GetLineageRequest(
        version=common_pb2.VersionRef(model=MODEL, alias="production")), metadata=client.metadata)
    console.print(render.lineage_table(lineage))
    serve(console, cluster, key, data)
    console.print(f"[bold]production[/] → {MODEL}:{servable.number}. The cluster keeps running: "
                  "`margin deployments`, `margin lineage digits@production`, `make down` to stop it.")


def serve(console: Console, cluster: dict, key: str, data) -> None:
    """Deploy the production version on Triton and predict the validation set through the gateway."""
    conn = connect(cluster["services"]["inference"]["address"], key)
    stub = inference_pb2_grpc.InferenceStub(conn.channel)
    with console.status("deploying digits@production on Triton (export, load, measure capacity)…"):
        deployment = stub.Deploy(inference_pb2.DeployRequest(
            version=common_pb2.VersionRef(model=MODEL, alias="production"),
            batching=inference_pb2.BatchingConfig(max_batch_size=32, max_queue_delay_microseconds=500)),
            metadata=conn.metadata)
    console.print(render.deployments_table([deployment]))
    correct, cost, compute_us, n = 0, 0.0, 0, len(data.x_val)
    for i in range(0, n, 32):
        batch = data.x_val[i:i + 32]
        reply = stub.Predict(inference_pb2.PredictRequest(
            version=common_pb2.VersionRef(model=MODEL, alias="production"), inputs=[to_tensor("input", batch)]),
            metadata=conn.metadata)
        correct += int((from_tensor(reply.outputs[0]).argmax(1) == data.y_val[i:i + 32]).sum())
        cost += reply.usage.cost_micros
        compute_us += reply.usage.compute_microseconds
    requests = (n + 31) // 32
    console.print(f"served {n} validation images in {requests} requests through the gateway: accuracy "
                  f"{correct / n:.2%}, {compute_us / requests / 1000:.2f} ms per request, cost per request "
                  f"{cost / requests:.4f} µ$ (${cost / requests / 1e6:.10f}); "
                  f"{costs.format_money(deployment.cost_per_million.micros)} per million requests on "
                  f"{deployment.device_class}")
    conn.close()


if __name__ == "__main__":
    run()
