"""Cheap checks that an upload is the format it claims, without loading (let alone unpickling) it.

TorchScript archives and .npz datasets are zip files; safetensors starts with a little-endian u64
header length followed by a JSON object. ONNX is a bare protobuf with no magic number, so it is not
checked here; a broken ONNX file fails at deploy time with Triton's message.
"""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from margin.common.errors import InvalidArgument

MAX_SAFETENSORS_HEADER = 100 << 20


def _zip(path: Path, what: str) -> None:
    if not zipfile.is_zipfile(path):
        raise InvalidArgument(f"the upload is not a {what} (expected a zip archive)")


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


CHECKS = {
    "torchscript": lambda p: _zip(p, "TorchScript archive"),
    "dataset-npz": lambda p: _zip(p, ".npz dataset"),
    "safetensors": _safetensors,
}


def check_format(path: Path, fmt: str) -> None:
    """Raise InvalidArgument when the file at ``path`` is plainly not ``fmt``."""
    check = CHECKS.get(fmt)
    if check:
        check(path)
