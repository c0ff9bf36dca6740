"""What a service needs from the budget service, over gRPC with the platform's (admin) key: a tenant's spend (the
inference gateway's serving-budget gate), what is left of a tenant's budget for a kind of job (the training and
compression services' admission) and the fleet reports (the gateway for its Triton pools, each worker for itself).
Errors come back as the domain's: the budget service down is :class:`Unavailable`."""
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


def remaining_for(report: budget_pb2.SpendReport, category: str) -> int | None:
    """What ``category`` (``training``, ``compression``, ``serving``) may still spend this period by a tenant's spend
    report: the smaller of the budget total's remainder and the category limit's (its limit less what the category
    spent); None when the tenant has no budget. The same figure as the budget service's own
    ``Spend.remaining_for``, read from its answer rather than its tables."""
    if not report.HasField("budget"):
        return None
    left = report.remaining.micros
    code = budget_pb2.SpendCategory.Value(f"SPEND_CATEGORY_{category.upper()}")
    limit = next((c.limit.micros for c in report.budget.category_limits if c.category == code), None)
    if limit is not None:
        spent = next((line.amount.micros for line in report.by_category if line.key == category), 0)
        left = min(left, limit - spent)
    return left


class BudgetsClient:
    def __init__(self, address: str, admin_key: str | None, timeout_s: float = 5.0):
        self.address = address
        self._conn = connect(address, admin_key)
        self._stub = budget_pb2_grpc.BudgetsStub(self._conn.channel)
        self._timeout = timeout_s

    def spend(self, tenant: str) -> budget_pb2.SpendReport:
        return self._call(self._stub.GetSpend, budget_pb2.GetSpendRequest(tenant=tenant))

    def remaining(self, tenant: str, category: str) -> int | None:
        """What ``tenant``'s budget still allows ``category`` this period (:func:`remaining_for`); None: no budget."""
        return remaining_for(self.spend(tenant), category)

    def report_fleet(self, request: budget_pb2.ReportFleetRequest) -> budget_pb2.ReportFleetResponse:
        return self._call(self._stub.ReportFleet, request)

    def _call(self, method, request):
        try:
            return method(request, metadata=self._conn.metadata, timeout=self._timeout)
        except grpc.RpcError as err:
            raise _domain_error(err) from None

    def close(self) -> None:
        self._conn.close()
