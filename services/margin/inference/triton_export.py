"""Export a registered version into a Triton Inference Server model repository.

A Triton model repository holds one folder per model::

    <repository>/<model_name>/config.pbtxt
    <repository>/<model_name>/1/model.pt        (TorchScript, backend ``pytorch_libtorch``)
    <repository>/<model_name>/1/model.onnx      (ONNX, backend ``onnxruntime``)
    <repository>/<model_name>/1/model.pt        (TorchScript, backend ``python``, with ``1/model.py``)
    <repository>/<model_name>/1/model.onnx      (ONNX, backend ``python``, with ``1/model.py``)

:func:`triton_config` turns a version's :class:`~margin.common.tensors.Signature` into ``config.pbtxt``
(protobuf text format of Triton's ``ModelConfig``); :func:`export_version` writes the whole folder
atomically. Which formats can be exported, and how, is the table :data:`BACKENDS` (one
:class:`TritonFormat` row per format and backend) with :data:`TRITON_FORMATS` naming each format's default
backend: adding a backend is one new row.

TorchScript has two backends: ``pytorch_libtorch`` (the default; what the official Triton image serves on
GPU) and ``python`` (``TritonOptions(backend="python")``): Triton's python backend running the generic
``model.py`` of :mod:`margin.inference.triton_python_model`, which loads ``model.pt`` with ``torch.jit.load``
and runs each dynamically batched group of requests as one forward pass. The python backend is what the
``tritonserver`` of the ``nvidia-pytriton`` wheel can run on a machine without the libtorch backend.
ONNX likewise has two: ``onnxruntime`` (the default, Triton's ``onnxruntime_onnx`` platform, what a cluster's
official Triton image serves) and ``python``, the same ``model.py`` running ``model.onnx`` with onnxruntime.

Rules the config follows (from Triton's model configuration documentation):

* ``max_batch_size > 0`` means Triton batches: every tensor's first dimension is the batch dimension and
  is left out of ``dims``. The signature must then be batched (every first dimension ``-1``). A tensor
  whose only dimension is the batch one is written as ``dims: [ 1 ]`` with ``reshape { shape: [ ] }``,
  as Triton requires. ``max_batch_size == 0`` writes the full shapes and no dynamic batching.
* ``pytorch_libtorch``: TorchScript outputs are positional, so Triton requires every output to be named
  ``<name>__<index>`` (e.g. ``logits__0``), the index being the position in the model's returned tuple.
  Inputs may keep the argument names of ``forward()``. Signatures that break this rule are refused
  with :class:`InvalidArgument` rather than renamed, so that clients keep the names they registered.
* ``python``: inputs are passed to ``forward()`` positionally in signature order, and outputs are taken
  positionally from the returned tuple (or by name from a returned dict), so any names are allowed.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from google.protobuf.text_encoding import CEscape

from margin.common.errors import FailedPrecondition, InvalidArgument
from margin.common.names import validate_name
from margin.common.tensors import Signature, TensorSpec

# Margin dtype name -> Triton ModelConfig DataType.
TRITON_DTYPES: dict[str, str] = {
    "FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "BF16": "TYPE_BF16", "FP64": "TYPE_FP64",
    "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL", "BYTES": "TYPE_STRING",
}

INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
CONFIG_FILE = "config.pbtxt"
VERSION_DIR = "1"

_INDEXED_NAME = re.compile(r"^.+__(\d+)$")


@dataclass(frozen=True)
class TritonFormat:
    """How one Margin artifact format is served by Triton.

    ``platform`` is written to the config when set, else ``backend`` is (Triton accepts either; the
    python backend, for one, has only a backend name). ``indexed_outputs`` marks backends whose outputs
    must be named ``<name>__<index>``. ``support_files`` are written next to the artifact in the version
    folder: ``(file name there, source file)`` pairs, the source relative to the ``margin`` package.
    """

    format: str
    backend: str
    platform: str | None
    filename: str
    indexed_outputs: bool = False
    support_files: tuple[tuple[str, str], ...] = ()


# The generic python-backend model, shipped as a data file of margin.inference (never imported here).
PYTHON_MODEL_SOURCE = "inference/triton_python_model.py"
_MARGIN_PACKAGE = Path(__file__).resolve().parent.parent

_PYTHON_MODEL = (("model.py", PYTHON_MODEL_SOURCE),)

# (format, backend) -> how that backend serves that format. A backend's platform and output naming are the same
# for every format it serves (the python backend's model.py picks the runtime by the artifact's file name).
BACKENDS: dict[tuple[str, str], TritonFormat] = {(f.format, f.backend): f for f in (
    TritonFormat("torchscript", "pytorch_libtorch", "pytorch_libtorch", "model.pt", indexed_outputs=True),
    TritonFormat("torchscript", "python", None, "model.pt", support_files=_PYTHON_MODEL),
    TritonFormat("onnx", "onnxruntime", "onnxruntime_onnx", "model.onnx"),
    TritonFormat("onnx", "python", None, "model.onnx", support_files=_PYTHON_MODEL),
)}
BACKEND_NAMES: tuple[str, ...] = tuple(sorted({backend for _, backend in BACKENDS}))

# Format -> its default backend's row (what export_version uses when given no options).
TRITON_FORMATS: dict[str, TritonFormat] = {
    "torchscript": BACKENDS["torchscript", "pytorch_libtorch"],
    "onnx": BACKENDS["onnx", "onnxruntime"],
}


def backends_for(fmt: str) -> list[str]:
    """The backends that can serve format ``fmt``, default first."""
    default = TRITON_FORMATS.get(fmt)
    names = [default.backend] if default else []
    return names + sorted(b for f, b in BACKENDS if f == fmt and b not in names)


def _backend_row(backend: str) -> TritonFormat:
    """A row of ``backend`` (any format's: what the config needs of it is the same for each)."""
    for (_, name), row in BACKENDS.items():
        if name == backend:
            return row
    raise InvalidArgument(f"backend {backend!r} is not supported; one of {list(BACKEND_NAMES)}")


def support_file_source(relative: str) -> Path:
    """Where a :attr:`TritonFormat.support_files` source lives in the installed ``margin`` package."""
    return _MARGIN_PACKAGE / relative


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TritonOptions:
    """Serving options written into ``config.pbtxt``.

    ``max_batch_size`` 0 turns batching off (full shapes, no dynamic batching). ``backend`` must match the
    version's format (see :data:`BACKENDS`); :func:`export_version` picks the format's default when no
    options are given.
    """

    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"  # or KIND_GPU
    backend: str = "pytorch_libtorch"

    def __post_init__(self) -> None:
        if not _is_int(self.max_batch_size) or self.max_batch_size < 0:
            raise InvalidArgument(f"max_batch_size must be a non-negative integer (0 = no batching), "
                                  f"got {self.max_batch_size!r}")
        sizes = tuple(self.preferred_batch_sizes)
        object.__setattr__(self, "preferred_batch_sizes", sizes)
        if sizes and self.max_batch_size == 0:
            raise InvalidArgument("preferred_batch_sizes need batching: set max_batch_size > 0 "
                                  f"(got preferred sizes {list(sizes)} with max_batch_size 0)")
        for size in sizes:
            if not _is_int(size) or not 1 <= size <= self.max_batch_size:
                raise InvalidArgument(f"preferred batch size {size!r} must be an integer between 1 and "
                                      f"max_batch_size ({self.max_batch_size})")
        if len(set(sizes)) != len(sizes):
            raise InvalidArgument(f"preferred_batch_sizes has duplicates: {list(sizes)}")
        if not _is_int(self.max_queue_delay_microseconds) or self.max_queue_delay_microseconds < 0:
            raise InvalidArgument(f"max_queue_delay_microseconds must be an integer >= 0, "
                                  f"got {self.max_queue_delay_microseconds!r}")
        if not _is_int(self.instance_count) or self.instance_count < 1:
            raise InvalidArgument(f"instance_count must be an integer >= 1, got {self.instance_count!r}")
        if self.instance_kind not in INSTANCE_KINDS:
            raise InvalidArgument(f"instance_kind {self.instance_kind!r} is not supported; "
                                  f"one of {list(INSTANCE_KINDS)}")
        _backend_row(self.backend)  # raises InvalidArgument for an unknown backend


# ---------------------------------------------------------------------------------------------------------
# config.pbtxt


def _quote(text: str) -> str:
    return '"' + CEscape(text, as_utf8=True) + '"'


def _int_list(values: Iterable[int]) -> str:
    items = ", ".join(str(v) for v in values)
    return f"[ {items} ]" if items else "[ ]"


def _check_output_names(outputs: tuple[TensorSpec, ...], backend: str) -> None:
    seen: dict[int, str] = {}
    for spec in outputs:
        match = _INDEXED_NAME.match(spec.name)
        if not match:
            raise InvalidArgument(
                f"output {spec.name!r}: the {backend} backend needs outputs named '<name>__<index>', the "
                "index being the output's position in the tuple forward() returns (e.g. 'logits__0'); "
                "register the version with outputs named that way")
        index = int(match.group(1))
        if index in seen:
            raise InvalidArgument(f"outputs {seen[index]!r} and {spec.name!r} both claim index {index}; "
                                  "each '<name>__<index>' output needs its own index")
        seen[index] = spec.name


def _tensor_block(spec: TensorSpec, batching: bool) -> list[str]:
    dims = spec.shape[1:] if batching else spec.shape
    lines = [
        "  {",
        f"    name: {_quote(spec.name)}",
        f"    data_type: {TRITON_DTYPES[spec.dtype]}",
    ]
    if dims:
        lines.append(f"    dims: {_int_list(dims)}")
    else:  # only the batch dimension: Triton wants dims [1] reshaped to a scalar per batch item
        lines.append("    dims: [ 1 ]")
        lines.append("    reshape { shape: [ ] }")
    lines.append("  }")
    return lines


def _tensor_list(key: str, specs: tuple[TensorSpec, ...], batching: bool) -> list[str]:
    lines = [f"{key} ["]
    for i, spec in enumerate(specs):
        block = _tensor_block(spec, batching)
        if i < len(specs) - 1:
            block[-1] += ","
        lines.extend(block)
    lines.append("]")
    return lines


def triton_config(model_name: str, signature: Signature, options: TritonOptions) -> str:
    """The ``config.pbtxt`` text serving a model with ``signature`` under ``model_name``.

    Raises :class:`InvalidArgument` for a bad model name, a signature without inputs or outputs, an
    unbatched signature with ``max_batch_size > 0``, or (``pytorch_libtorch``) outputs not named
    ``<name>__<index>``.
    """
    validate_name(model_name, "Triton model name")
    entry = _backend_row(options.backend)  # TritonOptions validates it; kept for options built around it
    if not signature.inputs or not signature.outputs:
        raise InvalidArgument(
            f"model {model_name!r}: Triton needs a signature with at least one input and one output, got "
            f"{len(signature.inputs)} input(s) and {len(signature.outputs)} output(s); register the "
            "version with a signature")
    batching = options.max_batch_size > 0
    if batching and not signature.batched:
        unbatched = [s.describe() for s in (*signature.inputs, *signature.outputs) if s.shape[0] != -1]
        raise InvalidArgument(
            f"model {model_name!r}: max_batch_size {options.max_batch_size} makes Triton batch every tensor "
            f"along its first dimension, but these tensors' first dimension is not -1: {unbatched}; "
            "use max_batch_size 0 to serve the full shapes, or register a batched signature")
    if entry.indexed_outputs:
        _check_output_names(signature.outputs, entry.backend)

    lines = [f"name: {_quote(model_name)}"]
    if entry.platform:
        lines.append(f"platform: {_quote(entry.platform)}")
    else:
        lines.append(f"backend: {_quote(entry.backend)}")
    lines.append(f"max_batch_size: {options.max_batch_size}")
    lines.extend(_tensor_list("input", signature.inputs, batching))
    lines.extend(_tensor_list("output", signature.outputs, batching))
    if batching:
        lines.append("dynamic_batching {")
        if options.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_int_list(options.preferred_batch_sizes)}")
        lines.append(f"  max_queue_delay_microseconds: {options.max_queue_delay_microseconds}")
        lines.append("}")
    lines.extend([
        "instance_group [",
        "  {",
        f"    count: {options.instance_count}",
        f"    kind: {options.instance_kind}",
        "  }",
        "]",
    ])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The model folder


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem (EXDEV), or links not allowed there
        shutil.copyfile(src, dst)


class ExportableVersion(Protocol):
    """What the export needs of a registry version (:class:`margin.sdk.registry_source.VersionInfo` has it)."""
    model: str
    number: int
    format: str
    signature: Signature
    size_bytes: int


def export_version(version: ExportableVersion, artifact_path: Path, repository: Path, model_name: str,
                   options: TritonOptions | None = None) -> Path:
    """Write ``<repository>/<model_name>/`` (config, ``1/<model file>`` and the backend's support files,
    e.g. ``1/model.py`` for the python backend) for ``version``; return it.

    ``artifact_path`` is the version's stored file; it is hard-linked into the folder when on the same
    filesystem, else copied. The folder is built in a temporary folder inside ``repository`` and renamed
    into place, replacing (and then deleting) any folder of that name, so Triton never sees a half-written
    model. With ``options`` None, the backend follows the version's format and the other options are the
    defaults.

    Raises :class:`FailedPrecondition` for a format Triton cannot serve or a missing artifact, and
    :class:`InvalidArgument` for a bad name, signature, or options whose backend does not fit the format.
    """
    validate_name(model_name, "Triton model name")
    entry = TRITON_FORMATS.get(version.format)
    if entry is None:
        servable = list(TRITON_FORMATS)
        raise FailedPrecondition(
            f"{version.model} v{version.number} is in format {version.format!r}, which Triton cannot serve; "
            f"servable formats: {servable}")
    if options is None:
        options = TritonOptions(backend=entry.backend)
    elif (version.format, options.backend) not in BACKENDS:
        choices = " or ".join(repr(b) for b in backends_for(version.format))
        raise InvalidArgument(f"backend {options.backend!r} cannot serve format {version.format!r}; "
                              f"use backend {choices}")
    entry = BACKENDS[version.format, options.backend]
    config = triton_config(model_name, version.signature, options)
    support = [(name, support_file_source(source)) for name, source in entry.support_files]
    for name, source in support:
        if not source.is_file():
            raise FailedPrecondition(f"backend {entry.backend!r} needs {str(source)!r} (written as {name}), "
                                     "which is missing from this installation of margin")

    artifact_path = Path(artifact_path)
    if not artifact_path.is_file():
        raise FailedPrecondition(f"{version.model} v{version.number}: artifact file {str(artifact_path)!r} "
                                 "does not exist")
    if version.size_bytes and artifact_path.stat().st_size != version.size_bytes:
        raise FailedPrecondition(
            f"{version.model} v{version.number}: artifact {str(artifact_path)!r} has "
            f"{artifact_path.stat().st_size} bytes, the version records {version.size_bytes}")

    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / model_name
    staging = Path(tempfile.mkdtemp(prefix=f".{model_name}.export-", dir=repository))
    try:
        (staging / VERSION_DIR).mkdir()
        _link_or_copy(artifact_path, staging / VERSION_DIR / entry.filename)
        for name, source in support:  # copied, not linked: the served copy must not change under Triton
            shutil.copyfile(source, staging / VERSION_DIR / name)
        (staging / CONFIG_FILE).write_text(config, encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the server may run as another user
        old: Path | None = None
        if target.exists() or target.is_symlink():
            old = repository / f".{model_name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(target, old)
        try:
            os.rename(staging, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return target
