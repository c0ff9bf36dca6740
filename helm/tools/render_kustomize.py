"""Generate k8s/base (the kustomize base for kubectl users) from the Helm chart, so the two never drift.

    python render_kustomize.py HELM CHART K8S_DIR

renders ``helm template margin CHART -n margin -f K8S_DIR/values.yaml`` into ``K8S_DIR/base/margin.yaml`` with a
``kustomization.yaml`` beside it. The overlays (``K8S_DIR/overlays/*``) are written by hand; each carries a
``values.yaml`` saying the same change in chart values, and tests/deploy checks that ``kubectl kustomize`` of the
overlay equals the chart rendered with the base values, then the overlay's, in the overlay's namespace.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RELEASE, NAMESPACE = "margin", "margin"
HEADER = "# Generated from helm/margin by `make k8s` (helm/tools/render_kustomize.py). Do not edit: change the chart.\n"


def render(helm: str, chart: Path, namespace: str, *values: Path) -> str:
    argv = [helm, "template", RELEASE, str(chart), "--namespace", namespace]
    for path in values:
        argv += ["-f", str(path)]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def write_base(helm: str, chart: Path, k8s: Path) -> None:
    base = k8s / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "margin.yaml").write_text(HEADER + render(helm, chart, NAMESPACE, k8s / "values.yaml"))
    (base / "kustomization.yaml").write_text(
        HEADER + "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - margin.yaml\n")
    print(f"wrote {base}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    write_base(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
