"""Server interceptors for every Margin service: authentication, error mapping and RPC metrics.

- Auth: ``authorization: Bearer <key>`` → :class:`Principal`, stored for the servicer
  (:func:`margin.common.auth.current_principal`). Health and reflection stay open; admin-only methods
  refuse tenant keys.
- Errors: a :class:`MarginError` becomes its status code with its message; anything else becomes
  INTERNAL with a fixed message and a reference id, the traceback goes to the log — never to the caller.
- Metrics: a counter per method and code, and a latency histogram.
- Undecodable requests: grpc answers a request that fails to deserialize with INTERNAL (thread-pool servers) or
  UNKNOWN (asyncio) before any interceptor sees it. The wrapped handlers' deserializer never raises: it gives an
  :class:`Undecodable` instead, and the call answers INVALID_ARGUMENT naming the message type — a unary request
  before the behaviour runs, a request stream when the servicer reaches that message (the iterator can be advanced
  again after it, so a servicer may answer that one message and go on).

One :class:`CallPolicy` holds that logic; :class:`ServiceInterceptor` applies it to thread-pool servers
and :class:`AioServiceInterceptor` to asyncio servers. Wrapped handlers are built once per method.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc

from margin.common import auth
from margin.common.errors import InvalidArgument, MarginError, PermissionDenied, ResourceExhausted, Unavailable
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


@dataclass(frozen=True)
class Undecodable:
    """A request message that did not parse as ``type_name`` (what the wrapped deserializer gives instead of
    raising)."""

    type_name: str
    error: str

    def invalid(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a valid {self.type_name}: {self.error}")


def _tolerant(deserialize: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    """``deserialize`` (a generated ``Message.FromString``), returning an :class:`Undecodable` where it raises."""
    if deserialize is None:
        return None
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "request message")

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as err:  # DecodeError, or anything a custom deserializer raises
            return Undecodable(type_name, (str(err) or type(err).__name__)[:200])
    return parse


def _decoded(request):
    """A unary request, or INVALID_ARGUMENT when it did not parse."""
    if isinstance(request, Undecodable):
        raise request.invalid()
    return request


class CheckedRequests(Iterator):
    """A request stream whose undecodable messages raise INVALID_ARGUMENT when reached; the next one can still be
    read afterwards."""

    def __init__(self, requests: Iterable):
        self._requests = iter(requests)

    def __iter__(self) -> CheckedRequests:
        return self

    def __next__(self):
        return _decoded(next(self._requests))


class AioCheckedRequests(AsyncIterator):
    """:class:`CheckedRequests` for a grpc.aio request stream."""

    def __init__(self, requests):
        self._source, self._requests = requests, None

    def __aiter__(self) -> AioCheckedRequests:
        return self

    async def __anext__(self):
        if self._requests is None:  # grpc's receiver makes its generator on first use: only when it is read
            self._requests = aiter(self._source)
        return _decoded(await anext(self._requests))


def _rebuild(handler: grpc.RpcMethodHandler, unary, stream, requests: type) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour passed through ``unary`` (unary response) or ``stream``, each given how to
    check its request: :func:`_decoded` for one message, ``requests`` (a checked iterator type) for a stream; its
    deserializer never raises (:func:`_tolerant`)."""
    ser = (_tolerant(handler.request_deserializer), handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, _decoded), *ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, requests), *ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream, _decoded), *ser)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream, requests), *ser)


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

        def unary(behavior, checked):
            def call(request, context):
                start = time.perf_counter()
                try:
                    policy.enter(context)
                    response = behavior(checked(request), context)
                except BaseException as exc:
                    fail(context, start, exc)
                    raise
                policy.observe(start, "OK")
                return response
            return call

        def stream(behavior, checked):
            def call(request, context):
                start = time.perf_counter()
                try:
                    policy.enter(context)
                    yield from behavior(checked(request), context)
                except BaseException as exc:
                    fail(context, start, exc)
                    raise
                policy.observe(start, "OK")
            return call

        return _rebuild(handler, unary, stream, CheckedRequests)


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

        def unary(behavior, checked):
            async def call(request, context):
                start = time.perf_counter()
                try:
                    policy.enter(context)
                    response = await behavior(checked(request), context)
                except Exception as exc:
                    await fail(context, start, exc)
                    raise
                policy.observe(start, "OK")
                return response
            return call

        def stream(behavior, checked):
            async def call(request, context):
                start = time.perf_counter()
                try:
                    policy.enter(context)
                    async for response in behavior(checked(request), context):
                        yield response
                except Exception as exc:
                    await fail(context, start, exc)
                    raise
                policy.observe(start, "OK")
            return call

        return _rebuild(handler, unary, stream, AioCheckedRequests)
