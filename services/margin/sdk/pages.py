"""Following ``next_page_token`` through any List* call."""
from __future__ import annotations

from collections.abc import Callable


def all_pages(call: Callable, request, field: str) -> list:
    """Every item of a paginated List* call, following ``next_page_token`` to the end."""
    items, token = [], ""
    while True:
        request.page_token = token
        reply = call(request)
        items += getattr(reply, field)
        if not (token := reply.next_page_token):
            return items
