"""The TrainingJobs gRPC servicer: convert, call the core, convert back."""
from __future__ import annotations

from margin.common import auth
from margin.common.errors import InvalidArgument
from margin.common.jobcontrol import Caller
from margin.common.jobs import Job
from margin.common.jobstates import STATE_FROM_PROTO
from margin.training import convert
from margin.training.core import TrainingCore
from margin.v1 import common_pb2, training_pb2, training_pb2_grpc


def _caller(context) -> Caller:
    tenant_id = auth.current_tenant_id()
    principal = auth.current_principal()
    return Caller(tenant_id, principal.tenant, auth.bearer_token(context.invocation_metadata()) or "")


class TrainingServicer(training_pb2_grpc.TrainingJobsServicer):
    def __init__(self, core: TrainingCore):
        self.core = core
        self.currency = core.catalog.currency

    def _job(self, job: Job) -> training_pb2.TrainingJob:
        return convert.job_to_proto(job, self.currency)

    def EstimateCost(self, request, context):
        _, estimate = self.core.estimate(_caller(context), convert.spec_from_proto(request.spec))
        price = self.core.catalog.device(estimate.expected.device_class).micros_per_hour
        return convert.estimate_message(estimate, price, self.currency)

    def SubmitJob(self, request, context):
        if request.budget.currency and request.budget.currency != self.currency:
            raise InvalidArgument(f"budget currency must be {self.currency}")
        return self._job(self.core.submit(_caller(context), convert.spec_from_proto(request.spec),
                                          request.budget.micros, request.idempotency_key))

    def GetJob(self, request, context):
        return self._job(self.core.jobs.get(auth.current_tenant_id(), request.id))

    def ListJobs(self, request, context):
        if request.state not in STATE_FROM_PROTO and request.state != common_pb2.JOB_STATE_UNSPECIFIED:
            raise InvalidArgument(f"state {request.state} is not a job state")
        jobs, token = self.core.jobs.list(auth.current_tenant_id(), STATE_FROM_PROTO.get(request.state),
                                     request.page_size, request.page_token)
        return training_pb2.ListJobsResponse(jobs=[self._job(j) for j in jobs], next_page_token=token)

    def CancelJob(self, request, context):
        return self._job(self.core.jobs.cancel(auth.current_tenant_id(), request.id, request.reason))

    def WatchJob(self, request, context):
        for item in self.core.jobs.watch(auth.current_tenant_id(), request.id, context.is_active):
            if isinstance(item, Job):
                yield convert.snapshot_event(item, self.currency)
            else:
                yield convert.event_to_proto(request.id, item, self.currency)
