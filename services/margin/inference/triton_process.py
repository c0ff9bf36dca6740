"""Run NVIDIA Triton locally: the ``tritonserver`` binary of the ``nvidia-pytriton`` wheel, python backend.

The wheel carries a real Triton Inference Server (``pytriton/tritonserver/bin/tritonserver``), the python
backend (``backends/python/``), one python-backend stub per Python version
(``python_backend_stubs/<major>.<minor>/triton_python_backend_stub``) and the shared libraries they need
(``site-packages/nvidia_pytriton.libs``). No PyTriton Python API is used: :func:`triton_spec` describes a
``tritonserver`` process over a model repository of our own, which :class:`~margin.cluster.processes.ManagedProcess`
starts, health-checks (Triton's ServerReady) and stops::

    spec = triton_spec(home, repository)
    triton = ManagedProcess(spec, logs)
    triton.start()
    triton.wait_healthy(60)
    # tritonclient.grpc.InferenceServerClient(spec.address).load_model("mlp") ...

Models are loaded and unloaded explicitly (``--model-control-mode=explicit``) through Triton's API.

The environment matters (see ``shared/design/LOCAL-TRITON.md``): the stub embeds the running interpreter's
``libpython``, so ``LD_LIBRARY_PATH`` starts with this interpreter's ``LIBDIR`` (else the system's older
``libpython3.11`` is picked up and fails), then ``nvidia_pytriton.libs`` (for ``libcudart``); ``PATH``
starts with this interpreter's ``bin`` so that the stub's Python is this environment's and a ``model.py``
can ``import torch, numpy`` (see :func:`triton_env`).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from margin.cluster.processes import MissingDependency, ProcessSpec, free_port
from margin.inference.triton_client import CONTROL_KEY_HEADER, RESTRICTED_PROTOCOLS

INSTALL_HINT = "install it with `pip install nvidia-pytriton==0.7.0` (`make setup` does)"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB = "triton_python_backend_stub"
EXIT_TIMEOUT_S = 10  # Triton's grace for in-flight requests on SIGTERM; below ManagedProcess's stop timeout


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel's Triton pieces are."""

    binary: Path            # pytriton/tritonserver/bin/tritonserver
    python_backend: Path    # pytriton/tritonserver/backends/python (libtriton_python.so, *_utils.py)
    stub: Path              # the python-backend stub for the running Python version
    libs: Path              # site-packages/nvidia_pytriton.libs
    python_version: str     # "3.11"


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_triton() -> TritonInstall:
    """Locate Triton in the installed ``nvidia-pytriton`` wheel; :class:`MissingDependency` if incomplete."""
    spec = importlib.util.find_spec("pytriton")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(f"NVIDIA Triton is not installed (no `pytriton` package): {INSTALL_HINT}")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    version = python_version()
    stubs = root / "python_backend_stubs"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=stubs / version / STUB,
        libs=package.parent / "nvidia_pytriton.libs",
        python_version=version,
    )
    if not (install.binary.is_file() and os.access(install.binary, os.X_OK)):
        raise MissingDependency(f"the nvidia-pytriton wheel has no runnable {install.binary}: {INSTALL_HINT}")
    missing = [str(install.python_backend / name) for name in PYTHON_BACKEND_FILES
               if not (install.python_backend / name).is_file()]
    if missing:
        raise MissingDependency(f"Triton's python backend is incomplete (missing {missing}): {INSTALL_HINT}")
    if not install.stub.is_file():
        available = sorted(p.name for p in stubs.iterdir() if (p / STUB).is_file()) if stubs.is_dir() else []
        raise MissingDependency(f"nvidia-pytriton has no python-backend stub for Python {version} (it has "
                                f"{available}); run Margin on one of those Python versions")
    if not install.libs.is_dir():
        raise MissingDependency(f"{install.libs} (Triton's shared libraries) is missing: {INSTALL_HINT}")
    return install


def _place(src: Path, dst: Path) -> None:
    """Make ``dst`` a symlink to ``src`` (a copy where symlinks are not allowed), replacing what is there."""
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        dst.unlink()
    try:
        dst.symlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def prepare_backend_dir(target: Path, install: TritonInstall | None = None) -> Path:
    """Assemble ``<target>/python/`` (python backend + this Python's stub) for ``--backend-directory``.

    Returns ``target``, the folder to pass as ``--backend-directory``. Idempotent.
    """
    install = install or find_triton()
    backend = Path(target) / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for name in PYTHON_BACKEND_FILES:
        _place(install.python_backend / name, backend / name)
    _place(install.stub, backend / STUB)
    return Path(target)


def _path_list(*parts: str | None) -> str:
    seen: list[str] = []
    for part in parts:
        for item in (part or "").split(os.pathsep):
            if item and item not in seen:
                seen.append(item)
    return os.pathsep.join(seen)


def triton_env(install: TritonInstall) -> dict[str, str]:
    """The environment ``tritonserver`` (and the python-backend stubs it starts) need, over ``os.environ``.

    The stub embeds Python in *isolated* mode, so ``PYTHONPATH`` is ignored there. Its interpreter finds
    its prefix the way a bare ``python3`` would: by looking ``python3`` up on ``PATH``. With this
    interpreter's ``bin`` first on ``PATH``, that is this environment's ``python3``; a virtual
    environment's ``pyvenv.cfg`` then puts its site-packages (torch, numpy) on the stub's ``sys.path``.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    return {
        "LD_LIBRARY_PATH": _path_list(libdir, str(install.libs), os.environ.get("LD_LIBRARY_PATH")),
        "PATH": _path_list(str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)),
    }


def restricted_flags(control_key: str) -> list[str]:
    """The flags that make Triton answer model control and its settings only with ``control_key`` in the header."""
    rule = f"{RESTRICTED_PROTOCOLS}:{CONTROL_KEY_HEADER}={control_key}"
    return [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]


def triton_spec(home: Path, repository: Path, grpc_port: int | None = None, http_port: int | None = None,
                metrics_port: int | None = None, load_all: bool = False, control_key: str | None = None) -> ProcessSpec:
    """A :class:`ProcessSpec` for ``tritonserver`` serving ``repository`` (explicit model control; with
    ``load_all``, every model in the repository is loaded at start, as the chart's serving pools do). With
    ``control_key``, model control and the server's settings answer only requests carrying it (gRPC and HTTP):
    the gateway's (:data:`~margin.inference.triton_client.CONTROL_KEY_HEADER`), nobody else on this machine.

    The backend directory is assembled under ``<home>/triton/backends``. Ports left None are picked free;
    ``spec.port``/``spec.address`` is the gRPC endpoint (what the gateway and the health check use), and
    ``spec.ports`` has all three. Everything listens on 127.0.0.1 only. Raises :class:`MissingDependency`
    when the wheel is not installed.
    """
    install = find_triton()
    home, repository = Path(home), Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    backends = prepare_backend_dir(home / "triton" / "backends", install)
    ports = {"grpc": grpc_port or free_port(), "http": http_port or free_port(),
             "metrics": metrics_port or free_port()}
    argv = [
        str(install.binary),
        f"--model-repository={repository.resolve()}",
        "--model-control-mode=explicit",
        f"--backend-directory={backends.resolve()}",
        "--grpc-address=127.0.0.1", f"--grpc-port={ports['grpc']}",
        "--http-address=127.0.0.1", f"--http-port={ports['http']}",
        "--metrics-address=127.0.0.1", f"--metrics-port={ports['metrics']}",
        "--log-verbose=0",
        # no GPU metrics: the local Triton runs on the CPU, and the DCGM they start with can hang for 60 s while a
        # previous tritonserver is still exiting (seen on CI: `up` after `down` timed out on it)
        "--allow-gpu-metrics=false",
        "--exit-on-error=false",
        "--strict-readiness=false",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        *(["--load-model=*"] if load_all else []),
        *(restricted_flags(control_key) if control_key else []),
    ]
    return ProcessSpec("triton", argv, ports["grpc"], "triton", triton_env(install), ports)
