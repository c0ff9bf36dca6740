"""One server interceptor for every Margin service: authentication, error mapping and RPC metrics.

- Auth: ``authorization: Bearer <key>`` → :class:`Principal`, stored for the servicer
  (:func:`margin.common.auth.current_principal`). Health and reflection stay open; admin-only methods
  refuse tenant keys.
- Errors: a :class:`MarginError` becomes its status code with its message; anything else becomes
  INTERNAL with a fixed message and a reference id, the traceback goes to the log — never to the caller.
- Metrics: a counter per method and code, and a latency histogram.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable

import grpc

from margin.common import auth
from margin.common.errors import MarginError, PermissionDenied, ResourceExhausted
from margin.common.metrics import RPC_REQUESTS, RPC_SECONDS
from margin.common.tenancy import Principal

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
Authenticate = Callable[[str | None], Principal]


def _abort(context: grpc.ServicerContext, err: MarginError) -> None:
    if isinstance(err, ResourceExhausted) and err.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-ms", str(int(err.retry_after_s * 1000))),))
    context.abort(getattr(grpc.StatusCode, err.code_name), str(err))


class ServiceInterceptor(grpc.ServerInterceptor):
    def __init__(self, authenticate: Authenticate | None, admin_methods: Iterable[str] = ()):
        self._authenticate = authenticate
        self._admin_methods = frozenset(admin_methods)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None or method.startswith(OPEN_PREFIXES):
                return handler
            wrapped = self._wrapped.setdefault(method, self._wrap(method, handler))
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler with auth, error mapping and metrics around it; built once per method."""
        admin_only = method in self._admin_methods

        def enter(context: grpc.ServicerContext) -> None:
            if self._authenticate is None:
                return
            principal = self._authenticate(auth.bearer_token(context.invocation_metadata()))
            if admin_only and not principal.is_admin:
                raise PermissionDenied(f"{method} needs the admin key")
            auth.set_principal(principal)

        def on_error(context: grpc.ServicerContext, exc: BaseException) -> str:
            """Map ``exc`` to a status (aborting the call) and return the code's name for metrics."""
            if isinstance(exc, MarginError):
                _abort(context, exc)
            code = context.code() if hasattr(context, "code") else None
            if code is not None:  # the servicer already aborted with its own status
                raise exc
            ref = uuid.uuid4().hex[:12]
            log.error("unexpected error in %s (ref %s)", method, ref, exc_info=exc)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server log has details")
            return "INTERNAL"  # pragma: no cover - abort raises

        seconds = RPC_SECONDS.labels(method)
        counters: dict[str, object] = {}

        def observe(start: float, code: str) -> None:
            counter = counters.get(code) or counters.setdefault(code, RPC_REQUESTS.labels(method, code))
            counter.inc()
            seconds.observe(time.perf_counter() - start)

        def code_of(context: grpc.ServicerContext, exc: BaseException) -> str:
            if isinstance(exc, MarginError):
                return exc.code_name
            code = context.code() if hasattr(context, "code") else None
            return code.name if code is not None else "INTERNAL"

        def unary_response(behavior):
            def call(request, context):
                start = time.perf_counter()
                try:
                    enter(context)
                    response = behavior(request, context)
                except BaseException as exc:
                    observe(start, code_of(context, exc))
                    on_error(context, exc)
                    raise
                observe(start, "OK")
                return response
            return call

        def stream_response(behavior):
            def call(request, context):
                start = time.perf_counter()
                try:
                    enter(context)
                    yield from behavior(request, context)
                except GeneratorExit:
                    observe(start, "CANCELLED")
                    raise
                except BaseException as exc:
                    observe(start, code_of(context, exc))
                    on_error(context, exc)
                    raise
                observe(start, "OK")
            return call

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream),
                                                     handler.request_deserializer, handler.response_serializer)
