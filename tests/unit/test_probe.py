"""The deploy probe's request and its comparison of the model's outputs with the declared signature."""
from __future__ import annotations

from margin.common.tensors import Signature, TensorSpec
from margin.inference.probe import mismatches, zero_inputs
from margin.inference.triton_client import RawTensor

SIGNATURE = Signature((TensorSpec("ids", "INT64", (-1, -1)), TensorSpec("x", "FP32", (-1, 4))),
                      (TensorSpec("logits", "FP32", (-1, 10)), TensorSpec("score", "FP64", (-1,))))


def out(name: str, datatype: str, *shape: int) -> RawTensor:
    return RawTensor(name, datatype, shape, b"")


def test_the_probe_sends_zeros_of_batch_1_shaped_as_the_declared_inputs():
    inputs = zero_inputs(SIGNATURE)
    assert [(t.name, t.datatype, t.shape) for t in inputs] == [("ids", "INT64", (1, 1)), ("x", "FP32", (1, 4))]
    assert [t.raw for t in inputs] == [bytes(8), bytes(16)]
    fixed = zero_inputs(Signature((TensorSpec("img", "UINT8", (3, 2, 2)),), (TensorSpec("y", "FP32", (1,)),)))
    assert fixed[0].shape == (3, 2, 2) and fixed[0].raw == bytes(12)


def test_outputs_that_agree_with_the_signature_pass_with_minus_one_as_a_wildcard():
    assert mismatches(SIGNATURE, [out("logits", "FP32", 1, 10), out("score", "FP64", 1)]) == []
    assert mismatches(SIGNATURE, [out("score", "FP64", 1), out("logits", "FP32", 1, 10),
                                  out("extra", "FP32", 1)]) == []  # order and undeclared extras do not matter


def test_each_disagreement_names_the_declared_and_the_actual_output():
    problems = mismatches(SIGNATURE, [out("logits", "FP32", 1, 3), out("score", "FP32", 1)])
    assert problems == ["declared output logits: FP32[-1, 10], the model returned logits: FP32[1, 3]",
                        "declared output score: FP64[-1], the model returned score: FP32[1]"]
    rank = mismatches(SIGNATURE, [out("logits", "FP32", 1, 10, 1), out("score", "FP64", 1)])
    assert rank == ["declared output logits: FP32[-1, 10], the model returned logits: FP32[1, 10, 1]"]
    missing = mismatches(SIGNATURE, [out("logits", "FP32", 1, 10)])
    assert missing == ["declared output score: FP64[-1], the model returned no output of that name "
                       "(it returned [logits: FP32[1, 10]])"]
