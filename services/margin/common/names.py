"""Validation of user-chosen names (models, aliases, tenants, label keys).

Names end up in file paths, Triton model names and URLs, so they are restricted to a safe alphabet:
no path separators, no ``..``, no leading dot or dash, and a sane length.
"""
from __future__ import annotations

import re

from margin.common.errors import InvalidArgument

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME_LENGTH = 100


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a safe name, else raise :class:`InvalidArgument` saying why."""
    if not value:
        raise InvalidArgument(f"{what} is required")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{what} {value[:40]!r}... is longer than {MAX_NAME_LENGTH} characters")
    if ".." in value or not _NAME.match(value):
        raise InvalidArgument(
            f"{what} {value!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, with no '..' or path separators"
        )
    return value


def validate_alias(value: str) -> str:
    """Aliases follow :func:`validate_name` and may not be all digits (those are version numbers)."""
    validate_name(value, "alias")
    if value.isdigit():
        raise InvalidArgument(f"alias {value!r} is all digits, which would read as a version number")
    return value


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """Label keys are names; values are free text up to 256 characters."""
    for key, val in labels.items():
        validate_name(key, "label key")
        if len(val) > 256:
            raise InvalidArgument(f"label {key!r} value is longer than 256 characters")
    return dict(labels)
