"""``margin train`` and ``margin jobs``: estimate, submit, follow, list and cancel training jobs.

:func:`watch` (the progress bar fed by WatchJob) and :func:`report` (the outcome) are what both
``train submit --watch`` and ``jobs watch`` use, and what the demo reuses. :mod:`margin.cli.main` adds
``train_app`` and ``jobs_app`` to the ``margin`` command.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from functools import wraps

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from margin.cli import render
from margin.cli.context import connection
from margin.cli.shared import KeyOpt, console, grpc_errors, load_json, parse_ref
from margin.common.costs import format_money, to_micros
from margin.v1 import common_pb2, training_pb2, training_pb2_grpc

train_app = typer.Typer(help="Estimate and submit training jobs.", no_args_is_help=True)
jobs_app = typer.Typer(help="Training jobs: list, show, watch, cancel.", no_args_is_help=True)
TrainingOpt = typer.Option(None, "--training", help="training service address (default: the local cluster's)")
PRECISIONS = {"fp32": training_pb2.PRECISION_FP32, "bf16": training_pb2.PRECISION_BF16,
              "fp16": training_pb2.PRECISION_FP16}
STATES = {name.removeprefix("JOB_STATE_").lower(): value for name, value in common_pb2.JobState.items()
          if value != common_pb2.JOB_STATE_UNSPECIFIED}
TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED,
            common_pb2.JOB_STATE_BUDGET_EXCEEDED}
_REGISTRY_DATASET = re.compile(r"^[^:@]+(:\d+|@.+)$")  # model:3 or model@alias; "sklearn:digits" is built in


def state_filter(state: str | None) -> int:
    """``--state`` as a JobState (0 = any); a usage error naming the states otherwise. Shared by the job lists."""
    if state is None:
        return 0
    if state.lower() not in STATES:
        raise typer.BadParameter(f"{state!r}: use one of {', '.join(STATES)}", param_hint="--state")
    return STATES[state.lower()]


def training(address: str | None, key: str | None) -> tuple[training_pb2_grpc.TrainingJobsStub, tuple]:
    conn = connection("training", address, key)
    return training_pb2_grpc.TrainingJobsStub(conn.channel), conn.metadata


# -- the spec, from options shared by `train estimate` and `train submit` -------------------------------------
SPEC_OPTIONS: list[tuple[str, object, object]] = [
    ("model", str, typer.Option(..., "--model", help="registry model the trained version is registered into")),
    ("family", str | None, typer.Option(None, "--family", help="model family: mlp | cnn (default mlp; a --base "
                                                               "version's own; none with --package)")),
    ("arch", str | None, typer.Option(None, "--arch", help='architecture JSON, e.g. \'{"channels": [16, 32]}\'; '
                                                          "sizes a built-in dataset fixes are filled in")),
    ("package", str | None, typer.Option(None, "--package", help="train your own PyTorch code: a model-package "
                                         "version, MODEL:NUMBER or MODEL@ALIAS (margin models upload-package)")),
    ("config", str | None, typer.Option(None, "--config", help='the package\'s build_model keyword arguments as a '
                                        'JSON object, e.g. \'{"width": 16}\' (default: none, or a --base '
                                        "version's)")),
    ("dataset", str | None, typer.Option(None, "--dataset", help="built-in dataset (default sklearn:digits), or "
                                         "MODEL:NUMBER / MODEL@ALIAS of a dataset-npz version (--package needs one)")),
    ("base", str | None, typer.Option(None, "--base", help="fine-tune from MODEL:NUMBER or MODEL@ALIAS")),
    ("freeze", list[str], typer.Option([], "--freeze", help="parameter-name prefix kept frozen; may repeat")),
    ("epochs", int, typer.Option(10, "--epochs")),
    ("batch_size", int, typer.Option(64, "--batch-size")),
    ("lr", float, typer.Option(1e-3, "--lr", help="learning rate")),
    ("optimizer", str, typer.Option("adam", "--optimizer", help="adam | sgd")),
    ("seed", int, typer.Option(0, "--seed")),
    ("precision", str, typer.Option("fp32", "--precision", help="fp32 | bf16 | fp16 (fp16 needs a GPU)")),
    ("world_size", int, typer.Option(1, "--world-size", help="DDP processes")),
    ("device_class", str, typer.Option("cpu", "--device-class", help="price-catalog device class and worker queue")),
    ("max_seconds", int, typer.Option(0, "--max-seconds", min=0, show_default=False,
                                      help="wall-clock cap on one attempt of a package job (default: the operator's "
                                           "sandbox limit)")),
]


def json_object(text: str | None, option: str) -> dict:
    """``--arch`` / ``--config``: a JSON object, inline or ``@FILE`` (none given: empty); a usage error naming the
    option otherwise."""
    value = load_json(text, option) if text else {}
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint=option)
    return value


def model_source(family: str | None, package: str | None, base: str | None, dataset: str | None) -> tuple[str, str]:
    """The family and dataset to send. With ``--package`` no family is sent (the service refuses both) and the data
    must be a registry dataset; with ``--base`` alone the service takes the family, or the package and config, from
    the base version; only a plain job defaults to ``mlp``. A dataset not given is ``sklearn:digits``."""
    if package and family:
        raise typer.BadParameter("train a built-in family or your own package, not both", param_hint="--family")
    if package and not (dataset and _REGISTRY_DATASET.match(dataset)):
        raise typer.BadParameter(f"a package trains on a registry dataset: MODEL:NUMBER or MODEL@ALIAS of a "
                                 f"dataset-npz version{f', not the built-in {dataset!r}' if dataset else ''}",
                                 param_hint="--dataset")
    return family or ("" if package or base else "mlp"), dataset or "sklearn:digits"


def build_spec(model: str, family: str | None, arch: str | None, package: str | None, config: str | None,
               dataset: str | None, base: str | None, freeze: list[str], epochs: int, batch_size: int, lr: float,
               optimizer: str, seed: int, precision: str, world_size: int, device_class: str,
               max_seconds: int) -> training_pb2.TrainingSpec:
    """A TrainingSpec from the command-line options. Only what the CLI must parse is checked here; the
    training service validates the rest (and answers INVALID_ARGUMENT)."""
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"{precision!r}: use one of {', '.join(PRECISIONS)}", param_hint="--precision")
    family, dataset = model_source(family, package, base, dataset)
    spec = training_pb2.TrainingSpec(model=model, family=family, freeze_layers=freeze, epochs=epochs,
                                     batch_size=batch_size, learning_rate=lr, optimizer=optimizer, seed=seed,
                                     precision=PRECISIONS[precision], world_size=world_size,
                                     device_class=device_class, max_seconds=max_seconds)
    spec.architecture.update(json_object(arch, "--arch"))
    spec.config.update(json_object(config, "--config"))
    if package:
        spec.package.CopyFrom(parse_ref(package))
    if _REGISTRY_DATASET.match(dataset):
        spec.dataset.registry.CopyFrom(parse_ref(dataset))
    else:
        spec.dataset.builtin = dataset
    if base:
        spec.base_version.CopyFrom(parse_ref(base))
    return spec


def spec_options(fn: Callable) -> Callable:
    """Give a command the options in :data:`SPEC_OPTIONS`; it receives them as one TrainingSpec in ``spec``."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "spec"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, kind, option in SPEC_OPTIONS]

    @wraps(fn)
    def command(**kwargs):
        values = {name: kwargs.pop(name) for name, _, _ in SPEC_OPTIONS}
        return fn(spec=build_spec(**values), **kwargs)

    params = added + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def budget_micros(budget: str | None) -> int:
    if budget is None:
        return 0
    try:
        micros = to_micros(budget)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--budget") from None
    if micros <= 0:
        raise typer.BadParameter("must be a positive amount of dollars, e.g. 0.01", param_hint="--budget")
    return micros


# -- following a job ------------------------------------------------------------------------------------------
def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def watch(stub: training_pb2_grpc.TrainingJobsStub, metadata: tuple, job_id: str,
          out: Console | None = None) -> training_pb2.TrainingJob:
    """Follow a job with a progress bar (epoch x/N, loss, $ so far, ETA) until it ends; returns the final job.

    Events are partial (a state change carries no epoch, a cost tick no loss), so each column keeps its last
    known value; epoch and cost only grow."""
    out = out or console
    job = stub.GetJob(training_pb2.GetJobRequest(id=job_id), metadata=metadata)
    epoch, total = job.epoch, job.total_epochs or job.spec.epochs
    cost, loss = job.cost.total.micros, (job.loss if job.step else None)
    eta: float | None = job.eta_seconds or None
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[cost]} so far"),
               TextColumn("ETA {task.fields[eta]}"))
    with Progress(*columns, console=out) as progress:
        task = progress.add_task(f"{job_id} {render.job_state(job.state)}", total=total, completed=epoch,
                                 loss="—" if loss is None else f"{loss:.4f}", cost=format_money(cost), eta=_eta(eta))
        for event in stub.WatchJob(training_pb2.WatchJobRequest(id=job_id), metadata=metadata):
            total = event.total_epochs or total
            epoch = max(epoch, event.epoch)
            cost = max(cost, event.cost_so_far.micros)
            if event.step:
                loss, eta = event.loss, event.eta_seconds
            if event.state in TERMINAL:
                eta = 0.0
            progress.update(task, description=f"{job_id} {render.job_state(event.state)}", total=total,
                            completed=epoch, cost=format_money(cost), eta=_eta(eta),
                            loss="—" if loss is None else f"{loss:.4f}")
    return stub.GetJob(training_pb2.GetJobRequest(id=job_id), metadata=metadata)


def report(job: training_pb2.TrainingJob, out: Console | None = None) -> bool:
    """Print how a finished job ended: state, message, validation accuracy, cost against the estimate (and per
    attempt when it was resumed), the registered version and its servable exports. Returns whether it SUCCEEDED."""
    out = out or console
    ok = job.state == common_pb2.JOB_STATE_SUCCEEDED
    out.print(f"[{'green' if ok else 'red'}]{render.job_state(job.state)}[/]: {job.message or '—'}")
    if "val_accuracy" in job.metrics:
        out.print(f"validation accuracy {job.metrics['val_accuracy']:.2%} after {job.epoch} epochs")
    expected = job.estimate.cost.expected.micros
    versus = (f" — estimate {render.money(job.estimate.cost.expected)} (range "
              f"{render.money_range(job.estimate.cost)}), actual {job.cost.total.micros / expected:.2f}× the estimate"
              if expected else "")
    out.print(f"cost {render.money(job.cost.total)} ({job.cost.device_hours:.6f} device-hours on "
              f"{job.spec.device_class}){versus}")
    if len(job.attempt_costs) > 1:
        for i, c in enumerate(job.attempt_costs, 1):
            out.print(f"  attempt {i}: {render.money(c.total)} ({c.device_hours:.6f} device-hours)")
    if job.HasField("result_version"):
        out.print(f"registered version [bold]{render.result(job)}[/]")
    return ok


def follow(stub: training_pb2_grpc.TrainingJobsStub, metadata: tuple, job_id: str) -> None:
    """Watch and report a job; exit 0 when it SUCCEEDED, else 1. Ctrl-C stops watching, not the job."""
    try:
        job = watch(stub, metadata, job_id)
    except KeyboardInterrupt:
        console.print(f"stopped watching; {job_id} keeps running: `margin jobs watch {job_id}`")
        raise typer.Exit(130) from None
    raise typer.Exit(0 if report(job) else 1)


# -- commands ------------------------------------------------------------------------------------------------
@train_app.command("estimate")
@grpc_errors
@spec_options
def train_estimate(spec: training_pb2.TrainingSpec, training_addr: str = TrainingOpt,
                   api_key: str = KeyOpt) -> None:
    """Estimate what a training run would cost (expected, low–high), without running it."""
    stub, md = training(training_addr, api_key)
    console.print(render.estimate_table(stub.EstimateCost(training_pb2.EstimateCostRequest(spec=spec), metadata=md)))


@train_app.command("submit")
@grpc_errors
@spec_options
def train_submit(spec: training_pb2.TrainingSpec,
                 budget: str | None = typer.Option(None, "--budget", help="the job's cap in dollars, e.g. 0.01"),
                 idempotency_key: str = typer.Option("", "--idempotency-key", help="same key, same job"),
                 watch_job: bool = typer.Option(False, "--watch", help="follow the job until it ends"),
                 training_addr: str = TrainingOpt, api_key: str = KeyOpt) -> None:
    """Print the estimate, submit a training job and print its id; with --watch, follow it to the end."""
    micros = budget_micros(budget)
    stub, md = training(training_addr, api_key)
    console.print(render.estimate_table(stub.EstimateCost(training_pb2.EstimateCostRequest(spec=spec), metadata=md)))
    job = stub.SubmitJob(training_pb2.SubmitJobRequest(
        spec=spec, budget=common_pb2.Money(micros=micros) if micros else None, idempotency_key=idempotency_key),
        metadata=md)
    console.print(f"submitted [bold]{job.id}[/] ({render.job_state(job.state)})")
    if watch_job:
        follow(stub, md, job.id)


@jobs_app.command("list")
@grpc_errors
def jobs_list(state: str | None = typer.Option(None, "--state", help="|".join(STATES)),
              limit: int = typer.Option(20, "--limit", min=1, max=1000, help="newest first"),
              training_addr: str = TrainingOpt, api_key: str = KeyOpt) -> None:
    """List training jobs, newest first."""
    wanted = state_filter(state)
    stub, md = training(training_addr, api_key)
    reply = stub.ListJobs(training_pb2.ListJobsRequest(page_size=limit, state=wanted), metadata=md)
    console.print(render.jobs_table(list(reply.jobs)))
    if reply.next_page_token:
        console.print(f"(the newest {limit}; --limit shows more)")


@jobs_app.command("show")
@grpc_errors
def jobs_show(job_id: str = typer.Argument(..., metavar="ID"), training_addr: str = TrainingOpt,
              api_key: str = KeyOpt) -> None:
    """Show a job: spec, progress, estimate against actual cost, attempts, checkpoint, efficiency."""
    stub, md = training(training_addr, api_key)
    console.print(render.job_table(stub.GetJob(training_pb2.GetJobRequest(id=job_id), metadata=md)))


@jobs_app.command("cancel")
@grpc_errors
def jobs_cancel(job_id: str = typer.Argument(..., metavar="ID"), reason: str = typer.Option("", "--reason"),
                training_addr: str = TrainingOpt, api_key: str = KeyOpt) -> None:
    """Cancel a job: a queued one at once, a running one at its next step (it checkpoints first)."""
    stub, md = training(training_addr, api_key)
    job = stub.CancelJob(training_pb2.CancelJobRequest(id=job_id, reason=reason), metadata=md)
    console.print(f"{job.id}: {render.job_state(job.state)}"
                  + ("" if job.state in TERMINAL else f" (cancel requested; `margin jobs watch {job.id}`)"))


@jobs_app.command("watch")
@grpc_errors
def jobs_watch(job_id: str = typer.Argument(..., metavar="ID"), training_addr: str = TrainingOpt,
               api_key: str = KeyOpt) -> None:
    """Follow a job with a progress bar until it ends; exit 0 if it SUCCEEDED, else 1."""
    follow(*training(training_addr, api_key), job_id)
