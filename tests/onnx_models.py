"""Small real ONNX models for tests, built with ``onnx.helper`` (no exporter, nothing downloaded)."""
from __future__ import annotations

import numpy as np
import onnx
from margin.common.tensors import Signature, TensorSpec
from onnx import TensorProto, helper, numpy_helper

# What linear_onnx takes and returns
LINEAR_SIGNATURE = Signature((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),))


def linear_onnx(payload: bytes = b"") -> bytes:
    """``y = x @ w`` (x: FP32[batch, 4], y: FP32[batch, 3]) as a serialized ONNX model. ``payload`` is kept in an
    extra UINT8 initializer, so a test can make a valid model of any size and content (distinct payloads make
    distinct files)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    weights = [numpy_helper.from_array(np.ones((4, 3), np.float32), "w"),
               numpy_helper.from_array(np.frombuffer(payload, np.uint8), "payload")]
    return _serialized(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear", [x], [y],
                                         weights))


def embedding_onnx() -> bytes:
    """An embedding lookup over INT64 token ids, as a text model starts: ``ids: INT64[batch, seq]`` ->
    ``vectors: FP32[batch, seq, 4]`` (``Gather`` from a 10 x 4 table)."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    vectors = helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["batch", "seq", 4])
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    return _serialized(helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["vectors"])], "embedding",
                                         [ids], [vectors], [table]))


def identity_onnx(value_type: onnx.TypeProto) -> bytes:
    """``y = x``, both of type ``value_type``, to give a graph whatever input and output type a test needs."""
    x, y = (helper.make_value_info(name, value_type) for name in ("x", "y"))
    return _serialized(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y]))


def _serialized(graph: onnx.GraphProto) -> bytes:
    """``graph`` as a checked, serialized opset-17 model."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()
