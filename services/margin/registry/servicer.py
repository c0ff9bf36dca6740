"""The ModelRegistry gRPC servicer: validate, convert, call the core, convert back."""
from __future__ import annotations

from collections.abc import Iterator

from margin.common import protoconv
from margin.common.auth import current_tenant_id
from margin.common.errors import InvalidArgument
from margin.registry import convert
from margin.registry.core import RegistryCore
from margin.v1 import registry_pb2, registry_pb2_grpc

DEFAULT_CHUNK = 1 << 20
MAX_CHUNK = 4 << 20


class RegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    def __init__(self, core: RegistryCore):
        self.core = core

    def CreateModel(self, request, context):
        return convert.model_to_proto(self.core.create_model(
            current_tenant_id(), request.name, request.description, dict(request.labels)))

    def GetModel(self, request, context):
        return convert.model_to_proto(self.core.get_model(current_tenant_id(), request.name))

    def ListModels(self, request, context):
        models, token = self.core.list_models(current_tenant_id(), request.page_size, request.page_token,
                                              dict(request.label_selector))
        return registry_pb2.ListModelsResponse(models=[convert.model_to_proto(m) for m in models],
                                               next_page_token=token)

    def UploadVersion(self, request_iterator, context):
        tenant = current_tenant_id()
        messages = iter(request_iterator)
        first = next(messages, None)
        if first is None:
            raise InvalidArgument("empty upload: the stream had no messages")
        if first.WhichOneof("payload") != "metadata":
            raise InvalidArgument("the first UploadVersion message must carry metadata, not a chunk")
        with self.core.begin_upload(tenant, convert.upload_request(first.metadata)) as upload:
            for message in messages:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("metadata may be sent only once, in the first message")
                upload.write(message.chunk)
            record = upload.commit()
        return convert.version_to_proto(record)

    def GetVersion(self, request, context):
        return convert.version_to_proto(self.core.get_version(current_tenant_id(), convert.selector(request.version)))

    def ListVersions(self, request, context):
        versions, token = self.core.list_versions(current_tenant_id(), request.model, request.page_size,
                                                  request.page_token)
        return registry_pb2.ListVersionsResponse(versions=[convert.version_to_proto(v) for v in versions],
                                                 next_page_token=token)

    def DownloadVersion(self, request, context) -> Iterator[registry_pb2.DownloadVersionResponse]:
        chunk_size = request.chunk_size or DEFAULT_CHUNK
        if not 0 < chunk_size <= MAX_CHUNK:
            raise InvalidArgument(f"chunk_size must be between 1 and {MAX_CHUNK} bytes")
        record, chunks = self.core.open_version(current_tenant_id(), convert.selector(request.version), chunk_size)
        yield registry_pb2.DownloadVersionResponse(version=convert.version_to_proto(record))
        for chunk in chunks:
            yield registry_pb2.DownloadVersionResponse(chunk=chunk)

    def SetAlias(self, request, context):
        model, alias, number = self.core.set_alias(current_tenant_id(), request.model, request.alias, request.number)
        return registry_pb2.Alias(model=model, alias=alias, number=number)

    def DeleteAlias(self, request, context):
        self.core.delete_alias(current_tenant_id(), request.model, request.alias)
        return registry_pb2.DeleteAliasResponse()

    def GetLineage(self, request, context):
        chain, total = self.core.lineage(current_tenant_id(), convert.selector(request.version))
        currency = next((v.cost.currency for v in chain if v.cost), "USD")
        return registry_pb2.Lineage(chain=[convert.version_to_proto(v) for v in chain],
                                    total_cost=protoconv.money(total, currency))

    def AttachMetrics(self, request, context):
        return convert.version_to_proto(self.core.attach_metrics(
            current_tenant_id(), convert.selector(request.version), dict(request.metrics)))
