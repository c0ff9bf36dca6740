"""Checks that an upload is the format it claims, without running (let alone unpickling) it, and gives the signature
to store with the version.

Safetensors starts with a little-endian u64 header length followed by a JSON object. A TorchScript archive is a
zip of a known layout (:mod:`margin.registry.torchscript_format`); ONNX is a protobuf that must parse and pass
``onnx.checker``, and whose graph must agree with a declared signature or, when none is declared, gives the
version its signature (:mod:`margin.registry.onnx_format`). A ``dataset-npz`` upload's signature is always its
manifest, read from the ``.npy`` headers of its arrays (:mod:`margin.registry.npz_format`): a declared signature
must be that manifest, since the arrays, not the uploader, say what the dataset holds. A ``model-package`` (a
team's code) is parsed, never imported (:mod:`margin.registry.package_format`): it gives the version its
architecture, what the code defines, and no signature; declaring either is refused.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import NamedTuple

from margin.common import modelpackage
from margin.common.errors import InvalidArgument
from margin.common.tensors import Signature
from margin.registry.npz_format import read_manifest
from margin.registry.onnx_format import check_onnx
from margin.registry.package_format import check_package
from margin.registry.torchscript_format import check_torchscript

MAX_SAFETENSORS_HEADER = 100 << 20


def _safetensors(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidArgument("the upload is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= MAX_SAFETENSORS_HEADER:
            raise InvalidArgument("the upload is not a safetensors file (implausible header length)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidArgument("the upload is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise InvalidArgument("the upload is not a safetensors file (header is not a JSON object)")


def check_dataset(path: Path, signature: Signature) -> Signature:
    """The .npz dataset's manifest; a declared signature that is not the manifest is refused."""
    manifest = read_manifest(path)
    if not signature.empty and signature != manifest:
        raise InvalidArgument(f"a dataset's manifest is read from its arrays; leave --signature out (declared "
                              f"{signature.describe()}, the arrays are {manifest.describe()})")
    return manifest


CHECKS = {"torchscript": check_torchscript, "safetensors": _safetensors}
SIGNATURE_CHECKS = {"onnx": check_onnx, "dataset-npz": check_dataset}  # these give the version its signature


class Description(NamedTuple):
    """What a version stores about its file, as its format's check settles it."""

    signature: Signature
    architecture: dict


def check_format(path: Path, fmt: str, signature: Signature | None = None) -> Signature:
    """Raise InvalidArgument when the file at ``path`` is not ``fmt`` (or, for ONNX, does not take and return
    what ``signature`` declares). Returns the signature to store with the version: the declared one, except that an
    ONNX model declared without one gets its graph's, a dataset always gets its manifest, and a model package none."""
    return describe_upload(path, fmt, signature).signature


def describe_upload(path: Path, fmt: str, signature: Signature | None = None, architecture: dict | None = None,
                    max_package_bytes: int | None = None) -> Description:
    """:func:`check_format`, and the architecture to store with the version too: the declared one, except that a
    model package's is read from its code (which is at most ``max_package_bytes``, None: the configured cap)."""
    signature, architecture = signature or Signature(), architecture or {}
    if fmt == modelpackage.FORMAT:
        return Description(Signature(), check_package(path, signature, architecture, max_package_bytes))
    if fmt in SIGNATURE_CHECKS:
        return Description(SIGNATURE_CHECKS[fmt](path, signature), architecture)
    check = CHECKS.get(fmt)
    if check:
        check(path)
    return Description(signature, architecture)
