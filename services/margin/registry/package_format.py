"""Is a ``model-package`` upload a model package, and what does it define?

The package is read and parsed by :func:`margin.common.modelpackage.inspect_package` (never imported or run); the
version's architecture is what that finds (:meth:`~margin.common.modelpackage.PackageInfo.describe`), and its
signature stays empty: the code, not the uploader, says what the package is, so neither may be declared.
"""
from __future__ import annotations

from pathlib import Path

from margin.common.errors import InvalidArgument
from margin.common.modelpackage import inspect_package, package_cap
from margin.common.tensors import Signature


def check_package(path: Path, signature: Signature, architecture: dict | None = None,
                  max_bytes: int | None = None) -> dict:
    """The architecture to store with the package at ``path``: its entry, files and defined contract functions.
    Raise :class:`InvalidArgument` when it breaks the package contract, or when a signature or architecture was
    declared. ``max_bytes``: the package cap (None: ``MARGIN_MAX_PACKAGE_BYTES``)."""
    if not signature.empty or architecture:
        raise InvalidArgument("a model package's description is read from its code; leave --signature/--architecture "
                              "out")
    max_bytes = package_cap(max_bytes)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # one byte past the cap is enough to refuse it
    return inspect_package(data, max_bytes).describe()
