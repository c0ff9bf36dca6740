"""Is an upload an ONNX model, and does its graph take and return what the version's signature declares?

ONNX is a bare protobuf (``onnx.ModelProto``) with no magic number, so the file is given to ``onnx.checker``,
which parses it and checks the model's structure; nothing in the model runs. A model whose tensors keep their data
in external files is refused: a version is one file, and a served model must not name files beside it (or
elsewhere) on the server. The checker reads the file through a link in an empty folder of its own, so that every
external data reference (resolved relative to the model's folder) names a file that does not exist.

When the upload declares a signature, the graph's inputs and outputs must agree with it: the same names and
dtypes, the same ranks, and no fixed dimension that differs (``-1`` and a graph's symbolic dimension match
anything); every input the graph needs must be declared. When it declares none, the signature is the graph's:
its inputs (less those with an initializer) and outputs, a symbolic or unknown dimension becoming ``-1``. They are
read by walking the protobuf over a memory map (:mod:`margin.registry.protowire`), so the weights are not loaded a
second time.
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx.checker
from google.protobuf.message import DecodeError

from margin.common.errors import InvalidArgument
from margin.common.tensors import Signature, TensorSpec
from margin.registry import protowire

MAX_ONNX_BYTES = onnx.checker.MAXIMUM_PROTOBUF  # a single-file ONNX model is one protobuf: at most 2 GiB

_T = onnx.TensorProto
# ONNX tensor element type -> Margin dtype name
ONNX_DTYPES: dict[int, str] = {
    _T.FLOAT: "FP32", _T.FLOAT16: "FP16", _T.BFLOAT16: "BF16", _T.DOUBLE: "FP64", _T.INT8: "INT8",
    _T.INT16: "INT16", _T.INT32: "INT32", _T.INT64: "INT64", _T.UINT8: "UINT8", _T.BOOL: "BOOL", _T.STRING: "BYTES",
}
_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH = {name: onnx.GraphProto.DESCRIPTOR.fields_by_name[name].number
          for name in ("input", "output", "initializer", "sparse_initializer")}
_TENSOR_NAME = onnx.TensorProto.DESCRIPTOR.fields_by_name["name"].number
_SPARSE_VALUES = onnx.SparseTensorProto.DESCRIPTOR.fields_by_name["values"].number


def check_onnx(path: Path, signature: Signature) -> Signature:
    """Raise :class:`InvalidArgument` unless the file at ``path`` is a valid, self-contained ONNX model whose graph
    agrees with ``signature`` (when one is declared). Returns the version's signature: the declared one, or when
    none is declared the graph's own (:func:`_derive_signature`), so that an ONNX upload can be deployed as is."""
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise InvalidArgument(f"the upload is not a single-file ONNX model: {size} bytes is over protobuf's 2 GiB "
                              "limit (models that large keep their weights in external data files, which the "
                              "registry does not accept)")
    _check_model(path)
    graph = _graph_io(path)
    if signature.empty:
        return _derive_signature(graph)
    _check_signature(graph, signature)
    return signature


def _check_model(path: Path) -> None:
    alone = Path(tempfile.mkdtemp(prefix=".onnx-check-", dir=path.parent))
    try:
        link = alone / f"{uuid.uuid4().hex}.onnx"
        os.symlink(path.resolve(), link)
        onnx.checker.check_model(str(link))
    except onnx.checker.ValidationError as err:
        raise _checker_refusal(_first_line(err).replace(f"{alone.name}/", "")) from None
    except (ValueError, TypeError):  # the checker refused it, in a message that is not UTF-8 (nor can be shown)
        raise InvalidArgument("the upload is not a valid ONNX model: onnx.checker refused it (its names or "
                              "strings are not UTF-8)") from None
    finally:
        shutil.rmtree(alone, ignore_errors=True)


def _checker_refusal(message: str) -> InvalidArgument:
    """The refusal for onnx.checker's ``message``, saying what to do where the checker does not."""
    if "Unable to parse proto" in message:
        return InvalidArgument("the upload is not an ONNX model: it does not parse as onnx.ModelProto")
    if "Data of TensorProto" in message:
        return InvalidArgument(f"the ONNX model keeps tensor data in external files, which the registry does not "
                               f"accept ({message}); upload a self-contained model (onnx.save_model(model, path, "
                               "save_as_external_data=False))")
    if "Field 'shape' of 'type' is required" in message:
        return InvalidArgument(f"the upload is not a valid ONNX model: {message} (a graph input or output has no "
                               "shape, so not even its rank is known; export the model with the shapes of its inputs "
                               "and outputs, a symbolic name for each dimension that varies)")
    return InvalidArgument(f"the upload is not a valid ONNX model: {message}")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:500]


# -- the graph against the declared signature ------------------------------------------------------------------

def _dtype_name(elem_type: int) -> str:
    """Margin's name for an ONNX element type, else ONNX's own (e.g. ``UINT32``)."""
    if elem_type in ONNX_DTYPES:
        return ONNX_DTYPES[elem_type]
    return _T.DataType.Name(elem_type) if elem_type in _T.DataType.values() else f"element type {elem_type}"


def _text(value: str | bytes) -> str:
    """An ONNX (proto2) string field: bytes when it is not UTF-8."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _describe(value: onnx.ValueInfoProto) -> str:
    """A graph input or output the way Margin describes a tensor, e.g. ``x: FP32[batch, 64]``."""
    name, kind = _text(value.name), value.type.WhichOneof("value")
    if kind != "tensor_type":
        return f"{name}: {kind or 'untyped'} (not a tensor)"
    tensor = value.type.tensor_type
    dtype = _dtype_name(tensor.elem_type)
    if not tensor.HasField("shape"):
        return f"{name}: {dtype}[unknown shape]"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (_text(d.dim_param) or "?") for d in tensor.shape.dim]
    return f"{name}: {dtype}[{', '.join(dims)}]"


def _agrees(spec: TensorSpec, value: onnx.ValueInfoProto) -> bool:
    if value.type.WhichOneof("value") != "tensor_type":
        return False
    tensor = value.type.tensor_type
    if ONNX_DTYPES.get(tensor.elem_type) != spec.dtype:
        return False
    if not tensor.HasField("shape"):  # the graph leaves the shape open
        return True
    dims = tensor.shape.dim
    return len(dims) == len(spec.shape) and all(
        want == -1 or not d.HasField("dim_value") or d.dim_value == want for d, want in zip(dims, spec.shape,
                                                                                              strict=True))


@dataclass
class GraphIO:
    """What a graph takes and returns, and which of its inputs have initializers (defaults: optional inputs)."""
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    initialized: set[str] = field(default_factory=set)


def _tensor_name(buf: memoryview, tensor: protowire.Field) -> str:
    """A TensorProto's name: its first name field (writers put it before the data; a tensor has one name)."""
    name = next(protowire.submessages(buf, _TENSOR_NAME, tensor.start, tensor.end), None)
    return bytes(buf[name.start:name.end]).decode("utf-8", "replace") if name else ""


def _graph_io(path: Path) -> GraphIO:
    """The main graph's inputs, outputs and initializer names, read over a memory map (the checker has parsed the
    file already, so it is well-formed). Occurrences of a message field merge, as protobuf does."""
    io = GraphIO()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buf = memoryview(mapped)
        try:
            for graph in protowire.submessages(buf, _MODEL_GRAPH):
                for item in protowire.fields(buf, graph.start, graph.end):
                    if item.wire_type != protowire.LEN:
                        continue
                    if item.number in (_GRAPH["input"], _GRAPH["output"]):
                        value = onnx.ValueInfoProto.FromString(bytes(buf[item.start:item.end]))
                        (io.inputs if item.number == _GRAPH["input"] else io.outputs).append(value)
                    elif item.number == _GRAPH["initializer"]:
                        io.initialized.add(_tensor_name(buf, item))
                    elif item.number == _GRAPH["sparse_initializer"]:
                        for values in protowire.submessages(buf, _SPARSE_VALUES, item.start, item.end):
                            io.initialized.add(_tensor_name(buf, values))
        except (protowire.WireError, DecodeError) as err:
            raise InvalidArgument(f"the upload is not a valid ONNX model: {err}") from None
        finally:
            buf.release()
    return io


def _check_signature(graph: GraphIO, signature: Signature) -> None:
    problems: list[str] = []
    for group, declared, actual in (("input", signature.inputs, graph.inputs), ("output", signature.outputs,
                                                                                graph.outputs)):
        by_name = {v.name: v for v in actual}
        for spec in declared:
            value = by_name.get(spec.name)
            if value is None:
                problems.append(f"declared {group} {spec.describe()} is not among the graph's {group}s "
                                f"[{', '.join(_describe(v) for v in actual)}]")
            elif not _agrees(spec, value):
                problems.append(f"declared {group} {spec.describe()}, the graph has {_describe(value)}")
    if signature.inputs:
        declared_inputs = {s.name for s in signature.inputs}
        for value in graph.inputs:
            if value.name not in declared_inputs and value.name not in graph.initialized:
                problems.append(f"the graph's input {_describe(value)} is not in the declared signature")
    if problems:
        raise InvalidArgument("the ONNX graph does not match the declared signature: " + "; ".join(problems)
                              + f" (declared: {signature.describe()})")


# -- the graph's own signature, when none is declared -----------------------------------------------------------

def _unrepresentable(value: onnx.ValueInfoProto) -> str | None:
    """Why a graph input or output cannot be written as a Margin :class:`TensorSpec`, or None when it can."""
    if not isinstance(value.name, str):
        return f"{_describe(value)}: its name is not UTF-8"
    if value.type.WhichOneof("value") != "tensor_type":
        return _describe(value)
    tensor = value.type.tensor_type
    if tensor.elem_type not in ONNX_DTYPES:
        return f"{_describe(value)}: Margin has no dtype for {_dtype_name(tensor.elem_type)}"
    if not tensor.HasField("shape"):  # onnx.checker refuses this in a main graph, so it is only a guard here
        return f"{_describe(value)}: its rank is unknown"
    if not tensor.shape.dim:
        return f"{_describe(value)}: a scalar (a signature's tensors have at least one dimension)"
    return None


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """A representable graph tensor as a :class:`TensorSpec`: fixed dimensions kept, symbolic or unknown ones
    (a symbolic first one is the batch dimension) ``-1``."""
    tensor = value.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(value.name, ONNX_DTYPES[tensor.elem_type], shape)


def _derive_signature(graph: GraphIO) -> Signature:
    """The signature the graph itself declares: its inputs that are not initializers, and its outputs. Refused,
    naming every tensor it cannot describe, when a dtype or rank is not one Margin can write down."""
    inputs = [v for v in graph.inputs if v.name not in graph.initialized]
    problems = [p for p in map(_unrepresentable, (*inputs, *graph.outputs)) if p]
    if problems:
        raise InvalidArgument("no signature was declared, and the ONNX graph's cannot be written as one: "
                              + "; ".join(problems) + "; declare the signature with the upload (--signature sig.json, "
                              "Margin dtype names such as FP32 or INT64, -1 for the batch dimension)")
    return Signature(tuple(map(_spec, inputs)), tuple(map(_spec, graph.outputs)))
