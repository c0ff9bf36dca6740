"""Server interceptors for every Margin service: authentication, error mapping and RPC metrics.

- Auth: ``authorization: Bearer <key>`` → :class:`Principal`, stored for the servicer
  (:func:`margin.common.auth.current_principal`). Health and reflection stay open; admin-only methods
  refuse tenant keys.
- Errors: a :class:`MarginError` becomes its status code with its message; anything else becomes
  INTERNAL with a fixed message and a reference id, the traceback goes to the log — never to the caller.
- Metrics: a counter per method and code, and a latency histogram.

One :class:`CallPolicy` holds that logic; :class:`ServiceInterceptor` applies it to thread-pool servers
and :class:`AioServiceInterceptor` to asyncio servers. Wrapped handlers are built once per method.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from margin.common import auth
from margin.common.errors import MarginError, PermissionDenied, ResourceExhausted, Unavailable
from margin.common.metrics import RPC_REQUESTS, RPC_SECONDS
from margin.common.tenancy import Principal

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
Authenticate = Callable[[str | None, str | None], Principal]


@dataclass(frozen=True)
class Failure:
    """How a call that raised ends: its status, message and trailing metadata (None: already aborted)."""

    code: grpc.StatusCode
    message: str
    trailers: tuple = ()


class CallPolicy:
    """What happens around every call of one method: auth before, status mapping and metrics after."""

    def __init__(self, method: str, authenticate: Authenticate | None, admin_only: bool):
        self.method = method
        self._authenticate = authenticate
        self._admin_only = admin_only
        self._seconds = RPC_SECONDS.labels(method)
        self._counters: dict[str, object] = {}

    def enter(self, context: grpc.ServicerContext) -> None:
        if self._authenticate is None:
            return
        metadata = context.invocation_metadata()
        principal = self._authenticate(auth.bearer_token(metadata), auth.on_behalf_of(metadata))
        if self._admin_only and not principal.is_admin:
            raise PermissionDenied(f"{self.method} needs the admin key")
        auth.set_principal(principal)

    def failure(self, context: grpc.ServicerContext, exc: BaseException) -> Failure | None:
        if isinstance(exc, MarginError):
            trailers = ()
            if isinstance(exc, ResourceExhausted | Unavailable) and exc.retry_after_s is not None:
                trailers = (("retry-after-ms", str(int(exc.retry_after_s * 1000))),)
            return Failure(getattr(grpc.StatusCode, exc.code_name), str(exc), trailers)
        if _code(context) is not None:  # the servicer already aborted with its own status
            return None
        ref = uuid.uuid4().hex[:12]
        log.error("unexpected error in %s (ref %s)", self.method, ref, exc_info=exc)
        return Failure(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server log has details")

    def observe(self, start: float, code: str) -> None:
        counter = self._counters.get(code) or self._counters.setdefault(code, RPC_REQUESTS.labels(self.method, code))
        counter.inc()
        self._seconds.observe(time.perf_counter() - start)


def _code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


def _code_name(context: grpc.ServicerContext, failure: Failure | None) -> str:
    if failure is not None:
        return failure.code.name
    code = _code(context)
    return code.name if code is not None else "INTERNAL"


def _rebuild(handler: grpc.RpcMethodHandler, unary, stream) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour passed through ``unary`` (unary response) or ``stream``."""
    ser = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), *ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), *ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), *ser)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), *ser)


class _Interceptor:
    def __init__(self, authenticate: Authenticate | None, admin_methods: Iterable[str] = ()):
        self._authenticate = authenticate
        self._admin_methods = frozenset(admin_methods)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def _policy(self, method: str) -> CallPolicy:
        return CallPolicy(method, self._authenticate, method in self._admin_methods)


class ServiceInterceptor(_Interceptor, grpc.ServerInterceptor):
    """For thread-pool (``grpc.server``) servers."""

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None or method.startswith(OPEN_PREFIXES):
                return handler
            wrapped = self._wrapped.setdefault(method, self._wrap(self._policy(method), handler))
        return wrapped

    @staticmethod
    def _wrap(policy: CallPolicy, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        def fail(context: grpc.ServicerContext, start: float, exc: BaseException) -> None:
            if isinstance(exc, GeneratorExit):  # the client went away mid-stream
                policy.observe(start, "CANCELLED")
                return
            failure = policy.failure(context, exc)
            policy.observe(start, _code_name(context, failure))
            if failure is not None:
                if failure.trailers:
                    context.set_trailing_metadata(failure.trailers)
                context.abort(failure.code, failure.message)

        def unary(behavior):
            def call(request, context):
                start = time.perf_counter()
                try:
                    policy.enter(context)
                    response = behavior(request, context)
                except BaseException as exc:
                    fail(context, start, exc)
                    raise
                policy.observe(start, "OK")
                return response
            return call

        def stream(behavior):
            def call(request, context):
                start = time.perf_counter()
                try:
                    policy.enter(context)
                    yield from behavior(request, context)
                except BaseException as exc:
                    fail(context, start, exc)
                    raise
                policy.observe(start, "OK")
            return call

        return _rebuild(handler, unary, stream)


class AioServiceInterceptor(_Interceptor, grpc.aio.ServerInterceptor):
    """For asyncio (``grpc.aio.server``) servers; behaviours are coroutines or async generators."""

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None or method.startswith(OPEN_PREFIXES):
                return handler
            wrapped = self._wrapped.setdefault(method, self._wrap(self._policy(method), handler))
        return wrapped

    @staticmethod
    def _wrap(policy: CallPolicy, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        async def fail(context: grpc.aio.ServicerContext, start: float, exc: BaseException) -> None:
            failure = policy.failure(context, exc)
            policy.observe(start, _code_name(context, failure))
            if failure is not None:
                if failure.trailers:
                    context.set_trailing_metadata(failure.trailers)
                await context.abort(failure.code, failure.message)

        def unary(behavior):
            async def call(request, context):
                start = time.perf_counter()
                try:
                    policy.enter(context)
                    response = await behavior(request, context)
                except Exception as exc:
                    await fail(context, start, exc)
                    raise
                policy.observe(start, "OK")
                return response
            return call

        def stream(behavior):
            async def call(request, context):
                start = time.perf_counter()
                try:
                    policy.enter(context)
                    async for response in behavior(request, context):
                        yield response
                except Exception as exc:
                    await fail(context, start, exc)
                    raise
                policy.observe(start, "OK")
            return call

        return _rebuild(handler, unary, stream)
