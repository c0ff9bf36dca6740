"""Checking a request's tensors against the served version's signature before Triton sees them.

Every refusal says what was expected, so a caller can fix the request from the message alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from margin.common.errors import InvalidArgument
from margin.common.tensors import DTYPES, Signature
from margin.inference.triton_client import RawTensor

ITEM_SIZES = {name: np.dtype(np_name).itemsize for name, np_name in DTYPES.items()
              if name not in ("BF16", "BYTES")} | {"BF16": 2}


def validate_inputs(tensors: Sequence[RawTensor], signature: Signature, max_batch_size: int) -> None:
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
        if t.datatype != "BYTES" and len(t.raw) != math.prod(t.shape) * ITEM_SIZES[t.datatype]:
            raise InvalidArgument(f"input {t.name!r}: {len(t.raw)} bytes do not hold a {t.datatype} tensor of "
                                  f"shape {list(t.shape)} ({math.prod(t.shape) * ITEM_SIZES[t.datatype]} bytes); "
                                  f"signature: {signature.describe()}")
    if batch is not None and max_batch_size and batch > max_batch_size:
        raise InvalidArgument(f"batch size {batch} exceeds this deployment's max_batch_size {max_batch_size}; "
                              "split the request")


def validate_outputs(names: Sequence[str], signature: Signature) -> list[str]:
    known = [spec.name for spec in signature.outputs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidArgument(f"unknown outputs {unknown}; this version returns {known}")
    return list(names) or known
