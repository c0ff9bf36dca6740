"""Rich tables for registry objects: what the CLI and the demo print."""
from __future__ import annotations

from datetime import datetime

from rich.table import Table

from margin.common.costs import format_money
from margin.registry.convert import FORMAT_FROM_PROTO
from margin.v1 import inference_pb2, registry_pb2

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


def deployments_table(deployments: list) -> Table:
    table = Table(title="Deployments")
    for col, justify in (("name", "left"), ("version", "left"), ("state", "left"), ("device", "left"),
                         ("instances", "right"), ("price/hour", "right"), ("capacity", "right"),
                         ("p50", "right"), ("cost/1M req", "right")):
        table.add_column(col, justify=justify)
    for d in deployments:
        table.add_row(d.name, f"{d.version.model}:{d.version.number}",
                      inference_pb2.DeploymentState.Name(d.state).removeprefix("DEPLOYMENT_STATE_"), d.device_class,
                      str(d.instances), format_money(d.price_per_hour.micros), f"{d.capacity_rps:,.0f} req/s",
                      f"{d.latency_p50_ms:.2f} ms", format_money(d.cost_per_million.micros))
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
