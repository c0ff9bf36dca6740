"""Checking a request's tensors against the served version's signature before Triton sees them.

Every refusal says what was expected, so a caller can fix the request from the message alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from margin.common.errors import InvalidArgument
from margin.common.tensors import DTYPES, Signature
from margin.inference.coalesce import bytes_element_bounds
from margin.inference.triton_client import RawTensor

ITEM_SIZES = {name: np.dtype(np_name).itemsize for name, np_name in DTYPES.items()
              if name not in ("BF16", "BYTES")} | {"BF16": 2}


def validate_inputs(tensors: Sequence[RawTensor], signature: Signature, max_batch_size: int) -> list[RawTensor]:
    """The tensors in the signature's order, or INVALID_ARGUMENT saying what the signature expects."""
    expected = {spec.name: spec for spec in signature.inputs}
    got = [t.name for t in tensors]
    if sorted(got) != sorted(expected) or len(set(got)) != len(got):
        raise InvalidArgument(f"inputs {got} do not match the signature; expected {signature.describe()}")
    batch = None
    for t in tensors:
        spec = expected[t.name]
        if t.datatype != spec.dtype:
            raise InvalidArgument(f"input {t.name!r} has dtype {t.datatype}, expected {spec.describe()} "
                                  f"(signature: {signature.describe()})")
        if len(t.shape) != len(spec.shape) or any(
                want != -1 and have != want for have, want in zip(t.shape, spec.shape, strict=True)):
            raise InvalidArgument(f"input {t.name!r} has shape {list(t.shape)}, expected {spec.describe()} "
                                  f"(signature: {signature.describe()})")
        if any(d <= 0 for d in t.shape):
            raise InvalidArgument(f"input {t.name!r} has an empty or negative dimension: {list(t.shape)}")
        if signature.batched:
            if batch is not None and t.shape[0] != batch:
                raise InvalidArgument(f"inputs disagree on the batch size ({batch} vs {t.shape[0]})")
            batch = t.shape[0]
        if t.datatype == "BYTES":
            _check_bytes(t)
        elif len(t.raw) != math.prod(t.shape) * ITEM_SIZES[t.datatype]:
            raise InvalidArgument(f"input {t.name!r}: {len(t.raw)} bytes do not hold a {t.datatype} tensor of "
                                  f"shape {list(t.shape)} ({math.prod(t.shape) * ITEM_SIZES[t.datatype]} bytes); "
                                  f"signature: {signature.describe()}")
    if batch is not None and max_batch_size and batch > max_batch_size:
        raise InvalidArgument(f"batch size {batch} exceeds this deployment's max_batch_size {max_batch_size}; "
                              "split the request")
    if [t.name for t in tensors] == signature.input_names:
        return list(tensors)
    by_name = {t.name: t for t in tensors}
    return [by_name[name] for name in signature.input_names]


def _check_bytes(t: RawTensor) -> None:
    """A BYTES tensor's raw data holds exactly one length-prefixed element per position of its shape."""
    try:
        bytes_element_bounds(t.raw, math.prod(t.shape))
    except ValueError as err:
        raise InvalidArgument(f"input {t.name!r}: not a BYTES tensor of shape {list(t.shape)} ({err}); each element "
                              "is a 4-byte little-endian length and that many bytes") from None


def validate_outputs(names: Sequence[str], signature: Signature) -> list[str]:
    known = [spec.name for spec in signature.outputs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidArgument(f"unknown outputs {unknown}; this version returns {known}")
    return list(names) or known
