"""The Compression gRPC servicer: convert, call the core, convert back."""
from __future__ import annotations

from margin.common import auth, protoconv
from margin.common.errors import InvalidArgument
from margin.common.jobcontrol import Caller
from margin.common.jobs import Job
from margin.common.jobstates import STATE_FROM_PROTO
from margin.compression import convert
from margin.compression.core import CompressionCore, CompressionRequest
from margin.v1 import common_pb2, compression_pb2, compression_pb2_grpc


def _caller(context) -> Caller:
    principal = auth.current_principal()
    return Caller(auth.current_tenant_id(), principal.tenant, auth.bearer_token(context.invocation_metadata()) or "")


def _source(ref: common_pb2.VersionRef) -> tuple[str, int, str]:
    if not ref.model:
        raise InvalidArgument("source.model is required")
    return ref.model, ref.number, ref.alias


def _dataset(ref: common_pb2.DatasetRef) -> str | tuple[str, int, str]:
    """A built-in dataset's name, or a registry dataset version as (model, number, alias)."""
    if ref.WhichOneof("source") == "registry":
        if not ref.registry.model:
            raise InvalidArgument("eval_dataset.registry.model is required")
        return ref.registry.model, ref.registry.number, ref.registry.alias
    return ref.builtin


def _explicit(request: compression_pb2.SubmitCompressionRequest, where: str = "") -> CompressionRequest:
    """``where``: the request's field name inside an EstimateCompression request ("submit."), for messages."""
    if not request.recipe.steps:
        raise InvalidArgument("recipe.steps: a recipe needs at least one step")
    return CompressionRequest(
        source=_source(request.source), recipe=convert.to_dict(request.recipe, f"{where}recipe"),
        eval_dataset=_dataset(request.eval_dataset), quality_metric=request.quality_metric,
        device_class=request.device_class, budget_micros=request.budget.micros,
        idempotency_key=request.idempotency_key)


def _auto(request: compression_pb2.AutoCompressRequest, needs_floor: bool = True, where: str = "") \
        -> CompressionRequest:
    """``needs_floor``: AutoCompress does; an estimate does not (the quality metric is then the source's).
    ``where``: as for :func:`_explicit` ("auto.")."""
    if needs_floor and (not request.HasField("floor") or not request.floor.metric):
        raise InvalidArgument("floor: AutoCompress needs a quality floor, e.g. {metric: accuracy, minimum: 0.97}")
    protoconv.finite(request.floor.minimum, f"{where}floor.minimum")
    if len(request.device_classes) > 1:
        raise InvalidArgument("device_classes: one device class per AutoCompress job for now")
    auto = convert.to_dict(request, where.rstrip("."))
    auto["objective"] = convert.OBJECTIVES.get(request.objective, "")
    if not auto["objective"]:
        raise InvalidArgument(f"objective {request.objective} is not a known objective")
    return CompressionRequest(
        source=_source(request.source), auto=auto,
        candidates=[convert.to_dict(c, f"{where}candidates[{i}]") for i, c in enumerate(request.candidates)],
        eval_dataset=_dataset(request.eval_dataset), quality_metric=request.floor.metric,
        device_class=request.device_classes[0] if request.device_classes else "cpu",
        budget_micros=request.budget.micros, idempotency_key=request.idempotency_key)


class CompressionServicer(compression_pb2_grpc.CompressionServicer):
    def __init__(self, core: CompressionCore):
        self.core = core
        self.currency = core.catalog.currency

    def _job(self, job: Job) -> compression_pb2.CompressionJob:
        return convert.job_to_proto(job, self.currency)

    def SubmitCompression(self, request, context):
        return self._job(self.core.submit(_caller(context), _explicit(request)))

    def AutoCompress(self, request, context):
        return self._job(self.core.submit(_caller(context), _auto(request)))

    def EstimateCompression(self, request, context):
        which = request.WhichOneof("request")
        if which is None:
            raise InvalidArgument("request: set submit (an explicit recipe) or auto (an AutoCompress search)")
        r = _explicit(request.submit, "submit.") if which == "submit" \
            else _auto(request.auto, needs_floor=False, where="auto.")
        e = self.core.estimate(_caller(context), r)
        return compression_pb2.CompressionEstimate(
            cost=common_pb2.MoneyRange(**{k: protoconv.money(e[f"{k}_micros"], self.currency)
                                          for k in ("low", "expected", "high")}),
            seconds=e["seconds"], seconds_low=e["seconds_low"], seconds_high=e["seconds_high"],
            variants=e["variants"], device_class=e["device_class"], basis=e["basis"])

    def GetCompressionJob(self, request, context):
        return self._job(self.core.jobs.get(auth.current_tenant_id(), request.id))

    def ListCompressionJobs(self, request, context):
        if request.state not in STATE_FROM_PROTO and request.state != common_pb2.JOB_STATE_UNSPECIFIED:
            raise InvalidArgument(f"state {request.state} is not a job state")
        jobs, token = self.core.jobs.list(auth.current_tenant_id(), STATE_FROM_PROTO.get(request.state),
                                          request.page_size, request.page_token)
        return compression_pb2.ListCompressionJobsResponse(jobs=[self._job(j) for j in jobs], next_page_token=token)

    def CancelCompressionJob(self, request, context):
        return self._job(self.core.jobs.cancel(auth.current_tenant_id(), request.id, request.reason))

    def WatchCompressionJob(self, request, context):
        for item in self.core.jobs.watch(auth.current_tenant_id(), request.id, context.is_active):
            if isinstance(item, Job):
                yield convert.snapshot_event(item, self.currency)
            else:
                yield convert.event_to_proto(request.id, item, self.currency)
