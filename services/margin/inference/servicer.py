"""The Inference gRPC servicer (asyncio): thin — convert, call the gateway or the deployment manager,
convert back. Predict runs on the event loop; control calls (deploy, list…) run on worker threads."""
from __future__ import annotations

import asyncio

from margin.common.auth import bearer_token, current_principal, current_tenant_id
from margin.inference import convert
from margin.inference.gateway import Gateway
from margin.inference.streaming import answer_each
from margin.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.deployments = gateway.deployments

    async def Deploy(self, request, context):
        deployment = await asyncio.to_thread(self.deployments.deploy, current_tenant_id(),
                                             bearer_token(context.invocation_metadata()),
                                             convert.deploy_spec(request))
        self.gateway.invalidate()
        return self._to_proto(deployment)

    async def Undeploy(self, request, context):
        deployment = await asyncio.to_thread(self.deployments.undeploy, current_tenant_id(), request.name)
        self.gateway.invalidate()
        return self._to_proto(deployment)

    async def GetDeployment(self, request, context):
        return self._to_proto(await asyncio.to_thread(self.deployments.get, current_tenant_id(), request.name))

    async def ListDeployments(self, request, context):
        items, token = await asyncio.to_thread(self.deployments.list, current_tenant_id(), request.model,
                                               request.page_size, request.page_token)
        return inference_pb2.ListDeploymentsResponse(deployments=[self._to_proto(d) for d in items],
                                                     next_page_token=token)

    def _to_proto(self, deployment):
        served = self.gateway.served
        return convert.deployment_to_proto(deployment, served.per_million(deployment), served.allocated(deployment))

    async def Predict(self, request, context):
        return await self._predict(request, current_principal(), bearer_token(context.invocation_metadata()))

    async def PredictStream(self, request_iterator, context):
        """Each message is answered in order; one that fails — a bad tensor, an unknown model, Triton restarting, or
        a message that does not decode — is answered with ``error`` and the stream goes on
        (:func:`margin.inference.streaming.answer_each`)."""
        principal, key = current_principal(), bearer_token(context.invocation_metadata())
        current_tenant_id()  # the admin key owns no deployments: PERMISSION_DENIED ends the stream at once
        async for reply in answer_each(request_iterator, lambda request: self._predict(request, principal, key),
                                       lambda err, request: convert.stream_error(
                                           err, request.request_id if request is not None else "")):
            yield reply

    async def _predict(self, request, principal, key):
        current_tenant_id()  # the admin key owns no deployments
        prediction = await self.gateway.predict_async(principal, key, convert.target(request),
                                                      convert.inputs(request), list(request.outputs))
        return convert.prediction_to_proto(prediction, request.request_id)
