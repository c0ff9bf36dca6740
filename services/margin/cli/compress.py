"""``margin compress``: submit a recipe, run AutoCompress, follow a job, list jobs and report the Pareto front.

:func:`watch` (the progress bar fed by WatchCompressionJob), :func:`front_table` (one row per variant),
:func:`plot_front` (cost per million against quality, as a PNG) and :func:`report` (all of it) are what the commands
use and what the demo reuses. :mod:`margin.cli.main` adds ``compress_app`` to the ``margin`` command.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

import grpc
import typer
from google.protobuf import json_format
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from margin.cli import render, shared
from margin.cli.context import connection
from margin.cli.jobs import STATES, TERMINAL, budget_micros, state_filter
from margin.cli.shared import KeyOpt, RegistryOpt, grpc_errors, load_json, parse_ref
from margin.common.costs import format_money
from margin.v1 import (
    common_pb2,
    compression_pb2,
    compression_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

compress_app = typer.Typer(help="Compress registered models: explicit recipes, AutoCompress, the Pareto front.",
                           no_args_is_help=True)
CompressionOpt = typer.Option(None, "--compression", help="compression service address (default: the local cluster's)")
PngOpt = typer.Option(None, "--png", help="where to save the front plot (default: compression-<job id>.png here)")
BudgetOpt = typer.Option(None, "--budget", help="the job's cap in dollars, e.g. 0.01")
IdempotencyOpt = typer.Option("", "--idempotency-key", help="same key, same job")
EvalDatasetOpt = typer.Option("", "--eval-dataset", help="dataset the variants are scored on: a dataset-npz version "
                              "(MODEL:N or MODEL@ALIAS; required for an onnx source: one array per model input, "
                              "plus labels y for accuracy) or a built-in (default: sklearn:digits for mlp/cnn, "
                              "margin:sentences for minilm)")
WatchOpt = typer.Option(False, "--watch", help="follow the job until it ends, then report the front")
OBJECTIVES = {"cost": compression_pb2.OBJECTIVE_MIN_COST_PER_MILLION,
              "latency": compression_pb2.OBJECTIVE_MIN_LATENCY, "size": compression_pb2.OBJECTIVE_MIN_SIZE}
_FLOOR = re.compile(r"^\s*(?P<metric>[A-Za-z_][\w-]*)\s*(?P<op>>=|<=)\s*"
                    r"(?P<minimum>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")
_REGISTRY_DATASET = re.compile(r"^[^:@]+(:\d+|@.+)$")  # model:3 or model@alias; "sklearn:digits" is built in
_MESSAGE_WIDTH = 60
LOWER_IS_BETTER = ("relative_error",)  # the compression service's metrics whose floor is a ceiling


def compression(address: str | None, key: str | None) -> tuple[compression_pb2_grpc.CompressionStub, tuple]:
    conn = connection("compression", address, key)
    return compression_pb2_grpc.CompressionStub(conn.channel), conn.metadata


# -- parsing options ---------------------------------------------------------------------------------------------
def to_recipe(data: object, option: str) -> compression_pb2.Recipe:
    """A Recipe from its proto-JSON shape (``{"name": ..., "steps": [{"quantize": {...}}]}``). Only the shape is
    checked here; the compression service validates amounts, schemes and order (and answers INVALID_ARGUMENT)."""
    if not isinstance(data, dict):
        raise typer.BadParameter('a recipe must be a JSON object, e.g. {"name": "int8", "steps": [...]}',
                                 param_hint=option)
    try:
        return json_format.ParseDict(data, compression_pb2.Recipe())
    except json_format.ParseError as err:
        raise typer.BadParameter(f"not a recipe: {err}", param_hint=option) from None


def parse_recipe(text: str) -> compression_pb2.Recipe:
    return to_recipe(load_json(text, "--recipe"), "--recipe")


def parse_candidates(text: str | None) -> list[compression_pb2.Recipe]:
    """A JSON list of recipes (inline or ``@FILE``); none means the service's built-in search space."""
    if text is None:
        return []
    data = load_json(text, "--candidates")
    if not isinstance(data, list) or not data:
        raise typer.BadParameter("must be a non-empty JSON list of recipes", param_hint="--candidates")
    return [to_recipe(item, "--candidates") for item in data]


def parse_floor(text: str) -> common_pb2.QualityFloor:
    """``accuracy>=0.97`` → QualityFloor(metric="accuracy", minimum=0.97); a lower-is-better metric takes ``<=``
    (``relative_error<=0.05``: the floor's minimum is then a ceiling)."""
    match = _FLOOR.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r}: use METRIC>=VALUE, e.g. accuracy>=0.97 (relative_error<=VALUE)",
                                 param_hint="--floor")
    expected = "<=" if match["metric"] in LOWER_IS_BETTER else ">="
    if match["op"] != expected:
        raise typer.BadParameter(f"{text!r}: {match['metric']} takes {expected}", param_hint="--floor")
    return common_pb2.QualityFloor(metric=match["metric"], minimum=float(match["minimum"]))


def parse_objective(text: str) -> int:
    if text.lower() not in OBJECTIVES:
        raise typer.BadParameter(f"{text!r}: use one of {', '.join(OBJECTIVES)}", param_hint="--objective")
    return OBJECTIVES[text.lower()]


def dataset_ref(text: str) -> common_pb2.DatasetRef:
    """A registry dataset (``model:3``, ``model@alias``) or a built-in one; empty: the service's default."""
    if _REGISTRY_DATASET.match(text):
        return common_pb2.DatasetRef(registry=parse_ref(text))
    return common_pb2.DatasetRef(builtin=text)


def _money(micros: int) -> common_pb2.Money | None:
    return common_pb2.Money(micros=micros) if micros else None


# -- rendering ---------------------------------------------------------------------------------------------------
def _ref(ref: common_pb2.VersionRef) -> str:
    return f"{ref.model}:{ref.number}" if ref.number else f"{ref.model}@{ref.alias}" if ref.alias else ref.model


def _when(ts) -> str:
    return datetime.fromtimestamp(ts.seconds).strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "—"


def _name(v: compression_pb2.VariantReport, index: int) -> str:
    return v.recipe.name or f"variant {index + 1}"


def _has_floor(job: compression_pb2.CompressionJob) -> bool:
    return job.HasField("auto") and job.auto.HasField("floor") and bool(job.auto.floor.metric)


def objective_name(job: compression_pb2.CompressionJob) -> str:
    """``min cost per million`` for AutoCompress jobs (UNSPECIFIED means that too), ``explicit recipe`` otherwise."""
    if not job.HasField("auto"):
        return "explicit recipe"
    objective = job.auto.objective or compression_pb2.OBJECTIVE_MIN_COST_PER_MILLION
    return compression_pb2.Objective.Name(objective).removeprefix("OBJECTIVE_").lower().replace("_", " ")


def _break_even(n: int) -> str:
    return "never" if n < 0 else f"{n:,}"


def _flags(job: compression_pb2.CompressionJob, index: int, v: compression_pb2.VariantReport) -> str:
    flags = ["★ chosen"] if index == job.chosen else []
    flags += ["pareto"] if v.pareto_optimal else []
    flags += ["≥ floor"] if _has_floor(job) and v.meets_floor else []
    return "\n".join(flags) or "—"


def summary(job: compression_pb2.CompressionJob) -> str:
    """One line: job id, state, source, outcome and what the job cost."""
    return (f"[bold]{job.id}[/] {render.job_state(job.state)} — source {_ref(job.source)} — "
            f"{escape(job.outcome) or 'no outcome yet'} — job cost {render.money(job.cost.total)}")


# (header, justify): numbers are right-aligned and never wrapped; two-line headers keep the table within 150 columns
FRONT_COLUMNS = (("#", "right"), ("recipe", "left"), ("version", "right"), ("size", "right"), ("R", "right"),
                 ("params", "right"), ("sparsity", "right"), ("{metric}", "right"), ("Δ\npts", "right"),
                 ("p50 b1\nms", "right"), ("p50 b32\nms", "right"), ("compute\n$/1M\n(worker)", "right"),
                 ("run cost", "right"), ("break-even\ninferences", "right"), ("flags", "left"))
SERVED_AT = 12  # right after the worker's compute $/1M
SERVED_COLUMN = ("served\n$/1M\n(Triton)", "right")  # only when a variant is deployed: next to the worker's figure
WORKER_LABEL = "model compute cost per million (worker)"
SERVED_LABEL = "served cost per million (Triton)"

MIN_WIDTHS = {"#": 1, "recipe": 10, "flags": 8}


Served = Mapping[tuple[str, int], inference_pb2.Deployment]


def _served_cost(v: compression_pb2.VariantReport, served: Served) -> str:
    d = served.get((v.version.model, v.version.number)) if v.HasField("version") else None
    if d is None or not d.HasField("served_cost_per_million"):
        return "—"
    return render.money(d.served_cost_per_million)


def front_table(job: compression_pb2.CompressionJob, served: Served | None = None) -> Table:
    """One row per variant: what it is, what it measured, what it costs to run and to make, and its flags. The
    worker's figure is the model compute cost per million inferences; with ``served`` (deployments by (model,
    version)) and one of the versions deployed, the served cost per million on Triton stands next to it."""
    served = served or {}
    with_served = any(v.HasField("version") and (v.version.model, v.version.number) in served
                      for v in [*job.variants, *([job.baseline] if job.HasField("baseline") else [])])
    columns = list(FRONT_COLUMNS)
    if with_served:
        columns.insert(SERVED_AT, SERVED_COLUMN)
    metric = next((v.quality_metric for v in job.variants if v.quality_metric), "quality")
    floor = f", floor {job.auto.floor.metric} ≥ {job.auto.floor.minimum:g}" if _has_floor(job) else ""
    table = Table(title=f"Variants of {_ref(job.source)} ({objective_name(job)}{floor})", box=box.SIMPLE_HEAVY,
                  show_edge=False, pad_edge=False, collapse_padding=True,
                  caption=f"{WORKER_LABEL}: measured by the compression worker on the registered artifact"
                          + (f"; {SERVED_LABEL}: what the version's deployment costs as served" if with_served
                             else ""))
    for header, justify in columns:
        table.add_column(header.format(metric=metric), justify=justify, no_wrap=justify == "right",
                         overflow="fold", min_width=MIN_WIDTHS.get(header, 0))
    rows = [(-1, job.baseline)] if job.HasField("baseline") else []
    for i, v in [*rows, *enumerate(job.variants)]:
        source = i < 0
        cells = ["0" if source else str(i + 1), "source" if source else escape(_name(v, i)),
                 _ref(v.version) if v.HasField("version") else "—",
                 render.human_bytes(v.size_bytes), f"{v.compression_ratio:.2f}×", f"{v.parameters:,}",
                 f"{v.sparsity:.1%}", f"{v.quality:.4f}", "—" if source else f"{v.quality_delta * 100:+.2f}",
                 f"{v.latency_p50_ms_batch1:.3f}", f"{v.latency_p50_ms_batch32:.3f}",
                 render.money(v.cost_per_million), "—" if source else render.money(v.run_cost),
                 "—" if source else _break_even(v.break_even_inferences),
                 "as trained" if source else _flags(job, i, v)]
        if with_served:
            cells.insert(SERVED_AT, _served_cost(v, served))
        table.add_row(*cells, style="dim" if source else "bold green" if i == job.chosen else None)
    return table


def deployed_versions(job: compression_pb2.CompressionJob, address: str | None, key: str | None,
                      timeout_s: float = 5.0) -> dict[tuple[str, int], inference_pb2.Deployment]:
    """The deployments of the job's source and variants, by (model, version), from the inference gateway with the
    tenant's key; none when the gateway is unreachable or has no address (the report then shows the worker's
    figures only). A loaded deployment wins over an unloaded one of the same version."""
    models = sorted({v.version.model for v in [*job.variants, job.baseline] if v.HasField("version")}
                    | ({job.source.model} - {""}))
    try:
        conn = connection("inference", address, key)
    except typer.BadParameter:  # no inference address: nothing deployed to show
        return {}
    stub = inference_pb2_grpc.InferenceStub(conn.channel)
    found: dict[tuple[str, int], inference_pb2.Deployment] = {}
    dead = (inference_pb2.DEPLOYMENT_STATE_UNLOADED, inference_pb2.DEPLOYMENT_STATE_FAILED)
    try:
        for model in models:
            request = inference_pb2.ListDeploymentsRequest(model=model, page_size=100)
            while True:
                reply = stub.ListDeployments(request, metadata=conn.metadata, timeout=timeout_s)
                for d in reply.deployments:
                    key_ = (d.version.model, d.version.number)
                    if d.state not in dead and (key_ not in found or found[key_].state in dead):
                        found[key_] = d
                if not reply.next_page_token:
                    break
                request.page_token = reply.next_page_token
    except grpc.RpcError:  # unreachable, or this key may not list deployments: the worker's figures stand alone
        return {}
    finally:
        conn.channel.close()
    return found


def _dollars(value: float, _position: int | None = None) -> str:
    """An axis tick in dollars, as precise as the tick (ticks fall between whole micros): ``$0.0000175``."""
    text = f"{abs(value):.8f}".rstrip("0").rstrip(".")
    return f"{'-' if value < 0 and text != '0' else ''}${text}"


def plot_front(job: compression_pb2.CompressionJob, path: Path) -> Path:
    """Save cost per million inferences ($) against quality as a PNG: every variant labelled by its recipe, the
    Pareto-optimal ones joined by a step line, the floor dashed, the chosen one a large star. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter

    metric = next((v.quality_metric for v in job.variants if v.quality_metric), "quality")
    points = [(v.cost_per_million.micros / 1e6, v.quality, _name(v, i)) for i, v in enumerate(job.variants)]
    fig, ax = plt.subplots(figsize=(10.5, 5.5), dpi=100)
    try:
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=40, color="tab:blue", zorder=3,
                       label="variants")
        for number, (x, y, _) in enumerate(points, start=1):  # numbers on the points, names in the key beside
            ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        key = "\n".join(f"{number}  {name}" for number, (_, _, name) in enumerate(points, start=1))
        fig.text(0.745, 0.5, key, fontsize=8, va="center", ha="left", family="monospace")
        fig.subplots_adjust(right=0.73)
        front = sorted((p[0], p[1]) for p, v in zip(points, job.variants, strict=True) if v.pareto_optimal)
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:orange", zorder=2,
                    marker="o", markersize=11, markerfacecolor="none", label="Pareto front")  # rings: one point too
        if _has_floor(job):
            ax.axhline(job.auto.floor.minimum, color="tab:red", linestyle="--", zorder=1,
                       label=f"floor {job.auto.floor.metric} ≥ {job.auto.floor.minimum:g}")
        if job.HasField("baseline"):
            b = job.baseline
            ax.scatter([b.cost_per_million.micros / 1e6], [b.quality], marker="D", s=60, color="grey", zorder=3,
                       label="source (as trained)")
            ax.annotate("source", (b.cost_per_million.micros / 1e6, b.quality), textcoords="offset points",
                        xytext=(6, -12), fontsize=8, color="grey")
        if 0 <= job.chosen < len(points):
            x, y, name = points[job.chosen]
            ax.scatter([x], [y], marker="*", s=450, color="gold", edgecolors="black", zorder=4,
                       label=f"chosen: {name}")
        if not points:
            ax.text(0.5, 0.5, "no variants", transform=ax.transAxes, ha="center", va="center")
        ax.xaxis.set_major_formatter(FuncFormatter(_dollars))
        ax.tick_params(axis="x", labelrotation=25)
        ax.margins(x=0.15, y=0.1)  # room for the labels
        ax.set_xlabel("cost per million inferences ($)")
        ax.set_ylabel(metric)
        ax.set_title(f"{_ref(job.source)}: {objective_name(job)} ({job.id})")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.74, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def report(job: compression_pb2.CompressionJob, console: Console | None = None, png: Path | None = None,
           served: Served | None = None) -> bool:
    """Print the summary line and the front table (with ``served``: the served cost per million of the deployed
    versions), save the front plot (``png``, default ``compression-<job id>.png`` here) and print its path. Returns
    whether the job SUCCEEDED."""
    out = console or shared.console
    ok = job.state == common_pb2.JOB_STATE_SUCCEEDED
    out.print(summary(job), style=None if ok else "red")
    if not job.variants:
        out.print("no variants were made")
        return ok
    out.print(front_table(job, served))
    path = plot_front(job, png or Path(f"compression-{job.id}.png"))
    out.print(f"front plot saved to {path}")
    return ok


# -- following a job ---------------------------------------------------------------------------------------------
def _total(job: compression_pb2.CompressionJob) -> int | None:
    """How many variants the job makes, when the job says (the built-in search space is known from events)."""
    if job.HasField("recipe"):
        return 1
    return len(job.auto.candidates) or None


def _short(message: str) -> str:
    return escape(message if len(message) <= _MESSAGE_WIDTH else message[:_MESSAGE_WIDTH - 1] + "…")


def watch(stub: compression_pb2_grpc.CompressionStub, metadata: tuple, job_id: str,
          console: Console | None = None) -> compression_pb2.CompressionJob:
    """Follow a job with a progress bar (variant i/N, the last variant's message, $ so far) until its stream ends;
    returns the final job. Events are partial, so each column keeps its last known value; counts and cost only
    grow."""
    out = console or shared.console
    job = stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=job_id), metadata=metadata)
    total, done, cost = _total(job), len(job.variants), job.cost.total.micros
    message = job.outcome or ""
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("variant {task.completed:.0f}/{task.fields[of]}"), TextColumn("{task.fields[message]}"),
               TextColumn("{task.fields[cost]} so far"))
    with Progress(*columns, console=out) as progress:
        task = progress.add_task(f"{job_id} {render.job_state(job.state)}", total=total, completed=done,
                                 of=total or "?", message=_short(message), cost=format_money(cost))
        state, seen_variant = job.state, False
        for event in stub.WatchCompressionJob(compression_pb2.WatchCompressionJobRequest(id=job_id),
                                              metadata=metadata):
            state = event.state or state
            total = event.total_steps or total
            done = max(done, event.step)
            cost = max(cost, event.cost_so_far.micros)
            if event.HasField("variant"):
                message, seen_variant = event.message, True
            elif event.message and not seen_variant:  # before the first variant: "attempt 1" and the like
                message = event.message
            if state in TERMINAL and not total:  # the built-in search space, watched only after it ended
                total = done
            if state == common_pb2.JOB_STATE_SUCCEEDED:
                done = total or done
            progress.update(task, description=f"{job_id} {render.job_state(state)}",
                            total=total, completed=done, of=total or "?", message=_short(message),
                            cost=format_money(cost))
            if state in TERMINAL:
                break
    return stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=job_id), metadata=metadata)


def follow(stub: compression_pb2_grpc.CompressionStub, metadata: tuple, job_id: str, png: Path | None,
           then: Callable[[compression_pb2.CompressionJob], None] | None = None) -> None:
    """Watch and report a job (and, when it SUCCEEDED, hand it to ``then``); exit 0 when it SUCCEEDED, else 1.
    Ctrl-C stops watching, not the job."""
    try:
        job = watch(stub, metadata, job_id)
    except KeyboardInterrupt:
        shared.console.print(f"stopped watching; {job_id} keeps running: `margin compress watch {job_id}`")
        raise typer.Exit(130) from None
    succeeded = report(job, shared.console, png)
    if succeeded and then is not None:
        then(job)
    raise typer.Exit(0 if succeeded else 1)


def alias_chosen(alias: str, registry_addr: str | None, api_key: str | None) \
        -> Callable[[compression_pb2.CompressionJob], None]:
    """Point ``alias`` at the job's chosen variant (nothing when none was chosen)."""
    def point(job: compression_pb2.CompressionJob) -> None:
        if not 0 <= job.chosen < len(job.variants):
            shared.console.print(f"no variant was chosen: {alias} left as it was")
            return
        version = job.variants[job.chosen].version
        conn = connection("registry", registry_addr, api_key)
        registry_pb2_grpc.ModelRegistryStub(conn.channel).SetAlias(registry_pb2.SetAliasRequest(
            model=version.model, alias=alias, number=version.number), metadata=conn.metadata)
        shared.console.print(f"{version.model}@{alias} → v{version.number}")
    return point


def _submitted(stub, md, job: compression_pb2.CompressionJob, watch_job: bool, png: Path | None,
               then: Callable[[compression_pb2.CompressionJob], None] | None = None) -> None:
    shared.console.print(f"submitted [bold]{job.id}[/] ({render.job_state(job.state)})")
    if watch_job:
        follow(stub, md, job.id, png, then)


def jobs_table(jobs: list[compression_pb2.CompressionJob]) -> Table:
    table = Table(title="Compression jobs")
    for col, justify in (("id", "left"), ("state", "left"), ("source", "left"), ("kind", "left"),
                         ("variants", "right"), ("chosen", "left"), ("cost", "right"), ("created", "left")):
        table.add_column(col, justify=justify)
    for j in jobs:
        kind = (f"recipe {escape(j.recipe.name) or '(unnamed)'}" if j.HasField("recipe") else
                f"auto {j.auto.floor.metric} ≥ {j.auto.floor.minimum:g}" if _has_floor(j) else "auto")
        chosen = escape(_name(j.variants[j.chosen], j.chosen)) if 0 <= j.chosen < len(j.variants) else "—"
        table.add_row(j.id, render.job_state(j.state), _ref(j.source), kind, str(len(j.variants)), chosen,
                      render.money(j.cost.total), _when(j.create_time))
    return table


# -- commands ----------------------------------------------------------------------------------------------------
@compress_app.command("submit")
@grpc_errors
def compress_submit(source: str = typer.Argument(..., metavar="SOURCE", help="MODEL:NUMBER or MODEL@ALIAS"),
                    recipe: str = typer.Option(..., "--recipe", help='recipe JSON, or @FILE: {"name": "int8", '
                                               '"steps": [{"quantize": {"scheme": "dynamic_int8"}}]}'),
                    eval_dataset: str = EvalDatasetOpt,
                    device_class: str = typer.Option("cpu", "--device-class", help="price-catalog device class"),
                    budget: str | None = BudgetOpt, idempotency_key: str = IdempotencyOpt,
                    watch_job: bool = WatchOpt, png: Path | None = PngOpt,
                    compression_addr: str = CompressionOpt, api_key: str = KeyOpt) -> None:
    """Compress SOURCE with one explicit recipe and print the job id; with --watch, follow it and report."""
    request = compression_pb2.SubmitCompressionRequest(
        source=parse_ref(source), recipe=parse_recipe(recipe), eval_dataset=dataset_ref(eval_dataset),
        device_class=device_class, budget=_money(budget_micros(budget)), idempotency_key=idempotency_key)
    stub, md = compression(compression_addr, api_key)
    _submitted(stub, md, stub.SubmitCompression(request, metadata=md), watch_job, png)


@compress_app.command("auto")
@grpc_errors
def compress_auto(source: str = typer.Argument(..., metavar="SOURCE", help="MODEL:NUMBER or MODEL@ALIAS"),
                  floor: str = typer.Option(..., "--floor", help="quality floor METRIC>=VALUE, e.g. accuracy>=0.97 "
                                                                 "(classifiers), cosine>=0.99 (minilm); onnx "
                                                                 "sources: accuracy, agreement, cosine or "
                                                                 "relative_error<=VALUE"),
                  objective: str = typer.Option("cost", "--objective", help="|".join(OBJECTIVES)),
                  candidates: str | None = typer.Option(None, "--candidates",
                                                        help="JSON list of recipes, or @FILE (default: the "
                                                             "built-in search space)"),
                  device_class: list[str] = typer.Option([], "--device-class",
                                                         help="price-catalog device class (default cpu); may repeat"),
                  eval_dataset: str = EvalDatasetOpt, budget: str | None = BudgetOpt,
                  idempotency_key: str = IdempotencyOpt, watch_job: bool = WatchOpt, png: Path | None = PngOpt,
                  alias: str | None = typer.Option(None, "--alias", help="with --watch: point this alias at the "
                                                   "chosen variant when the job succeeds (e.g. cheapest)"),
                  compression_addr: str = CompressionOpt, registry_addr: str = RegistryOpt,
                  api_key: str = KeyOpt) -> None:
    """AutoCompress SOURCE: the best variant above the floor; with --watch, follow it and report the front."""
    if alias and not watch_job:
        raise typer.BadParameter("the chosen variant is known when the job ends: add --watch", param_hint="--alias")
    request = compression_pb2.AutoCompressRequest(
        source=parse_ref(source), floor=parse_floor(floor), objective=parse_objective(objective),
        candidates=parse_candidates(candidates), device_classes=device_class, eval_dataset=dataset_ref(eval_dataset),
        budget=_money(budget_micros(budget)), idempotency_key=idempotency_key)
    stub, md = compression(compression_addr, api_key)
    _submitted(stub, md, stub.AutoCompress(request, metadata=md), watch_job, png,
               alias_chosen(alias, registry_addr, api_key) if alias else None)


@compress_app.command("watch")
@grpc_errors
def compress_watch(job_id: str = typer.Argument(..., metavar="ID"), png: Path | None = PngOpt,
                   compression_addr: str = CompressionOpt, api_key: str = KeyOpt) -> None:
    """Follow a job with a progress bar until it ends, then report; exit 0 if it SUCCEEDED, else 1."""
    follow(*compression(compression_addr, api_key), job_id, png)


@compress_app.command("list")
@grpc_errors
def compress_list(state: str | None = typer.Option(None, "--state", help="|".join(STATES)),
                  limit: int = typer.Option(20, "--limit", min=1, max=1000, help="newest first"),
                  compression_addr: str = CompressionOpt, api_key: str = KeyOpt) -> None:
    """List compression jobs, newest first."""
    wanted = state_filter(state)
    stub, md = compression(compression_addr, api_key)
    reply = stub.ListCompressionJobs(compression_pb2.ListCompressionJobsRequest(page_size=limit, state=wanted),
                                     metadata=md)
    shared.console.print(jobs_table(list(reply.jobs)))
    if reply.next_page_token:
        shared.console.print(f"(the newest {limit}; --limit shows more)")


@compress_app.command("report")
@grpc_errors
def compress_report(job_id: str = typer.Argument(..., metavar="ID"), png: Path | None = PngOpt,
                    compression_addr: str = CompressionOpt,
                    inference_addr: str = typer.Option(None, "--inference", help="inference gateway address, for the "
                                                       "served cost of deployed variants (default: the local "
                                                       "cluster's; skipped when unreachable)"),
                    api_key: str = KeyOpt) -> None:
    """Print a job's outcome and front table (with the served cost per million of any variant deployed on Triton)
    and save the front plot; exit 0 if it SUCCEEDED, else 1."""
    stub, md = compression(compression_addr, api_key)
    job = stub.GetCompressionJob(compression_pb2.GetCompressionJobRequest(id=job_id), metadata=md)
    served = deployed_versions(job, inference_addr, api_key) if job.variants else {}
    raise typer.Exit(0 if report(job, shared.console, png, served) else 1)


@compress_app.command("estimate")
@grpc_errors
def compress_estimate(source: str = typer.Argument(..., metavar="SOURCE", help="MODEL:NUMBER or MODEL@ALIAS"),
                      recipe: str | None = typer.Option(None, "--recipe", help="one recipe (JSON or @FILE)"),
                      candidates: str | None = typer.Option(None, "--candidates",
                                                            help="AutoCompress candidates (JSON list or @FILE); "
                                                                 "neither option: the built-in search space"),
                      device_class: str = typer.Option("cpu", "--device-class"),
                      compression_addr: str = CompressionOpt, api_key: str = KeyOpt) -> None:
    """What compressing SOURCE would cost (the range admission compares with a budget); nothing is created."""
    if recipe and candidates:
        raise typer.BadParameter("give --recipe or --candidates, not both", param_hint="--recipe")
    if recipe:
        request = compression_pb2.EstimateCompressionRequest(submit=compression_pb2.SubmitCompressionRequest(
            source=parse_ref(source), recipe=parse_recipe(recipe), device_class=device_class))
    else:
        request = compression_pb2.EstimateCompressionRequest(auto=compression_pb2.AutoCompressRequest(
            source=parse_ref(source), candidates=parse_candidates(candidates), device_classes=[device_class]))
    stub, md = compression(compression_addr, api_key)
    e = stub.EstimateCompression(request, metadata=md)
    shared.console.print(f"{e.variants} variant(s) of {source} on {e.device_class}: expected "
                         f"[bold]{render.money(e.cost.expected)}[/] ({render.money_range(e.cost)}), about "
                         f"{e.seconds:.0f}s ({e.seconds_low:.0f}–{e.seconds_high:.0f}s); basis: {escape(e.basis)}")


@compress_app.command("cancel")
@grpc_errors
def compress_cancel(job_id: str = typer.Argument(..., metavar="ID"),
                    reason: str = typer.Option("cancelled from the CLI", "--reason"),
                    compression_addr: str = CompressionOpt, api_key: str = KeyOpt) -> None:
    """Stop a job between variants (or between fine-tuning epochs); the variants already registered stay."""
    stub, md = compression(compression_addr, api_key)
    job = stub.CancelCompressionJob(compression_pb2.CancelCompressionJobRequest(id=job_id, reason=reason),
                                    metadata=md)
    shared.console.print(f"{job.id}: {render.job_state(job.state)}"
                         + ("" if job.state in TERMINAL else " (stops at the next check, within about a second)"))
