"""The bare pass-through proxy: the reference floor of "one Python round trip per request" for the gateway bench.

A ``grpc.aio`` server whose one generic handler takes every unary ``/inference.GRPCInferenceService/<Method>``
call as raw bytes (identity serializers: nothing is decoded) and forwards them to Triton over one ``grpc.aio``
channel (``channel.unary_unary(method)``, again without serializers), answering with Triton's reply bytes or its
status. No authentication, no validation, no metadata forwarded. Whatever Margin's own KServe v2 endpoint costs
beyond this is the price of what it does (auth, routing, metering), not of being a Python hop. It lives in
``bench/`` and is never shipped.

    python bench/bare_proxy.py --listen 127.0.0.1:0 --upstream 127.0.0.1:8001   # prints the port it bound
"""
from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

import grpc

SERVICE_PREFIX = "/inference.GRPCInferenceService/"
STREAMING_METHODS = frozenset({SERVICE_PREFIX + "ModelStreamInfer"})  # not unary: not forwarded (UNIMPLEMENTED)
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

Forward = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


def forwarder(channel: grpc.aio.Channel, method: str) -> Forward:
    """A unary handler body that sends the request bytes to ``method`` upstream and returns the reply bytes; an
    upstream error is answered with the same code and details (not as UNKNOWN)."""
    upstream = channel.unary_unary(method)  # no serializers: bytes in, bytes out

    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await upstream(request)
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")

    return forward


class PassThrough(grpc.GenericRpcHandler):
    """Answers every unary KServe v2 method by forwarding it; handlers are made once per method and reused."""

    def __init__(self, channel: grpc.aio.Channel):
        self._channel = channel
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if not method.startswith(SERVICE_PREFIX) or method in STREAMING_METHODS:
            return None
        handler = self._handlers.get(method)
        if handler is None:  # identity (None) (de)serializers: the bytes as they came
            handler = grpc.unary_unary_rpc_method_handler(forwarder(self._channel, method))
            self._handlers[method] = handler
        return handler


async def serve(listen: str, upstream: str) -> None:
    """Bind ``listen``, print the bound port (flushed: the caller may read it), forward until terminated."""
    channel = grpc.aio.insecure_channel(upstream, options=UNLIMITED)
    server = grpc.aio.server(options=UNLIMITED)
    server.add_generic_rpc_handlers((PassThrough(channel),))
    port = server.add_insecure_port(listen)
    if not port:
        raise SystemExit(f"bare_proxy: cannot listen on {listen}")
    await server.start()
    print(port, flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to bind (port 0: any free port)")
    parser.add_argument("--upstream", required=True, help="Triton's gRPC host:port")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
