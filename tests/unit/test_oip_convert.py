"""Open Inference Protocol requests read into Margin's terms (margin.inference.oip): naming, routing parameters,
raw and typed tensor contents."""
from __future__ import annotations

import numpy as np
import pytest
from margin.common.errors import InvalidArgument, Unimplemented
from margin.inference import oip
from margin.inference.gateway import DEFAULT_ALIAS, Target
from margin.inference.routing import Policy
from tritonclient.grpc import service_pb2

Input = service_pb2.ModelInferRequest.InferInputTensor


def params(**values) -> dict:
    request = service_pb2.ModelInferRequest()
    for name, value in values.items():
        field = {str: "string_param", float: "double_param", int: "int64_param", bool: "bool_param"}[type(value)]
        setattr(request.parameters[name], field, value)
    return request.parameters


@pytest.mark.parametrize(("version", "want"), [
    ("", Target("m", default_alias=DEFAULT_ALIAS)), ("3", Target("m", number=3)),
    ("canary", Target("m", alias="canary")),
])
def test_model_version_is_empty_a_number_or_an_alias(version, want):
    assert oip.target("m", version) == want


@pytest.mark.parametrize("version", ["0", "2147483648", "99999999999999999999"])
def test_a_version_number_out_of_range_is_invalid(version):
    with pytest.raises(InvalidArgument, match="version number"):
        oip.target("m", version)


def test_a_routing_policy_travels_in_parameters():
    got = oip.target("m", "", params(min_accuracy=0.9, max_latency_ms=5, priority=1))
    assert got == Target("m", policy=Policy("accuracy", 0.9, 5.0), default_alias=DEFAULT_ALIAS)


@pytest.mark.parametrize(("parameters", "message"), [
    (params(max_latency=5.0), "unknown request parameter"),
    (params(min_accuracy="high"), "must be a number"),
    (params(min_accuracy=float("nan")), "finite"),
    (params(min_accuracy=0.9, min_f1=0.5), "one quality floor"),
    (params(sequence_id=4), "sequence batching"),
    (params(max_latency_ms=-1.0), "max_latency_ms"),
])
def test_a_bad_policy_is_invalid_argument(parameters, message):
    with pytest.raises(InvalidArgument, match=message):
        oip.target("m", "", parameters)


def test_a_policy_with_a_version_is_refused_rather_than_ignored():
    with pytest.raises(InvalidArgument, match="leave model_version empty"):
        oip.target("m", "2", params(min_accuracy=0.9))


def test_model_name_is_required():
    with pytest.raises(InvalidArgument, match="model_name"):
        oip.target("", "")


def test_typed_contents_become_the_same_raw_bytes():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([[1, -2]], dtype=np.int64)
    request = service_pb2.ModelInferRequest(inputs=[
        Input(name="x", datatype="FP32", shape=[2, 3], contents=service_pb2.InferTensorContents(
            fp32_contents=x.ravel().tolist())),
        Input(name="ids", datatype="INT64", shape=[1, 2], contents=service_pb2.InferTensorContents(
            int64_contents=ids.ravel().tolist())),
        Input(name="s", datatype="BYTES", shape=[2], contents=service_pb2.InferTensorContents(
            bytes_contents=[b"ab", b""]))])
    got = oip.inputs(request)
    assert [t.raw for t in got] == [x.tobytes(), ids.tobytes(), b"\x02\x00\x00\x00ab\x00\x00\x00\x00"]
    assert got[0].shape == (2, 3)


@pytest.mark.parametrize(("tensor", "message"), [
    (Input(name="x", datatype="FP32", shape=[2], contents=service_pb2.InferTensorContents(fp32_contents=[1.0])),
     "1 values"),
    (Input(name="x", datatype="INT8", shape=[1], contents=service_pb2.InferTensorContents(int_contents=[300])),
     "outside the range"),
    (Input(name="x", datatype="FP16", shape=[1]), "raw_input_contents"),
])
def test_bad_typed_contents_are_invalid_argument(tensor, message):
    with pytest.raises(InvalidArgument, match=message):
        oip.inputs(service_pb2.ModelInferRequest(inputs=[tensor]))


def test_raw_contents_must_match_the_inputs_one_to_one():
    request = service_pb2.ModelInferRequest(inputs=[Input(name="a", datatype="FP32", shape=[1]),
                                                    Input(name="b", datatype="FP32", shape=[1])],
                                            raw_input_contents=[bytes(4)])
    with pytest.raises(InvalidArgument, match="1 raw_input_contents for 2 inputs"):
        oip.inputs(request)


def test_shared_memory_is_not_offered():
    tensor = Input(name="x", datatype="FP32", shape=[1])
    tensor.parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(Unimplemented, match="raw_input_contents"):
        oip.inputs(service_pb2.ModelInferRequest(inputs=[tensor]))
