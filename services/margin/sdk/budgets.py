"""What a service needs from the budget service, over gRPC with the platform's (admin) key: a tenant's spend (the
inference gateway's serving-budget gate) and the fleet reports (the gateway for its Triton pools, each worker for
itself). Errors come back as the domain's: the budget service down is :class:`Unavailable`."""
from __future__ import annotations

import grpc

from margin.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from margin.sdk.channel import connect
from margin.v1 import budget_pb2, budget_pb2_grpc

_ERRORS = {grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
           grpc.StatusCode.UNAVAILABLE: Unavailable, grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
           grpc.StatusCode.PERMISSION_DENIED: PermissionDenied, grpc.StatusCode.UNAUTHENTICATED: PermissionDenied}


def _domain_error(err: grpc.RpcError) -> Exception:
    return _ERRORS.get(err.code(), FailedPrecondition)(f"budget service: {err.details()}")


class BudgetsClient:
    def __init__(self, address: str, admin_key: str | None, timeout_s: float = 5.0):
        self.address = address
        self._conn = connect(address, admin_key)
        self._stub = budget_pb2_grpc.BudgetsStub(self._conn.channel)
        self._timeout = timeout_s

    def spend(self, tenant: str) -> budget_pb2.SpendReport:
        return self._call(self._stub.GetSpend, budget_pb2.GetSpendRequest(tenant=tenant))

    def report_fleet(self, request: budget_pb2.ReportFleetRequest) -> budget_pb2.ReportFleetResponse:
        return self._call(self._stub.ReportFleet, request)

    def _call(self, method, request):
        try:
            return method(request, metadata=self._conn.metadata, timeout=self._timeout)
        except grpc.RpcError as err:
            raise _domain_error(err) from None

    def close(self) -> None:
        self._conn.close()
