"""A ``dataset-npz`` upload's manifest: the names, dtypes and shapes of its arrays, read from their ``.npy`` headers.

An .npz is a zip of ``<name>.npy`` members. Only each member's header is read (with numpy's own
``read_magic`` / ``read_array_header_*`` on the zip member's stream): no array data is loaded and nothing is
unpickled — an object array is refused from its header's dtype alone. The header's length is read and bounded
(:data:`MAX_HEADER_BYTES`) before numpy reads the header, so a forged length cannot make it allocate gigabytes.

The manifest is a :class:`~margin.common.tensors.Signature` (see :mod:`margin.common.manifest`): ``inputs`` are the
arrays other than ``y`` in file order, ``outputs`` is ``y`` when present; each shape is the array's full shape,
rows first. Arrays must share their row count, have Margin dtypes and valid names, and ``y`` must be 1-D integer.
"""
from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npy

from margin.common.errors import InvalidArgument
from margin.common.manifest import LABELS, label_problem
from margin.common.names import validate_name
from margin.common.tensors import DTYPES, Signature, TensorSpec

MAX_ARRAYS = 64
MAX_HEADER_BYTES = 64 << 10
SUFFIX = ".npy"
# .npy version -> (the header length's struct format, numpy's reader for that version)
_HEADER_READERS = {(1, 0): ("<H", npy.read_array_header_1_0), (2, 0): ("<I", npy.read_array_header_2_0)}
_UNREADABLE = (ValueError, TypeError, SyntaxError, EOFError, OSError, RuntimeError, NotImplementedError,
               zipfile.BadZipFile, zlib.error)


def _numpy_dtypes() -> dict[np.dtype, str]:
    """numpy dtype -> Margin dtype name: :data:`DTYPES` reversed, less BYTES (object arrays need unpickling) and
    the names this numpy cannot make (bfloat16 without ml_dtypes)."""
    found = {}
    for name, numpy_name in DTYPES.items():
        if name == "BYTES":
            continue
        try:
            found[np.dtype(numpy_name)] = name
        except TypeError:
            continue
    return found


NUMPY_DTYPES = _numpy_dtypes()


def read_manifest(path: Path) -> Signature:
    """The manifest of the .npz at ``path``; InvalidArgument, naming the array, when it is not a dataset Margin
    can describe (see the module docstring)."""
    if not zipfile.is_zipfile(path):
        raise InvalidArgument("the upload is not a .npz dataset (expected a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            specs = [_read_array(archive, member) for member in _members(archive)]
    except zipfile.BadZipFile as err:
        raise InvalidArgument(f"the upload is not a readable .npz dataset: {err}") from None
    _check_rows(specs)
    labels = next((s for s in specs if s.name == LABELS), None)
    if labels is not None and (problem := label_problem(labels)):
        raise InvalidArgument(f"the .npz dataset's {problem}")
    return Signature(tuple(s for s in specs if s.name != LABELS), (labels,) if labels else ())


def _members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    members = archive.infolist()
    if not members:
        raise InvalidArgument("the .npz dataset holds no arrays")
    if len(members) > MAX_ARRAYS:
        raise InvalidArgument(f"the .npz dataset holds {len(members)} files; at most {MAX_ARRAYS} arrays are "
                              "allowed")
    names = [m.filename for m in members]
    for member in members:
        if member.is_dir() or not member.filename.endswith(SUFFIX):
            raise InvalidArgument(f"the .npz dataset holds {member.filename!r}, which is not a <name>.npy array")
        if names.count(member.filename) > 1:
            raise InvalidArgument(f"the .npz dataset holds {member.filename!r} more than once")
    return members


def _read_array(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> TensorSpec:
    name = member.filename.removesuffix(SUFFIX)
    validate_name(name, "the .npz dataset's array name")
    try:
        with archive.open(member) as stream:
            shape, dtype, header_bytes = _read_header(stream, name)
    except _UNREADABLE as err:
        raise InvalidArgument(f"array {name!r}: the .npy header is unreadable ({_first_line(err)})") from None
    spec = TensorSpec(name, _dtype_name(name, dtype), _shape(name, shape))
    _check_size(spec, dtype, header_bytes, member.file_size)
    return spec


def _read_header(stream: IO[bytes], name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """The header of the .npy in ``stream`` as numpy reads it, and its size in bytes (magic included); the header's
    length is checked against :data:`MAX_HEADER_BYTES` before the header is read."""
    version = npy.read_magic(stream)
    if version not in _HEADER_READERS:
        raise InvalidArgument(f"array {name!r}: .npy format version {version[0]}.{version[1]} is not supported "
                              "(numpy.savez writes 1.0 or 2.0)")
    length_format, reader = _HEADER_READERS[version]
    length_bytes = _read_exactly(stream, struct.calcsize(length_format))
    (length,) = struct.unpack(length_format, length_bytes)
    if length > MAX_HEADER_BYTES:
        raise InvalidArgument(f"array {name!r}: its .npy header is {length} bytes; at most {MAX_HEADER_BYTES} "
                              "are allowed")
    header = io.BytesIO(length_bytes + _read_exactly(stream, length))
    shape, _, dtype = reader(header, max_header_size=MAX_HEADER_BYTES)  # the order does not change the manifest
    return shape, dtype, npy.MAGIC_LEN + len(header.getvalue())


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"the member ends {size - len(data)} bytes into what its header declares")
    return data


def _dtype_name(name: str, dtype: np.dtype) -> str:
    if dtype.hasobject:
        raise InvalidArgument(f"array {name!r} is an object array ({dtype.str}), which only loads by unpickling; "
                              "save plain numeric arrays")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidArgument(f"array {name!r} has a structured dtype ({dtype}); save one plain array per field")
    margin_name = NUMPY_DTYPES.get(dtype.newbyteorder("="))
    if margin_name is None:
        raise InvalidArgument(f"array {name!r} has dtype {dtype} ({dtype.str}), which Margin has no name for; "
                              f"use one of {sorted(str(d) for d in NUMPY_DTYPES)}")
    return margin_name


def _shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if not shape:
        raise InvalidArgument(f"array {name!r} is 0-d (a scalar); a dataset's arrays have a row per example")
    if shape[0] == 0:
        raise InvalidArgument(f"array {name!r} has zero rows")
    if any(d <= 0 for d in shape):
        raise InvalidArgument(f"array {name!r} has shape {list(shape)}: every dimension must be positive")
    return tuple(shape)


def _check_size(spec: TensorSpec, dtype: np.dtype, header_bytes: int, member_bytes: int) -> None:
    """The header's shape must describe the data the member holds (which also keeps shapes within int64)."""
    data_bytes = math.prod(spec.shape) * dtype.itemsize
    if header_bytes + data_bytes != member_bytes:
        raise InvalidArgument(f"array {spec.name!r}: its header describes {spec.dtype}{list(spec.shape)} "
                              f"({data_bytes} bytes) but the member holds {member_bytes - header_bytes} bytes "
                              "of data")


def _check_rows(specs: list[TensorSpec]) -> None:
    counts = {s.name: s.shape[0] for s in specs}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in counts.items())
        raise InvalidArgument(f"the .npz dataset's arrays must have the same number of rows: {listed}")


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]
