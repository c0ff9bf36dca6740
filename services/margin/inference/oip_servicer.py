"""``inference.GRPCInferenceService`` (the Open Inference Protocol, KServe v2 gRPC) on the gateway's port: thin —
convert (:mod:`margin.inference.oip`), call the gateway, convert back. Every call carries ``authorization: Bearer
<key>`` and sees only the caller's tenant: its models, its deployments, its statistics. Inference takes exactly
Predict's path (:meth:`margin.inference.gateway.Gateway.predict_async`): quotas, the serving budget, metering and
allocation apply alike, and errors have the same status codes. What would touch the shared server — loading and
unloading models, shared memory, tracing and log settings — is refused, saying what to use instead."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from tritonclient.grpc import service_pb2, service_pb2_grpc

from margin.common.auth import bearer_token, current_principal, current_tenant_id
from margin.common.errors import MarginError, NotFound, PermissionDenied, Unauthenticated, Unimplemented
from margin.inference import oip
from margin.inference.deployments import SERVABLE, Deployment
from margin.inference.gateway import Gateway
from margin.inference.pools import TritonPools
from margin.inference.streaming import answer_each

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("model_configuration", "statistics", "parameters")
SERVER_NAME = "margin"
SERVER_VERSION = "0.1.0"


class OpenInferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gateway: Gateway, pools: TritonPools, ready: Callable[[], bool]):
        self.gateway, self.deployments, self._pools, self._ready = gateway, gateway.deployments, pools, ready

    # -- health and metadata ---------------------------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        """Ready when a request would be served: a deployment of that version (or, with none named, one that routing
        may choose) is READY, or scaled to zero (the request waits for its cold start)."""
        try:
            await self._resolve(context, request.name, request.version)
        except (Unauthenticated, PermissionDenied):
            raise
        except MarginError:  # no such model (or another tenant's), none deployed, or none routing may choose
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        served = await self._resolve(context, request.name, request.version)
        versions = [d.version for d in await self._servable(request.name)]
        return oip.model_metadata(request.name, served, versions)

    async def ModelConfig(self, request, context):
        return oip.model_config(await self._resolve(context, request.name, request.version))

    async def RepositoryIndex(self, request, context):
        if request.repository_name:
            raise NotFound(f"repository {request.repository_name!r}: each tenant has one repository, its "
                           "deployments; leave repository_name empty")
        tenant = current_tenant_id()
        return oip.repository_index(await asyncio.to_thread(self._all_deployments, tenant), request.ready)

    async def ModelStatistics(self, request, context):
        """Triton's own counts and times of the caller's deployments (of ``name``, of ``version``; all when empty),
        summed over each pool's replicas."""
        tenant = current_tenant_id()
        if request.version and not request.name:
            raise NotFound("model_version without model_name: name the model")
        chosen = [d for d in await asyncio.to_thread(self._all_deployments, tenant)
                  if d.state in SERVABLE and (not request.name or d.model == request.name)
                  and (not request.version or str(d.version) == request.version)]
        if request.name and not chosen:
            raise NotFound(f"model {request.name!r}{' version ' + request.version if request.version else ''} has "
                           "no deployment")
        stats = await asyncio.to_thread(self._statistics, chosen)
        return service_pb2.ModelStatisticsResponse(model_stats=stats)

    # -- inference -------------------------------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        return await self._infer(request, current_principal(), bearer_token(context.invocation_metadata()))

    async def ModelStreamInfer(self, request_iterator, context):
        """Each message is answered in order; one that fails is answered with ``error_message`` (its status code and
        message) and the request's id, and the stream goes on."""
        principal, key = current_principal(), bearer_token(context.invocation_metadata())
        current_tenant_id()
        async for reply in answer_each(request_iterator, lambda request: self._stream_infer(request, principal, key),
                                       oip.stream_error):
            yield reply

    async def _stream_infer(self, request, principal, key):
        return service_pb2.ModelStreamInferResponse(infer_response=await self._infer(request, principal, key))

    async def _infer(self, request, principal, key):
        current_tenant_id()  # the admin key owns no deployments
        prediction = await self.gateway.predict_async(
            principal, key, oip.target(request.model_name, request.model_version, request.parameters),
            oip.inputs(request), oip.outputs(request))
        return oip.infer_response(prediction, request)

    # -- what a tenant may not do here -----------------------------------------------------------------------------
    async def RepositoryModelLoad(self, request, context):
        raise PermissionDenied("models are loaded by deploying them: margin.v1.Inference/Deploy (margin deploy)")

    async def RepositoryModelUnload(self, request, context):
        raise PermissionDenied("models are unloaded by undeploying them: margin.v1.Inference/Undeploy "
                               "(margin undeploy)")

    async def SystemSharedMemoryStatus(self, request, context):
        raise Unimplemented(oip.NO_SHARED_MEMORY)

    SystemSharedMemoryRegister = SystemSharedMemoryUnregister = SystemSharedMemoryStatus
    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = SystemSharedMemoryStatus

    async def TraceSetting(self, request, context):
        raise PermissionDenied("Triton's trace and log settings are the operator's (they are the whole server's)")

    LogSettings = TraceSetting

    # -- helpers ---------------------------------------------------------------------------------------------------
    async def _resolve(self, context, model: str, version: str) -> Deployment:
        current_tenant_id()
        return await self.gateway.resolve(current_principal(), bearer_token(context.invocation_metadata()),
                                          oip.target(model, version))

    async def _servable(self, model: str) -> list[Deployment]:
        return await asyncio.to_thread(self.deployments.servable_for_model, current_tenant_id(), model)

    def _all_deployments(self, tenant_id: int) -> list[Deployment]:
        found, token = [], ""
        while True:
            page, token = self.deployments.list(tenant_id, size=1000, token=token)
            found += page
            if not token:
                return found

    def _statistics(self, deployments: list[Deployment]) -> list[service_pb2.ModelStatistics]:
        return [oip.model_statistics(d, self._pools.for_class(d.device_class).statistics(d.triton_name))
                for d in deployments]
