"""Rich tables for registry objects and training jobs: what the CLI and the demo print."""
from __future__ import annotations

import json
from datetime import datetime

from rich.markup import escape
from rich.table import Table

from margin.common import protoconv
from margin.common.costs import format_money
from margin.registry.convert import FORMAT_FROM_PROTO
from margin.v1 import common_pb2, inference_pb2, registry_pb2, training_pb2

FORMAT_NAMES = FORMAT_FROM_PROTO


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts) -> str:
    return datetime.fromtimestamp(ts.seconds).strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else ""


def _metrics(metrics) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _parent(v: registry_pb2.ModelVersion) -> str:
    if not v.HasField("parent"):
        return "—"
    return f"{v.parent.model}:{v.parent.number}" if v.parent.model != v.model else f"v{v.parent.number}"


def _cost(v: registry_pb2.ModelVersion) -> str:
    if not v.HasField("cost"):
        return "—"
    return f"{format_money(v.cost.total.micros, v.cost.total.currency or 'USD')} ({v.cost.device_class})"


def models_table(models: list[registry_pb2.Model]) -> Table:
    table = Table(title="Models")
    for col in ("name", "latest", "aliases", "labels", "created"):
        table.add_column(col)
    for m in models:
        table.add_row(m.name, str(m.latest_version or "—"),
                      ", ".join(f"{a}→v{n}" for a, n in sorted(m.aliases.items())) or "—",
                      ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "—", _when(m.create_time))
    return table


def versions_table(model: str, versions: list[registry_pb2.ModelVersion]) -> Table:
    table = Table(title=f"Versions of {model}")
    for col, justify in (("v", "right"), ("format", "left"), ("size", "right"), ("aliases", "left"),
                         ("parent", "left"), ("metrics", "left"), ("cost", "right"), ("sha256", "left"),
                         ("created", "left")):
        table.add_column(col, justify=justify)
    for v in versions:
        table.add_row(str(v.number), FORMAT_NAMES.get(v.format, "?"), human_bytes(v.size_bytes),
                      ", ".join(v.aliases) or "—", _parent(v), _metrics(v.metrics) or "—", _cost(v),
                      v.sha256[:12], _when(v.create_time))
    return table


def deployment_state(d: inference_pb2.Deployment) -> str:
    """``READY``, ``LOADING``, …, and ``scaled to zero`` (with when it scales to zero, for those that do)."""
    if d.state == inference_pb2.DEPLOYMENT_STATE_SCALED_TO_ZERO:
        state = "scaled to zero"
    else:
        state = inference_pb2.DeploymentState.Name(d.state).removeprefix("DEPLOYMENT_STATE_")
    loaded = (inference_pb2.DEPLOYMENT_STATE_READY, inference_pb2.DEPLOYMENT_STATE_LOADING)
    if d.min_replicas == 0 and d.state in loaded:
        after = f"{d.scale_to_zero_after_seconds:,} s idle" if d.scale_to_zero_after_seconds else "idle"
        state += f"\n[dim]to zero after {after}[/]"
    return state


def cold_start(d: inference_pb2.Deployment) -> str:
    """The last load from zero: how long it took, and when."""
    if not d.last_cold_start_ms and not d.last_cold_start_time.seconds:
        return "—"
    return f"{d.last_cold_start_ms:,.0f} ms\n[dim]{_when(d.last_cold_start_time) or '?'}[/]"


def served_cost(d: inference_pb2.Deployment) -> str:
    """The cost per million requests as served (what routing compares) and where it comes from; then, once the
    deployment has served enough lately, what its requests actually cost (its allocated share of the pool's bill,
    idle time included)."""
    if not d.HasField("served_cost_per_million"):
        return "—"
    source = {"triton": "Triton, live", "deploy": "Deploy"}.get(d.served_cost_source, d.served_cost_source or "?")
    text = f"{format_money(d.served_cost_per_million.micros)}\n[dim]({source})[/]"
    if d.HasField("allocated_cost_per_million"):
        text += f"\n[dim]billed {format_money(d.allocated_cost_per_million.micros)}[/]"
    return text


def deployments_table(deployments: list) -> Table:
    """One row per deployment: state (``scaled to zero`` included), price per replica-hour, measured capacity and
    p50, cost per million requests as measured at Deploy and as served (live on Triton, or the Deploy figure), and the
    last cold start."""
    table = Table(title="Deployments")
    for col, justify in (("name", "left"), ("version", "left"), ("state", "left"), ("device", "left"),
                         ("instances", "right"), ("price/hour", "right"), ("capacity", "right"),
                         ("p50", "right"), ("cost/1M req", "right"), ("served/1M", "right"),
                         ("cold start", "right")):
        table.add_column(col, justify=justify)
    for d in deployments:
        table.add_row(d.name, f"{d.version.model}:{d.version.number}", deployment_state(d), d.device_class,
                      str(d.instances), format_money(d.price_per_hour.micros), f"{d.capacity_rps:,.0f} req/s",
                      f"{d.latency_p50_ms:.2f} ms", format_money(d.cost_per_million.micros), served_cost(d),
                      cold_start(d))
    return table


def lineage_table(lineage: registry_pb2.Lineage) -> Table:
    head = lineage.chain[0] if lineage.chain else None
    title = f"Lineage of {head.model}:{head.number}" if head else "Lineage"
    total = format_money(lineage.total_cost.micros, lineage.total_cost.currency or "USD")
    table = Table(title=title, caption=f"total cost of the chain: {total}")
    for col in ("version", "format", "made by", "metrics", "cost"):
        table.add_column(col)
    for v in lineage.chain:
        recipe = dict(v.recipe)
        made_by = recipe.get("kind", "") or ", ".join(f"{k}={recipe[k]}" for k in list(recipe)[:3]) or "uploaded"
        table.add_row(f"{v.model}:{v.number}", FORMAT_NAMES.get(v.format, "?"), str(made_by),
                      _metrics(v.metrics) or "—", _cost(v))
    return table


# -- training jobs ---------------------------------------------------------------------------------------------
def job_state(state: int) -> str:
    """``JOB_STATE_SUCCEEDED`` → ``SUCCEEDED``."""
    return common_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def money(m: common_pb2.Money) -> str:
    return format_money(m.micros, m.currency or "USD")


def money_range(r: common_pb2.MoneyRange) -> str:
    return f"{money(r.low)} – {money(r.high)}"


def _ref(ref: common_pb2.VersionRef) -> str:
    return f"{ref.model}:{ref.number}" if ref.number else f"{ref.model}@{ref.alias}" if ref.alias else ref.model


def _dataset(spec: training_pb2.TrainingSpec) -> str:
    return spec.dataset.builtin if spec.dataset.WhichOneof("source") == "builtin" else _ref(spec.dataset.registry)


def estimate_table(e: training_pb2.CostEstimate, title: str = "Cost estimate") -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("expected cost", money(e.cost.expected))
    table.add_row("range", money_range(e.cost))
    table.add_row("device-hours", f"{e.device_hours:.6f} ({e.device_hours_low:.6f} – {e.device_hours_high:.6f})"
                  f" on {e.device_class}")
    table.add_row("energy", f"{e.energy_kwh:.6f} kWh")
    table.add_row("price per device-hour", money(e.price_per_device_hour))
    table.add_row("basis", e.basis)
    return table


def made_from(spec: training_pb2.TrainingSpec) -> str:
    """What a job trains: its built-in family, or ``package resnet-code:1`` for a team's own code."""
    return f"package {_ref(spec.package)}" if spec.HasField("package") else spec.family


def result(job: training_pb2.TrainingJob, sep: str = "; ") -> str:
    """The version a job registered, then its servable exports (a package job's TorchScript and ONNX), or ``—``."""
    if not job.HasField("result_version"):
        return "—"
    exports = ", ".join(_ref(v) for v in job.exported_versions)
    return _ref(job.result_version) + (f"{sep}servable: {exports}" if exports else "")


def _epochs(job: training_pb2.TrainingJob) -> str:
    return f"{job.epoch}/{job.total_epochs or job.spec.epochs}"


def jobs_table(jobs: list[training_pb2.TrainingJob]) -> Table:
    table = Table(title="Training jobs")
    for col, justify in (("id", "left"), ("state", "left"), ("model", "left"), ("epoch", "right"),
                         ("cost", "right"), ("created", "left"), ("result", "left")):
        table.add_column(col, justify=justify)
    for j in jobs:
        table.add_row(j.id, job_state(j.state), f"{j.spec.model} ({made_from(j.spec)})", _epochs(j),
                      money(j.cost.total), _when(j.create_time), result(j, "\n"))
    return table


def _attempt_cost(c: common_pb2.Cost) -> str:
    return (f"{money(c.total)} (compute {money(c.compute)} + energy {money(c.energy)}, "
            f"{c.device_hours:.6f} device-hours)")


def job_table(job: training_pb2.TrainingJob) -> Table:
    """One job in detail: spec, progress, estimate against actual cost, attempts, checkpoint, efficiency."""
    s = job.spec
    table = Table(title=f"Training job {job.id}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("state", job_state(job.state) + (f" — {job.message}" if job.message else "")),
            ("model", f"{s.model} ({made_from(s)}"
                      + (f", fine-tuned from {_ref(s.base_version)})" if s.HasField("base_version") else ")")),
            ("dataset", _dataset(s)),
            ("training", f"{s.epochs} epochs, batch {s.batch_size}, lr {s.learning_rate:g}, {s.optimizer}, "
                         f"{training_pb2.Precision.Name(s.precision).removeprefix('PRECISION_').lower()}, "
                         f"world size {s.world_size}, {s.device_class}"),
            ("progress", f"epoch {_epochs(job)}, step {job.step}"
                         + (f", loss {job.loss:.4f}" if job.step else "")),
            ("created", _when(job.create_time)), ("started", _when(job.start_time) or "—"),
            ("ended", _when(job.end_time) or "—"),
            ("budget", money(job.budget) if job.budget.micros else "tenant budget only"),
            ("estimate", f"{money(job.estimate.cost.expected)} (range {money_range(job.estimate.cost)})"
                         if job.HasField("estimate") else "—"),
            ("actual cost", _attempt_cost(job.cost)
             + (f", {job.cost.total.micros / job.estimate.cost.expected.micros:.2f}× the estimate"
                if job.estimate.cost.expected.micros else ""))]
    rows += [(f"attempt {i}", _attempt_cost(c)) for i, c in enumerate(job.attempt_costs, 1)]
    if job.HasField("checkpoint"):
        c = job.checkpoint
        rows.append(("checkpoint", f"{c.key} (epoch {c.epoch}, step {c.step}, {human_bytes(c.size_bytes)})"))
    if job.distributed_efficiency:
        rows.append(("efficiency", f"distributed {job.distributed_efficiency:.2f}, "
                                   f"scaling {job.scaling_efficiency:.2f} (world size {s.world_size})"))
    if job.metrics:
        rows.append(("metrics", _metrics(job.metrics)))
    if s.HasField("package"):
        rows.append(("package", f"config {escape(json.dumps(protoconv.from_struct(s.config)))}, time limit "
                                + (f"{s.max_seconds} s" if s.max_seconds else "the operator's")))
    rows.append(("result", result(job)))
    for name, value in rows:
        table.add_row(name, value)
    return table
