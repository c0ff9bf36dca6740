"""A deploy's probe: one inference on zeros, whose outputs must be what the version's signature declares.

A version's signature is what its uploader said; the model is what it is. Before a deployment is READY, the
model just loaded answers one request — zeros of batch 1 shaped as the declared inputs (``-1`` taken as 1) —
and every declared output must come back with its declared dtype and a shape that agrees with the declared one
(the same rank; each declared dimension other than ``-1`` equal). A model that does not answer the probe at all
(it fails on the request) is refused the same way, with Triton's message.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from margin.common.errors import FailedPrecondition
from margin.common.tensors import Signature, TensorSpec
from margin.inference.triton_client import RawTensor
from margin.inference.validation import ITEM_SIZES

BYTES_ITEM = 4  # a BYTES element on the wire is a 4-byte length and its bytes: zeros are empty strings


class Infers(Protocol):
    def infer(self, model: str, inputs: Sequence[RawTensor], outputs: Sequence[str]) -> list[RawTensor]: ...


def zero_inputs(signature: Signature) -> list[RawTensor]:
    """Zeros for every declared input, batch 1 (every ``-1`` dimension taken as 1)."""
    tensors = []
    for spec in signature.inputs:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        tensors.append(RawTensor(spec.name, spec.dtype, shape,
                                 bytes(math.prod(shape) * ITEM_SIZES.get(spec.dtype, BYTES_ITEM))))
    return tensors


def describe_actual(tensor: RawTensor) -> str:
    return f"{tensor.name}: {tensor.datatype}{list(tensor.shape)}"


def _agrees(spec: TensorSpec, tensor: RawTensor) -> bool:
    return tensor.datatype == spec.dtype and len(tensor.shape) == len(spec.shape) and all(
        want == -1 or have == want for have, want in zip(tensor.shape, spec.shape, strict=True))


def mismatches(signature: Signature, actual: Sequence[RawTensor]) -> list[str]:
    """How the outputs of the probe differ from the declared outputs (empty when they agree)."""
    by_name = {t.name: t for t in actual}
    problems = []
    for spec in signature.outputs:
        got = by_name.get(spec.name)
        if got is None:
            problems.append(f"declared output {spec.describe()}, the model returned no output of that name "
                            f"(it returned [{', '.join(describe_actual(t) for t in actual)}])")
        elif not _agrees(spec, got):
            problems.append(f"declared output {spec.describe()}, the model returned {describe_actual(got)}")
    return problems


def probe(triton: Infers, model_name: str, signature: Signature, what: str) -> None:
    """Run the probe request on ``model_name`` (``what`` names the version in messages); raise
    :class:`FailedPrecondition` naming the declared and the actual outputs when they disagree, or when the model
    fails on the request. :class:`~margin.common.errors.Unavailable` (Triton unreachable) passes through."""
    try:
        actual = triton.infer(model_name, zero_inputs(signature), [t.name for t in signature.outputs])
    except FailedPrecondition as err:
        raise FailedPrecondition(f"{what} failed its probe inference (zeros shaped as the declared inputs "
                                 f"{[s.describe() for s in signature.inputs]}): {err}; check that the declared "
                                 f"signature is the model's ({signature.describe()})") from None
    problems = mismatches(signature, actual)
    if problems:
        raise FailedPrecondition(f"{what} does not return what its signature declares: " + "; ".join(problems)
                                 + ". Register a version whose signature is the model's")
