"""``margin``: the command line for the local cluster, the registry and tenant administration."""
from __future__ import annotations

import io
import json
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table
from tritonclient.grpc import service_pb2, service_pb2_grpc

from margin.cli import render
from margin.cli.admin import admin_app
from margin.cli.budget import budget_app, scaling_plan, spend
from margin.cli.compress import compress_app
from margin.cli.context import connection
from margin.cli.jobs import jobs_app, train_app
from margin.cli.reports import prices_app, report_app
from margin.cli.shared import KeyOpt, RegistryOpt, console, grpc_errors, parse_ref
from margin.cluster import local
from margin.common import config, modelpackage, protoconv
from margin.common.errors import NotFound
from margin.registry.convert import FORMAT_TO_PROTO
from margin.sdk import RegistryClient
from margin.sdk.pages import all_pages
from margin.sdk.tensors import from_tensor, signature_from_dict, to_tensor
from margin.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2

app = typer.Typer(help="Margin: train, compress, register and serve PyTorch models under a money budget.",
                  no_args_is_help=True)
models_app = typer.Typer(help="Models in the registry.", no_args_is_help=True)
versions_app = typer.Typer(help="Versions of a model: upload, download, list.", no_args_is_help=True)
alias_app = typer.Typer(help="Aliases such as 'production'.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(versions_app, name="versions")
app.add_typer(alias_app, name="alias")
app.add_typer(admin_app, name="admin")
app.add_typer(train_app, name="train")
app.add_typer(jobs_app, name="jobs")
app.add_typer(compress_app, name="compress")
app.add_typer(budget_app, name="budget")
app.add_typer(report_app, name="report")
app.add_typer(prices_app, name="prices")
app.command("spend")(spend)
app.command("scaling-plan")(scaling_plan)


def pairs(items: list[str], option: str) -> dict[str, str]:
    """``["k=v", ...]`` → dict, or a usage error naming the option."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        out[key] = value
    return out


def metrics(items: list[str]) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in pairs(items, "--metric").items()}
    except ValueError:
        raise typer.BadParameter("metric values must be numbers, e.g. accuracy=0.97", param_hint="--metric") from None


def registry(address: str | None, key: str | None) -> RegistryClient:
    return RegistryClient(connection("registry", address, key))


# -- local cluster ----------------------------------------------------------------------------------
@app.command()
def up() -> None:
    """Start the local cluster (Redis and the services) and wait until every part is healthy."""
    with console.status("starting the local cluster…"):
        try:
            current = local.up()
        except (local.ClusterError, RuntimeError) as err:
            console.print(f"[red]{err}[/]")
            raise typer.Exit(1) from None
    status()
    console.print(f"demo tenant key in {local.state.demo_key_path()}")
    del current


@app.command()
def down() -> None:
    """Stop the local cluster."""
    console.print("stopped" if local.down() else "the local cluster was not running")


@app.command()
def status() -> None:
    """Show the local cluster's processes."""
    current = local.state.read_state()
    alive = local.running_state() is not None
    table = Table(title=f"Local cluster: {current.get('status', 'not started') if alive else 'not running'}")
    for col in ("part", "address", "pid", "up", "restarts", "log"):
        table.add_column(col)
    for name, svc in current.get("services", {}).items() if alive else ():
        table.add_row(name, svc["address"], str(svc["pid"]), "yes" if svc["up"] else "no", str(svc["restarts"]),
                      svc["log"])
    console.print(table)


@app.command("config")
def show_config() -> None:
    """List every environment variable the services read, with its default."""
    table = Table(title="Configuration (environment variables)")
    for col in ("variable", "default", "meaning"):
        table.add_column(col)
    for s in config.ALL_SETTINGS:
        table.add_row(s.env, s.default or "—", s.doc)
    console.print(table)


@app.command()
def demo(epochs: int = typer.Option(40, help="epochs of the digits training job (it must reach 97% accuracy)")) -> None:
    """Run the main job end to end on the local cluster and print what it cost."""
    from margin import demo as demo_module

    try:
        demo_module.run(console, epochs)
    except demo_module.DemoFailed as err:
        console.print(f"[bold red]demo failed[/]: {err}")
        raise typer.Exit(1) from None


# -- models ----------------------------------------------------------------------------------------------
@models_app.command("list")
@grpc_errors
def models_list(label: list[str] = typer.Option([], help="k=v, may repeat"), registry_addr: str = RegistryOpt,
                api_key: str = KeyOpt) -> None:
    """List models (all pages)."""
    client = registry(registry_addr, api_key)
    request = registry_pb2.ListModelsRequest(label_selector=pairs(label, "--label"))
    models = all_pages(partial(client.stub.ListModels, metadata=client.metadata), request, "models")
    console.print(render.models_table(models))


@models_app.command("create")
@grpc_errors
def models_create(name: str, description: str = "", label: list[str] = typer.Option([]),
                  registry_addr: str = RegistryOpt, api_key: str = KeyOpt) -> None:
    """Create a model."""
    model = registry(registry_addr, api_key).create_model(name, description, pairs(label, "--label"))
    console.print(render.models_table([model]))


@models_app.command("show")
@grpc_errors
def models_show(name: str, registry_addr: str = RegistryOpt, api_key: str = KeyOpt) -> None:
    """Show a model and its versions."""
    client = registry(registry_addr, api_key)
    console.print(render.models_table([client.stub.GetModel(registry_pb2.GetModelRequest(name=name),
                                                            metadata=client.metadata)]))
    versions_list(name, registry_addr, api_key)


@models_app.command("import-minilm")
@grpc_errors
def models_import_minilm(model: str = typer.Option("minilm", "--model", help="the model to add the version to"),
                         registry_addr: str = RegistryOpt, api_key: str = KeyOpt) -> None:
    """Register the packaged MiniLM-L6 sentence encoder (safetensors + its BERT config) as a version to compress;
    the same weights give the same version."""
    from margin.compression.minilm import register_minilm

    with console.status(f"uploading MiniLM-L6 to {model}…"):
        version = register_minilm(registry(registry_addr, api_key), model)
    console.print(render.versions_table(model, [version]))


@models_app.command("upload-package")
@grpc_errors
def models_upload_package(
    path: Path = typer.Argument(..., exists=True, help="model.py, a .zip of .py files, or a folder of them (zipped "
                                                        "here); the entry module is model.py"),
    model: str = typer.Option(..., "--model", help="the model to add the version to"),
    description: str = "",
    create: bool = typer.Option(False, "--create", help="create the model first if it does not exist"),
    registry_addr: str = RegistryOpt, api_key: str = KeyOpt,
) -> None:
    """Upload your PyTorch model code as a model-package version: model.py defines build_model(**config) (and may
    define loss, metrics, example_inputs). The registry only parses it; it runs in a sandbox when you train it with
    `margin train submit --package`."""
    meta = registry_pb2.UploadMetadata(model=model, format=FORMAT_TO_PROTO[modelpackage.FORMAT],
                                       description=description)
    client = registry(registry_addr, api_key)
    _model_for_upload(client, model, create)
    version = client.upload_bytes(package_bytes(path), meta)
    console.print(render.versions_table(model, [version]))
    defines = protoconv.from_struct(version.architecture).get("defines", [])
    console.print(f"{model} v{version.number} defines: {', '.join(defines)}")


def package_bytes(path: Path) -> bytes:
    """What ``upload-package`` sends for ``path``: a .py or .zip file as it is, or a folder zipped in memory (every
    .py file under it by its relative name, __pycache__ skipped)."""
    if path.is_dir():
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(path.rglob("*.py")):
                name = file.relative_to(path)
                if "__pycache__" not in name.parts and file.is_file():
                    archive.writestr(name.as_posix(), file.read_bytes())
        return buffer.getvalue()
    if path.suffix not in (".py", ".zip"):
        raise typer.BadParameter(f"{path} is not a .py file, a .zip or a folder", param_hint="PATH")
    return path.read_bytes()


# -- versions ----------------------------------------------------------------------------------------------
@versions_app.command("list")
@grpc_errors
def versions_list(model: str, registry_addr: str = RegistryOpt, api_key: str = KeyOpt) -> None:
    """List a model's versions (all pages)."""
    client = registry(registry_addr, api_key)
    versions = all_pages(partial(client.stub.ListVersions, metadata=client.metadata),
                         registry_pb2.ListVersionsRequest(model=model), "versions")
    console.print(render.versions_table(model, versions))


def _progress() -> Progress:
    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=console)


def _model_for_upload(client: RegistryClient, model: str, create: bool) -> None:
    """Make sure ``model`` exists before any byte is sent (the server only answers NOT_FOUND after the whole file
    has streamed): create it with ``create``, else refuse, saying both ways on."""
    if create:
        client.ensure_model(model)
    elif not client.model_exists(model):
        raise NotFound(f"model {model!r} does not exist: create it first (margin models create {model}), or add "
                       "--create to this upload")


@versions_app.command("upload")
@grpc_errors
def versions_upload(
    model: str, file: Path = typer.Argument(..., exists=True, dir_okay=False),
    fmt: str = typer.Option(..., "--format", help="|".join(FORMAT_TO_PROTO)),
    signature: Path | None = typer.Option(None, help='JSON {"inputs": [{"name","dtype","shape"}], "outputs": [...]}; '
                                                     "dtype as Margin/Triton names it (FP32, INT64, BOOL, ...) or as "
                                                     "numpy does (float32, int64, bool, uint8, ...)"),
    architecture: Path | None = typer.Option(None, help="JSON architecture spec (required for safetensors)"),
    parent: str | None = typer.Option(None, help="MODEL:NUMBER or MODEL@ALIAS this version derives from"),
    metric: list[str] = typer.Option([], help="name=value, may repeat"),
    description: str = "", alias: str | None = typer.Option(None, help="point this alias at the new version"),
    create: bool = typer.Option(False, "--create", help="create the model first if it does not exist"),
    registry_addr: str = RegistryOpt, api_key: str = KeyOpt,
) -> None:
    """Upload a file as a new version (sha256 checked by the server)."""
    if fmt not in FORMAT_TO_PROTO:
        raise typer.BadParameter(f"--format must be one of {list(FORMAT_TO_PROTO)}")
    meta = registry_pb2.UploadMetadata(model=model, format=FORMAT_TO_PROTO[fmt], description=description,
                                       metrics=metrics(metric))
    if signature:
        meta.signature.CopyFrom(protoconv.signature_to_proto(signature_from_dict(json.loads(signature.read_text()))))
    if architecture:
        meta.architecture.CopyFrom(protoconv.struct(json.loads(architecture.read_text())))
    if parent:
        meta.parent.CopyFrom(parse_ref(parent))
    client = registry(registry_addr, api_key)
    _model_for_upload(client, model, create)
    with _progress() as progress:
        task = progress.add_task(f"uploading {file.name}", total=file.stat().st_size)
        version = client.upload_file(file, meta, progress=lambda n: progress.advance(task, n))
    if alias:
        client.stub.SetAlias(registry_pb2.SetAliasRequest(model=model, alias=alias, number=version.number),
                             metadata=client.metadata)
        version = client.stub.GetVersion(registry_pb2.GetVersionRequest(
            version=common_pb2.VersionRef(model=model, number=version.number)), metadata=client.metadata)
    console.print(render.versions_table(model, [version]))


@versions_app.command("download")
@grpc_errors
def versions_download(ref: str, out: Path, registry_addr: str = RegistryOpt, api_key: str = KeyOpt) -> None:
    """Download a version (MODEL, MODEL:N or MODEL@ALIAS) to a file; its sha256 is verified."""
    client = registry(registry_addr, api_key)
    version_ref = parse_ref(ref)
    size = client.stub.GetVersion(registry_pb2.GetVersionRequest(version=version_ref),
                                  metadata=client.metadata).size_bytes
    with _progress() as progress:
        task = progress.add_task(f"downloading {ref}", total=size)
        version = client.download_to(version_ref, out, progress=lambda n: progress.advance(task, n))
    console.print(f"wrote {out} ({render.human_bytes(version.size_bytes)}, sha256 {version.sha256[:12]}… verified)")


# -- aliases and lineage ---------------------------------------------------------------------------------------
@alias_app.command("set")
@grpc_errors
def alias_set(model: str, alias: str, number: int, registry_addr: str = RegistryOpt, api_key: str = KeyOpt) -> None:
    """Point ALIAS of MODEL at version NUMBER."""
    client = registry(registry_addr, api_key)
    client.stub.SetAlias(registry_pb2.SetAliasRequest(model=model, alias=alias, number=number),
                         metadata=client.metadata)
    console.print(f"{model}@{alias} → v{number}")


@alias_app.command("delete")
@grpc_errors
def alias_delete(model: str, alias: str, registry_addr: str = RegistryOpt, api_key: str = KeyOpt) -> None:
    """Remove an alias."""
    client = registry(registry_addr, api_key)
    client.stub.DeleteAlias(registry_pb2.DeleteAliasRequest(model=model, alias=alias), metadata=client.metadata)
    console.print(f"removed {model}@{alias}")


# -- serving ---------------------------------------------------------------------------------------------------
InferenceOpt = typer.Option(None, "--inference", help="inference gateway address (default: the local cluster's)")


def inference(address: str | None, key: str | None) -> tuple[inference_pb2_grpc.InferenceStub, tuple]:
    conn = connection("inference", address, key)
    return inference_pb2_grpc.InferenceStub(conn.channel), conn.metadata


def served_input_names(ref: common_pb2.VersionRef, address: str | None, key: str | None) -> list[str]:
    """The input names of the version a request for ``ref`` would reach, from the gateway's Open Inference
    Protocol model metadata (the same port and key as Predict)."""
    conn = connection("inference", address, key)
    request = service_pb2.ModelMetadataRequest(name=ref.model, version=str(ref.number) if ref.number else ref.alias)
    reply = service_pb2_grpc.GRPCInferenceServiceStub(conn.channel).ModelMetadata(request, metadata=conn.metadata)
    return [t.name for t in reply.inputs]


def npy_input_name(ref: common_pb2.VersionRef, address: str | None, key: str | None) -> str:
    """The input a lone .npy array feeds when --input is not given: the model's only input; a model with several
    is refused, naming them."""
    names = served_input_names(ref, address, key)
    if len(names) != 1:
        raise typer.BadParameter(f"{ref.model} takes {len(names)} inputs ({', '.join(names)}): name the one this "
                                 ".npy file feeds with --input NAME, or pass a .npz with an array per input name",
                                 param_hint="--input")
    return names[0]


@app.command()
@grpc_errors
def deploy(ref: str, device_class: str = typer.Option("cpu", help="price-catalog device class"),
           instances: int = 1, max_batch_size: int = 32, max_queue_delay_us: int = 500,
           min_replicas: int | None = typer.Option(None, "--min-replicas", min=0,
                                                   help="replicas kept however idle (default 1); 0: scale to zero "
                                                        "when idle, the next request loads it again"),
           scale_to_zero_after: int | None = typer.Option(None, "--scale-to-zero-after", min=1, metavar="SECONDS",
                                                          help="with --min-replicas 0: unload after this long idle "
                                                               "(default: the platform's)"),
           inference_addr: str = InferenceOpt, api_key: str = KeyOpt) -> None:
    """Deploy a version (MODEL, MODEL:N or MODEL@ALIAS) on Triton; prints its price and measured capacity."""
    if scale_to_zero_after is not None and min_replicas != 0:
        raise typer.BadParameter("only a deployment that scales to zero is unloaded when idle: add --min-replicas 0",
                                 param_hint="--scale-to-zero-after")
    request = inference_pb2.DeployRequest(
        version=parse_ref(ref), device_class=device_class, instances=instances,
        batching=inference_pb2.BatchingConfig(max_batch_size=max_batch_size,
                                              max_queue_delay_microseconds=max_queue_delay_us),
        scale_to_zero_after_seconds=scale_to_zero_after or 0)
    if min_replicas is not None:  # unset: the service's default (1)
        request.min_replicas = min_replicas
    stub, md = inference(inference_addr, api_key)
    with console.status(f"deploying {ref} (export, load on Triton, measure capacity)…"):
        d = stub.Deploy(request, metadata=md)
    console.print(render.deployments_table([d]))


@app.command()
@grpc_errors
def undeploy(name: str, inference_addr: str = InferenceOpt, api_key: str = KeyOpt) -> None:
    """Unload a deployment (e.g. digits-v2) from Triton."""
    stub, md = inference(inference_addr, api_key)
    console.print(render.deployments_table([stub.Undeploy(inference_pb2.UndeployRequest(name=name), metadata=md)]))


@app.command()
@grpc_errors
def deployments(model: str = typer.Option("", help="only this model's"), inference_addr: str = InferenceOpt,
                api_key: str = KeyOpt) -> None:
    """List deployments: state (scaled to zero included), price per hour, measured capacity, cost per million
    requests as measured at Deploy and as served, and the last cold start."""
    stub, md = inference(inference_addr, api_key)
    items = all_pages(partial(stub.ListDeployments, metadata=md), inference_pb2.ListDeploymentsRequest(model=model),
                      "deployments")
    console.print(render.deployments_table(items))


@app.command()
@grpc_errors
def predict(ref: str, file: Path = typer.Argument(..., exists=True, dir_okay=False, help=".npy or .npz"),
            input_name: str | None = typer.Option(None, "--input", help="input name for a .npy file (default: the "
                                                                        "model's only input)"),
            min_quality: str | None = typer.Option(None, help="METRIC=VALUE: route to the cheapest variant meeting it"),
            max_latency_ms: float = 0.0, inference_addr: str = InferenceOpt, api_key: str = KeyOpt) -> None:
    """Predict with inputs from a .npy/.npz file (loaded without pickle); prints outputs, version served, cost."""
    version = parse_ref(ref)
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as data:
            inputs = [to_tensor(name, data[name]) for name in data.files]
    else:
        array = np.load(file, allow_pickle=False)
        inputs = [to_tensor(input_name or npy_input_name(version, inference_addr, api_key), array)]
    request = inference_pb2.PredictRequest(version=version, inputs=inputs)
    if min_quality or max_latency_ms:
        metric, minimum = next(iter(pairs([min_quality], "--min-quality").items())) if min_quality else ("", "0")
        request.routing.CopyFrom(inference_pb2.RoutingPolicy(
            floor=common_pb2.QualityFloor(metric=metric, minimum=float(minimum)), max_latency_ms=max_latency_ms))
    stub, md = inference(inference_addr, api_key)
    reply = stub.Predict(request, metadata=md)
    for out in reply.outputs:
        console.print(f"[bold]{out.name}[/] {list(out.shape)}:\n{from_tensor(out)}")
    console.print(f"served by {reply.served_version.model}:{reply.served_version.number} ({reply.deployment}) in "
                  f"{reply.usage.compute_microseconds / 1000:.2f} ms; cost {reply.usage.cost_micros:.4f} µ$ "
                  f"(${reply.usage.cost_micros / 1e6:.10f})")


@app.command()
@grpc_errors
def lineage(ref: str, registry_addr: str = RegistryOpt, api_key: str = KeyOpt) -> None:
    """Show where a version came from: the parent chain with each recipe and cost."""
    client = registry(registry_addr, api_key)
    console.print(render.lineage_table(client.stub.GetLineage(registry_pb2.GetLineageRequest(version=parse_ref(ref)),
                                                              metadata=client.metadata)))


if __name__ == "__main__":
    app()
