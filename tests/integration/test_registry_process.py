"""The registry as a real process: SIGKILL mid-upload loses nothing, SIGTERM drains in-flight calls."""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from margin.cluster.processes import ManagedProcess, free_port, standalone_service_spec
from margin.common.db import make_engine, make_sessionmaker
from margin.common.tenancy import TenantStore
from margin.sdk import RegistryClient, connect
from margin.v1 import common_pb2, registry_pb2

from tests.onnx_models import linear_onnx


def registry_process(tmp: Path, port: int) -> ManagedProcess:
    spec = standalone_service_spec("registry", "margin.registry", tmp, port=port, MARGIN_GRACE_SECONDS="20",
                                   MARGIN_LOG_FORMAT="json")
    child = ManagedProcess(spec, tmp)
    child.start()
    child.wait_healthy(30)
    return child


@pytest.fixture()
def setup(tmp_path):
    store = TenantStore(make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'margin.db'}")))
    store.create_tenant("acme")
    key, _ = store.create_api_key("acme")
    port = free_port()
    child = registry_process(tmp_path, port)
    yield tmp_path, port, key, child
    child.stop()


def meta() -> registry_pb2.UploadMetadata:
    return registry_pb2.UploadMetadata(model="m", format=registry_pb2.ARTIFACT_FORMAT_ONNX)


def part_files(tmp: Path) -> list[Path]:
    return list((tmp / "artifacts").rglob("*.part"))


def test_killed_mid_upload_keeps_earlier_versions_and_shows_no_partial(setup):
    tmp, port, key, child = setup
    client = RegistryClient(connect(f"127.0.0.1:{port}", key))
    client.create_model("m")
    earlier = {}
    for _ in range(3):
        data = linear_onnx(os.urandom(500_000))
        earlier[client.upload_bytes(data, meta()).number] = hashlib.sha256(data).hexdigest()

    halfway, release = threading.Event(), threading.Event()

    def slow_chunks():
        for _ in range(2):
            yield os.urandom(1 << 20)
        halfway.set()
        release.wait(30)  # the server dies while we wait
        yield b"never sent"

    m = meta()
    m.sha256 = "b" * 64
    future = client.stub.UploadVersion.future(_messages(m, slow_chunks()), metadata=client.metadata)
    assert halfway.wait(10)
    deadline = time.monotonic() + 5
    while not any(p.stat().st_size >= 2 << 20 for p in part_files(tmp)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert part_files(tmp), "the partial upload should be on disk before the kill"
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait()
    with pytest.raises(grpc.RpcError) as info:
        future.result(timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    release.set()

    restarted = registry_process(tmp, port)
    try:
        client = RegistryClient(connect(f"127.0.0.1:{port}", key))
        versions = client.stub.ListVersions(registry_pb2.ListVersionsRequest(model="m"), metadata=client.metadata)
        assert [v.number for v in versions.versions] == [1, 2, 3]
        for number, digest in earlier.items():
            _, data = client.download_bytes(common_pb2.VersionRef(model="m", number=number))
            assert hashlib.sha256(data).hexdigest() == digest
        assert part_files(tmp) == []  # the dead process's partial upload was cleaned at start
        assert len(list((tmp / "artifacts").rglob("*.bin"))) == 3
        assert client.upload_bytes(linear_onnx(b"after restart"), meta()).number == 4
    finally:
        restarted.stop()


def _messages(m, chunks):
    yield registry_pb2.UploadVersionRequest(metadata=m)
    for chunk in chunks:
        yield registry_pb2.UploadVersionRequest(chunk=chunk)


def test_sigterm_drains_an_in_flight_upload_then_exits_cleanly(setup):
    _, port, key, child = setup
    client = RegistryClient(connect(f"127.0.0.1:{port}", key))
    client.create_model("m")
    blob = linear_onnx(os.urandom(1_200_000))
    chunks = [blob[i:i + 300_000] for i in range(0, len(blob), 300_000)]
    started = threading.Event()

    def paced():
        for i, chunk in enumerate(chunks):
            if i == 1:
                started.set()
            time.sleep(0.4)
            yield chunk

    m = meta()
    m.sha256 = hashlib.sha256(b"".join(chunks)).hexdigest()
    future = client.stub.UploadVersion.future(_messages(m, paced()), metadata=client.metadata)
    assert started.wait(10)
    child.proc.send_signal(signal.SIGTERM)
    version = future.result(timeout=20)  # the in-flight call finishes during the grace period
    assert version.number == 1 and version.size_bytes == sum(map(len, chunks))
    assert child.proc.wait(20) == 0
    assert "draining" in child.log_path.read_text()
