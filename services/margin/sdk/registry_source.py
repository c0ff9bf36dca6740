"""What a service needs from the registry (version info, downloads), fetched over gRPC with the caller's own key,
so tenant isolation is the registry's: another tenant's version is NOT_FOUND here too."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from margin.common import protoconv
from margin.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from margin.common.tensors import Signature
from margin.sdk.channel import Connection, call_metadata
from margin.sdk.registry import RegistryClient
from margin.v1 import common_pb2, registry_pb2

FORMATS = {registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: "torchscript", registry_pb2.ARTIFACT_FORMAT_ONNX: "onnx",
           registry_pb2.ARTIFACT_FORMAT_SAFETENSORS: "safetensors",
           registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ: "dataset-npz",
           registry_pb2.ARTIFACT_FORMAT_MODEL_PACKAGE: "model-package"}
_ERRORS = {grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
           grpc.StatusCode.UNAVAILABLE: Unavailable}


@dataclass(frozen=True)
class VersionInfo:
    model: str
    number: int
    format: str
    signature: Signature
    metrics: dict[str, float]
    sha256: str
    size_bytes: int
    architecture: dict


def _domain_error(err: grpc.RpcError) -> Exception:
    kind = _ERRORS.get(err.code(), FailedPrecondition)
    return kind(f"registry: {err.details()}")


class RegistrySource:
    def __init__(self, address: str):
        self._channel = grpc.insecure_channel(address)

    def _client(self, api_key: str) -> RegistryClient:
        return RegistryClient(Connection(self._channel, call_metadata(api_key)))

    def version(self, api_key: str, model: str, number: int = 0, alias: str = "") -> VersionInfo:
        client = self._client(api_key)
        try:
            v = client.stub.GetVersion(registry_pb2.GetVersionRequest(
                version=common_pb2.VersionRef(model=model, number=number, alias=alias)),
                metadata=client.metadata, timeout=10)
        except grpc.RpcError as err:
            raise _domain_error(err) from None
        return VersionInfo(v.model, v.number, FORMATS.get(v.format, "unknown"),
                           protoconv.signature_from_proto(v.signature), dict(v.metrics), v.sha256, v.size_bytes,
                           protoconv.from_struct(v.architecture))

    def download(self, api_key: str, model: str, number: int, path: Path) -> None:
        try:
            self._client(api_key).download_to(common_pb2.VersionRef(model=model, number=number), path)
        except grpc.RpcError as err:
            raise _domain_error(err) from None

    def close(self) -> None:
        self._channel.close()
