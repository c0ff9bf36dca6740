"""numpy arrays <-> margin.v1 Tensor messages (raw little-endian bytes, no pickling)."""
from __future__ import annotations

import numpy as np

from margin.common import protoconv
from margin.v1 import common_pb2

_TO_DTYPE = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.float64): "FP64",
             np.dtype(np.int8): "INT8", np.dtype(np.int16): "INT16", np.dtype(np.int32): "INT32",
             np.dtype(np.int64): "INT64", np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL"}
_FROM_DTYPE = {name: dtype for dtype, name in _TO_DTYPE.items()}


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
