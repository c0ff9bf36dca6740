"""The SDK's dtype spellings: a signature may name dtypes as Margin/Triton does (``INT64``) or as numpy does
(``int64``); both become the same Margin name, and anything else is refused naming both spellings."""
from __future__ import annotations

import numpy as np
import pytest
from margin.common.errors import InvalidArgument
from margin.common.tensors import DTYPES, Signature
from margin.sdk.tensors import margin_dtype, signature_from_dict


@pytest.mark.parametrize(("spelling", "expected"), [
    ("int64", "INT64"), ("float32", "FP32"), ("float16", "FP16"), ("float64", "FP64"), ("bool", "BOOL"),
    ("uint8", "UINT8"), ("int8", "INT8"), ("int32", "INT32"), ("bfloat16", "BF16"),
    ("INT64", "INT64"), ("FP32", "FP32"), ("fp16", "FP16"), ("Float32", "FP32"), ("BYTES", "BYTES"),
])
def test_numpy_and_margin_spellings_give_the_margin_name(spelling: str, expected: str) -> None:
    assert margin_dtype(spelling) == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int8, np.int16, np.int32, np.int64,
                                   np.uint8, np.bool_])
def test_the_name_numpy_prints_is_accepted(dtype: type) -> None:
    """What ``str(array.dtype)`` prints for an array a user holds names a Margin dtype of the same numpy type."""
    name = margin_dtype(str(np.dtype(dtype)))
    assert np.dtype(DTYPES[name]) == np.dtype(dtype)


@pytest.mark.parametrize("spelling", ["float", "int", "f4", "FP99", "", "string"])
def test_other_spellings_are_refused_naming_both_ways(spelling: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        margin_dtype(spelling)
    message = str(err.value)
    assert repr(spelling) in message and "INT64" in message and "int64" in message, message


def test_signature_from_dict_translates_inputs_and_outputs() -> None:
    numpy_spelled = {"inputs": [{"name": "token_ids", "dtype": "int64", "shape": [-1, 32]},
                                {"name": "mask", "dtype": "bool", "shape": [-1, 32]}],
                     "outputs": [{"name": "logits__0", "dtype": "float32", "shape": [-1, 2]}]}
    margin_spelled = {"inputs": [{"name": "token_ids", "dtype": "INT64", "shape": [-1, 32]},
                                 {"name": "mask", "dtype": "BOOL", "shape": [-1, 32]}],
                      "outputs": [{"name": "logits__0", "dtype": "FP32", "shape": [-1, 2]}]}
    assert signature_from_dict(numpy_spelled) == Signature.from_dict(margin_spelled)
    assert signature_from_dict(None) == Signature()


def test_signature_from_dict_refuses_an_unknown_dtype() -> None:
    with pytest.raises(InvalidArgument, match="'float'"):
        signature_from_dict({"inputs": [{"name": "x", "dtype": "float", "shape": [-1, 4]}]})
