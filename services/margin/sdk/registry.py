"""Registry client: streaming uploads with sha256, downloads verified on arrival."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from margin.sdk.channel import Connection
from margin.v1 import common_pb2, registry_pb2, registry_pb2_grpc

CHUNK = 1 << 20
Progress = Callable[[int], None]


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_chunks(path: Path, chunk: int = CHUNK, progress: Progress | None = None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if progress:
                progress(len(block))
            yield block


class DownloadError(RuntimeError):
    """The bytes received do not hash to the version's sha256."""


class RegistryClient:
    def __init__(self, conn: Connection):
        self.metadata = conn.metadata
        self.stub = registry_pb2_grpc.ModelRegistryStub(conn.channel)

    def create_model(self, name: str, description: str = "", labels: dict[str, str] | None = None):
        return self.stub.CreateModel(registry_pb2.CreateModelRequest(
            name=name, description=description, labels=labels or {}), metadata=self.metadata)

    def model_exists(self, name: str) -> bool:
        """Whether the caller's tenant has model ``name`` (GetModel; another tenant's reads as missing). An upload
        streams the whole file before the server looks at the model, so callers check first."""
        try:
            self.stub.GetModel(registry_pb2.GetModelRequest(name=name), metadata=self.metadata)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    def ensure_model(self, name: str, description: str = "") -> None:
        """Create the model unless it exists already."""
        try:
            self.create_model(name, description)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    def upload_chunks(self, metadata: registry_pb2.UploadMetadata, chunks: Iterator[bytes]):
        def messages() -> Iterator[registry_pb2.UploadVersionRequest]:
            yield registry_pb2.UploadVersionRequest(metadata=metadata)
            for chunk in chunks:
                yield registry_pb2.UploadVersionRequest(chunk=chunk)
        return self.stub.UploadVersion(messages(), metadata=self.metadata)

    def upload_file(self, path: Path, metadata: registry_pb2.UploadMetadata,
                    progress: Progress | None = None) -> registry_pb2.ModelVersion:
        """Upload ``path``; sha256 and size are filled in from the file."""
        meta = registry_pb2.UploadMetadata()
        meta.CopyFrom(metadata)
        meta.sha256 = sha256_file(path)
        meta.size_bytes = os.path.getsize(path)
        return self.upload_chunks(meta, file_chunks(path, progress=progress))

    def upload_bytes(self, data: bytes, metadata: registry_pb2.UploadMetadata) -> registry_pb2.ModelVersion:
        meta = registry_pb2.UploadMetadata()
        meta.CopyFrom(metadata)
        meta.sha256 = hashlib.sha256(data).hexdigest()
        meta.size_bytes = len(data)
        return self.upload_chunks(meta, iter([data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]))

    def download_to(self, ref: common_pb2.VersionRef, path: Path, chunk_size: int = 0,
                    progress: Progress | None = None) -> registry_pb2.ModelVersion:
        """Write the artifact to ``path`` (atomically) and check its sha256."""
        stream = self.stub.DownloadVersion(registry_pb2.DownloadVersionRequest(version=ref, chunk_size=chunk_size),
                                           metadata=self.metadata)
        version = next(stream).version
        digest = hashlib.sha256()
        tmp = Path(f"{path}.part")
        with open(tmp, "wb") as f:
            for message in stream:
                f.write(message.chunk)
                digest.update(message.chunk)
                if progress:
                    progress(len(message.chunk))
        if digest.hexdigest() != version.sha256:
            tmp.unlink(missing_ok=True)
            raise DownloadError(f"downloaded bytes hash to {digest.hexdigest()}, expected {version.sha256}")
        tmp.replace(path)
        return version

    def download_bytes(self, ref: common_pb2.VersionRef) -> tuple[registry_pb2.ModelVersion, bytes]:
        stream = self.stub.DownloadVersion(registry_pb2.DownloadVersionRequest(version=ref), metadata=self.metadata)
        version = next(stream).version
        return version, b"".join(m.chunk for m in stream)
