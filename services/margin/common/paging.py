"""Opaque keyset page tokens: a token encodes the last row id of the previous page."""
from __future__ import annotations

import base64
import json

from margin.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must be >= 0")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(after_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after_id}).encode()).decode()


def decode_token(token: str) -> int:
    """The row id after which the page starts (0 for the first page)."""
    if not token:
        return 0
    try:
        after = json.loads(base64.urlsafe_b64decode(token.encode()))["after"]
        if not isinstance(after, int) or after < 0:
            raise ValueError
        return after
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise InvalidArgument("page_token is not a token this service issued") from None
