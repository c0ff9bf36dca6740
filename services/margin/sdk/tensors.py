"""numpy arrays <-> margin.v1 Tensor messages (raw little-endian bytes, no pickling)."""
from __future__ import annotations

import numpy as np

from margin.common import protoconv
from margin.common.errors import InvalidArgument
from margin.common.tensors import DTYPES, Signature
from margin.v1 import common_pb2

_TO_DTYPE = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.float64): "FP64",
             np.dtype(np.int8): "INT8", np.dtype(np.int16): "INT16", np.dtype(np.int32): "INT32",
             np.dtype(np.int64): "INT64", np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL"}
_FROM_DTYPE = {name: dtype for dtype, name in _TO_DTYPE.items()}
_NUMPY_NAMES = {numpy_name: name for name, numpy_name in DTYPES.items()}  # "float32" -> "FP32"


def margin_dtype(spelling: str) -> str:
    """The Margin (and Triton) name of a dtype written either that way (``FP32``, ``INT64``) or as numpy names it
    (``float32``, ``int64``, ``bool``), in any case: people who export their own models know numpy's names."""
    text = str(spelling)
    if text.upper() in DTYPES:
        return text.upper()
    if text.lower() in _NUMPY_NAMES:
        return _NUMPY_NAMES[text.lower()]
    raise InvalidArgument(f"unknown dtype {spelling!r}: use a Margin/Triton name ({', '.join(DTYPES)}) or a numpy "
                          f"one ({', '.join(_NUMPY_NAMES)})")


def signature_from_dict(data: dict | None) -> Signature:
    """A signature from JSON such as ``{"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}`` whose dtypes
    may use numpy's names (see :func:`margin_dtype`)."""
    def spec(tensor: dict) -> dict:
        return {**tensor, "dtype": margin_dtype(tensor["dtype"])} if "dtype" in tensor else tensor
    data = data or {}
    return Signature.from_dict({group: [spec(t) for t in data.get(group, [])] for group in ("inputs", "outputs")})


def to_tensor(name: str, array: np.ndarray) -> common_pb2.Tensor:
    array = np.ascontiguousarray(array)
    if array.dtype not in _TO_DTYPE:
        raise ValueError(f"{name}: dtype {array.dtype} is not supported; use one of {sorted(map(str, _TO_DTYPE))}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return common_pb2.Tensor(name=name, dtype=protoconv.dtype_value(_TO_DTYPE[array.dtype]),
                             shape=array.shape, raw=little.tobytes())


def from_tensor(tensor: common_pb2.Tensor) -> np.ndarray:
    name = protoconv.dtype_name(tensor.dtype)
    if name not in _FROM_DTYPE:
        raise ValueError(f"{tensor.name}: dtype {name} has no numpy equivalent here")
    return np.frombuffer(tensor.raw, dtype=_FROM_DTYPE[name].newbyteorder("<")).reshape(tuple(tensor.shape))
