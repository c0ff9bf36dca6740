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
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear", [x], [y], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()
