"""One answer per message of a request stream, in order: a message that fails is answered with its error and the
stream goes on (KServe's ModelStreamInfer does this with ``error_message``; Margin's PredictStream with ``error``).
Only authentication ends a stream — checked when it opens, as for any call."""
from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

from margin.common.errors import MarginError, PermissionDenied, Unauthenticated

Request = TypeVar("Request")
Response = TypeVar("Response")


async def answer_each(requests: AsyncIterable[Request], handle: Callable[[Request], Awaitable[Response]],
                      failed: Callable[[MarginError, Request | None], Response]) -> AsyncIterator[Response]:
    """``handle(message)`` for each message, or ``failed(error, message)`` when it raises a Margin error — including
    a message that does not decode (its iterator step raises INVALID_ARGUMENT, and ``message`` is None)."""
    messages = aiter(requests)
    while True:
        request = None
        try:
            request = await anext(messages)
            yield await handle(request)
        except StopAsyncIteration:
            return
        except (Unauthenticated, PermissionDenied):
            raise
        except MarginError as err:
            yield failed(err, request)
