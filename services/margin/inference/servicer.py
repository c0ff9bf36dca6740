"""The Inference gRPC servicer: thin — convert, call the gateway or the deployment manager, convert back."""
from __future__ import annotations

from margin.common.auth import bearer_token, current_principal, current_tenant_id
from margin.inference import convert
from margin.inference.gateway import Gateway
from margin.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.deployments = gateway.deployments

    def Deploy(self, request, context):
        tenant = current_tenant_id()
        deployment = self.deployments.deploy(tenant, bearer_token(context.invocation_metadata()),
                                             convert.deploy_spec(request))
        self.gateway.invalidate()
        return convert.deployment_to_proto(deployment)

    def Undeploy(self, request, context):
        deployment = self.deployments.undeploy(current_tenant_id(), request.name)
        self.gateway.invalidate()
        return convert.deployment_to_proto(deployment)

    def GetDeployment(self, request, context):
        return convert.deployment_to_proto(self.deployments.get(current_tenant_id(), request.name))

    def ListDeployments(self, request, context):
        items, token = self.deployments.list(current_tenant_id(), request.model, request.page_size, request.page_token)
        return inference_pb2.ListDeploymentsResponse(deployments=[convert.deployment_to_proto(d) for d in items],
                                                     next_page_token=token)

    def Predict(self, request, context):
        return self._predict(request, current_principal(), bearer_token(context.invocation_metadata()))

    def PredictStream(self, request_iterator, context):
        principal, key = current_principal(), bearer_token(context.invocation_metadata())
        for request in request_iterator:
            yield self._predict(request, principal, key)

    def _predict(self, request, principal, key):
        current_tenant_id()  # the admin key owns no deployments
        prediction = self.gateway.predict(principal, key, convert.target(request), convert.inputs(request),
                                          list(request.outputs))
        return convert.prediction_to_proto(prediction, request.request_id)
