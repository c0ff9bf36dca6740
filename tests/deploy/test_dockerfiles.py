"""docker/: no Docker engine runs here, so `make images` cannot build them; these checks catch what rots without a
build — multi-stage with a final USER 1000, unbuffered Python, COPY sources that exist, the same torch pin as
pyproject.toml, and one image for every image name the chart uses."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from chart import CHART, REPO, of_kind, render

DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
IDS = [p.stem for p in DOCKERFILES]


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for word, rest in instructions(path):
        if word == "FROM":
            result.append([])
        if result:
            result[-1].append((word, rest))
    return result


def test_the_three_images_exist_and_the_chart_uses_no_other() -> None:
    assert set(IDS) == {"service", "gpu-worker", "triton"}
    objs = render(CHART / "ci" / "gpu-pools-values.yaml")
    images = {c["image"] for w in of_kind(objs, "Deployment") for c in w["spec"]["template"]["spec"]["containers"]}
    ours = {re.match(r"ghcr\.io/margin/margin-([a-z-]+):", i)[1] for i in images if i.startswith("ghcr.io/margin/")}
    assert ours == set(IDS)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_multi_stage_and_the_final_stage_runs_as_uid_1000(dockerfile: Path) -> None:
    parts = stages(dockerfile)
    assert len(parts) >= 2, "build in a builder stage, copy the result into a clean final stage"
    assert " AS builder" in parts[0][0][1]
    final = parts[-1]
    assert any(w == "COPY" and "--from=builder" in r for w, r in final)
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1] == "1000", users
    assert not any(w == "RUN" for w, _ in final[[w for w, _ in final].index("USER"):]), "nothing runs after USER"
    env = " ".join(r for w, r in final if w == "ENV")
    assert "PYTHONUNBUFFERED=1" in env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_copied_sources_exist(dockerfile: Path) -> None:
    for word, rest in instructions(dockerfile):
        if word == "COPY" and "--from=" not in rest:
            *sources, _dest = rest.split()
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not {"services", "protos", "tests"} & set(ignored)


def test_python_images_are_slim_and_pin_torch_like_pyproject() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("torch=="))
    for name in ("service", "gpu-worker"):
        text = (REPO / "docker" / f"{name}.Dockerfile").read_text()
        assert all("slim" in rest for w, rest in instructions(REPO / "docker" / f"{name}.Dockerfile") if w == "FROM")
        assert f"pip install {pin}" in text
        assert "grpc_tools.protoc" in text  # the generated margin.v1 code is built into the image
    assert "download.pytorch.org/whl/cpu" in (REPO / "docker" / "service.Dockerfile").read_text()
    triton = (REPO / "docker" / "triton.Dockerfile").read_text()
    assert "nvcr.io/nvidia/tritonserver" in triton and "triton_python_model.py" in triton
