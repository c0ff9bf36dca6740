"""The Compression gRPC servicer: convert, call the core, convert back."""
from __future__ import annotations

from margin.common import auth
from margin.common.errors import InvalidArgument
from margin.common.jobcontrol import Caller
from margin.common.jobs import Job
from margin.compression import convert
from margin.compression.core import CompressionCore
from margin.training.convert import STATE_FROM_PROTO
from margin.v1 import common_pb2, compression_pb2, compression_pb2_grpc


def _caller(context) -> Caller:
    principal = auth.current_principal()
    return Caller(auth.current_tenant_id(), principal.tenant, auth.bearer_token(context.invocation_metadata()) or "")


def _source(ref: common_pb2.VersionRef) -> tuple[str, int, str]:
    if not ref.model:
        raise InvalidArgument("source.model is required")
    return ref.model, ref.number, ref.alias


def _dataset(ref: common_pb2.DatasetRef) -> str:
    if ref.WhichOneof("source") == "registry":
        raise InvalidArgument("eval_dataset: registry datasets are not supported for compression yet; use a built-in")
    return ref.builtin


class CompressionServicer(compression_pb2_grpc.CompressionServicer):
    def __init__(self, core: CompressionCore):
        self.core = core
        self.currency = core.catalog.currency

    def _job(self, job: Job) -> compression_pb2.CompressionJob:
        return convert.job_to_proto(job, self.currency)

    def SubmitCompression(self, request, context):
        if not request.recipe.steps:
            raise InvalidArgument("recipe.steps: a recipe needs at least one step")
        return self._job(self.core.submit(
            _caller(context), source=_source(request.source), recipe=convert.to_dict(request.recipe), candidates=[],
            auto=None, eval_dataset=_dataset(request.eval_dataset), quality_metric=request.quality_metric,
            device_class=request.device_class, budget_micros=request.budget.micros,
            idempotency_key=request.idempotency_key))

    def AutoCompress(self, request, context):
        if not request.HasField("floor") or not request.floor.metric:
            raise InvalidArgument("floor: AutoCompress needs a quality floor, e.g. {metric: accuracy, minimum: 0.97}")
        if len(request.device_classes) > 1:
            raise InvalidArgument("device_classes: one device class per AutoCompress job for now")
        auto = convert.to_dict(request)
        auto["objective"] = convert.OBJECTIVES.get(request.objective, "")
        if not auto["objective"]:
            raise InvalidArgument(f"objective {request.objective} is not a known objective")
        return self._job(self.core.submit(
            _caller(context), source=_source(request.source), recipe=None,
            candidates=[convert.to_dict(c) for c in request.candidates], auto=auto,
            eval_dataset=_dataset(request.eval_dataset), quality_metric=request.floor.metric,
            device_class=request.device_classes[0] if request.device_classes else "cpu",
            budget_micros=request.budget.micros, idempotency_key=request.idempotency_key))

    def GetCompressionJob(self, request, context):
        return self._job(self.core.jobs.get(auth.current_tenant_id(), request.id))

    def ListCompressionJobs(self, request, context):
        if request.state not in STATE_FROM_PROTO and request.state != common_pb2.JOB_STATE_UNSPECIFIED:
            raise InvalidArgument(f"state {request.state} is not a job state")
        jobs, token = self.core.jobs.list(auth.current_tenant_id(), STATE_FROM_PROTO.get(request.state),
                                          request.page_size, request.page_token)
        return compression_pb2.ListCompressionJobsResponse(jobs=[self._job(j) for j in jobs], next_page_token=token)

    def WatchCompressionJob(self, request, context):
        for item in self.core.jobs.watch(auth.current_tenant_id(), request.id, context.is_active):
            if isinstance(item, Job):
                yield convert.snapshot_event(item, self.currency)
            else:
                yield convert.event_to_proto(request.id, item, self.currency)
