"""Prometheus metrics: the per-RPC counters every service exports, and the /metrics endpoint."""
from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

RPC_REQUESTS = Counter("margin_grpc_requests_total", "gRPC calls handled, by method and status code.",
                       ["method", "code"])
RPC_SECONDS = Histogram("margin_grpc_request_seconds", "Time to handle a gRPC call (for streams: the whole stream).",
                        ["method"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10, 60))


def start_metrics_endpoint(port: int, host: str = "0.0.0.0") -> int | None:
    """Serve /metrics on ``port`` (0 = any free port, negative = off). Returns the bound port."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_port
    log.info("metrics endpoint on :%d/metrics", bound)
    return bound
