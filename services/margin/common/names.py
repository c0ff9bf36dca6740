"""Validation of user-chosen names (models, aliases, tenants, label keys).

Names end up in file paths, Triton model names and URLs, so they are restricted to a safe alphabet:
no path separators, no ``..``, no leading dot or dash, and a sane length. The whole string is matched
(``fullmatch``: ``$`` would also match before a final newline, so ``x`` and ``x\\n`` would both pass).
"""
from __future__ import annotations

import re

from margin.common.errors import InvalidArgument

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_NAME_LENGTH = 100


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a safe name, else raise :class:`InvalidArgument` saying why."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} is required")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{what} {value[:40]!r}... is longer than {MAX_NAME_LENGTH} characters")
    if _CONTROL.search(value):
        raise InvalidArgument(f"{what} {value!r} contains a control character (a newline, tab, NUL...)")
    if ".." in value or not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"{what} {value!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, with no '..' or path separators"
        )
    return value


def validate_text(value: str, what: str) -> str:
    """Free text that ends up in keys, paths or log lines (pool and replica names, Triton names): any characters
    but control characters (a newline would make ``x`` and ``x\\n`` two names that print the same)."""
    if _CONTROL.search(value):
        raise InvalidArgument(f"{what} {value[:60]!r} contains a control character (a newline, tab, NUL...)")
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
