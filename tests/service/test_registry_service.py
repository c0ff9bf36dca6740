"""The registry over real gRPC: uploads, downloads, aliases, lineage, paging, and bad input."""
from __future__ import annotations

import hashlib
import io
import os
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from margin.common.protoconv import signature_from_proto, signature_to_proto
from margin.common.tensors import Signature, TensorSpec
from margin.v1 import common_pb2, registry_pb2
from onnx import TensorProto, helper
from safetensors.torch import save as safetensors_save

from tests.conftest import MAX_UPLOAD
from tests.onnx_models import LINEAR_SIGNATURE, embedding_onnx, identity_onnx, linear_onnx

OPAQUE = registry_pb2.ARTIFACT_FORMAT_ONNX  # uploads are linear_onnx(payload): any payload makes a valid model


def meta(model: str = "m", **kw) -> registry_pb2.UploadMetadata:
    return registry_pb2.UploadMetadata(model=model, format=kw.pop("format", OPAQUE), **kw)


def ref(model: str = "m", number: int = 0, alias: str = "") -> common_pb2.VersionRef:
    return common_pb2.VersionRef(model=model, number=number, alias=alias)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_upload_download_round_trip_is_byte_identical(cluster, tmp_path):
    client = cluster.client()
    client.create_model("m")
    data = linear_onnx(os.urandom(3 * (1 << 20) + 12345))  # several chunks, last one partial
    version = client.upload_bytes(data, meta(metrics={"accuracy": 0.97}, description="first"))
    assert (version.number, version.size_bytes) == (1, len(data))
    assert version.sha256 == hashlib.sha256(data).hexdigest()

    got_version, got = client.download_bytes(ref(number=1))
    assert got == data and got_version.sha256 == version.sha256
    path = tmp_path / "out.bin"
    client.download_to(ref(), path, chunk_size=64 * 1024)  # latest, small chunks
    assert path.read_bytes() == data


def test_ten_concurrent_uploads_get_versions_1_to_10(cluster):
    client = cluster.client()
    client.create_model("m")
    payloads = [linear_onnx(os.urandom(200_000 + i)) for i in range(10)]
    barrier = threading.Barrier(10)

    def upload(data: bytes) -> registry_pb2.ModelVersion:
        barrier.wait()
        return client.upload_bytes(data, meta())

    with ThreadPoolExecutor(10) as pool:
        versions = list(pool.map(upload, payloads))
    assert sorted(v.number for v in versions) == list(range(1, 11))
    for v, data in zip(versions, payloads, strict=True):  # each number holds the bytes that were sent for it
        assert client.download_bytes(ref(number=v.number))[1] == data
    model = client.stub.GetModel(registry_pb2.GetModelRequest(name="m"), metadata=client.metadata)
    assert model.latest_version == 10


def test_uploads_with_the_same_idempotency_key_make_one_version_even_when_concurrent(cluster):
    client = cluster.client()
    client.create_model("m")
    barrier = threading.Barrier(6)

    def upload(i: int) -> registry_pb2.ModelVersion:
        barrier.wait()
        return client.upload_bytes(linear_onnx(os.urandom(100_000)), meta(idempotency_key="job:42"))

    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(upload, range(6)))
    assert {v.number for v in versions} == {1} and len({v.sha256 for v in versions}) == 1
    assert client.upload_bytes(linear_onnx(b"other"), meta(idempotency_key="job:43")).number == 2
    assert client.upload_bytes(linear_onnx(b"again"), meta(idempotency_key="job:42")).number == 1
    listed = client.stub.ListVersions(registry_pb2.ListVersionsRequest(model="m"), metadata=client.metadata)
    assert [v.number for v in listed.versions] == [1, 2]
    assert len(cluster.artifact_files()) == 2  # the duplicates' bytes were discarded


def test_versions_carry_metadata_aliases_and_lineage(cluster):
    client = cluster.client()
    client.create_model("base")
    client.create_model("small")
    arch = {"family": "mlp", "input_dim": 64, "hidden": [128], "num_classes": 10}
    cost = common_pb2.Cost(total=common_pb2.Money(currency="USD", micros=1500), device_class="cpu", device_hours=0.01)
    weights = safetensors_save({"w": torch.zeros(3)})
    root = client.upload_bytes(weights, meta("base", format=registry_pb2.ARTIFACT_FORMAT_SAFETENSORS,
                                             architecture=_struct(arch), cost=cost,
                                             recipe=_struct({"kind": "training", "epochs": 3})))
    child = client.upload_bytes(linear_onnx(b"scripted"), meta("small", parent=ref("base", 1), cost=common_pb2.Cost(
        total=common_pb2.Money(currency="USD", micros=250)), recipe=_struct({"kind": "quantize"})))
    assert child.parent.model == "base" and child.parent.number == root.number
    assert dict(child.recipe)["kind"] == "quantize"

    md = client.metadata
    client.stub.SetAlias(registry_pb2.SetAliasRequest(model="small", alias="production", number=1), metadata=md)
    by_alias = client.stub.GetVersion(registry_pb2.GetVersionRequest(version=ref("small", alias="production")),
                                      metadata=md)
    assert by_alias.number == 1 and list(by_alias.aliases) == ["production"]

    lineage = client.stub.GetLineage(registry_pb2.GetLineageRequest(version=ref("small", alias="production")),
                                     metadata=md)
    assert [(v.model, v.number) for v in lineage.chain] == [("small", 1), ("base", 1)]
    assert lineage.total_cost.micros == 1750
    assert dict(lineage.chain[1].architecture)["family"] == "mlp"

    updated = client.stub.AttachMetrics(registry_pb2.AttachMetricsRequest(
        version=ref("small", 1), metrics={"latency_p50_ms": 1.5}), metadata=md)
    assert dict(updated.metrics) == {"latency_p50_ms": 1.5}

    client.stub.DeleteAlias(registry_pb2.DeleteAliasRequest(model="small", alias="production"), metadata=md)
    code, _ = status_of(lambda: client.stub.GetVersion(
        registry_pb2.GetVersionRequest(version=ref("small", alias="production")), metadata=md))
    assert code == grpc.StatusCode.NOT_FOUND


def test_list_models_pages_and_filters_by_label(cluster):
    client = cluster.client()
    for i in range(7):
        client.create_model(f"m{i}", labels={"team": "a" if i % 2 else "b"})
    names, token = [], ""
    while True:
        reply = client.stub.ListModels(registry_pb2.ListModelsRequest(page_size=3, page_token=token),
                                       metadata=client.metadata)
        assert len(reply.models) <= 3
        names += [m.name for m in reply.models]
        if not (token := reply.next_page_token):
            break
    assert names == [f"m{i}" for i in range(7)]
    team_a = client.stub.ListModels(registry_pb2.ListModelsRequest(label_selector={"team": "a"}),
                                    metadata=client.metadata)
    assert [m.name for m in team_a.models] == ["m1", "m3", "m5"]
    code, msg = status_of(lambda: client.stub.ListModels(registry_pb2.ListModelsRequest(page_token="garbage"),
                                                         metadata=client.metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in msg


def _struct(d):
    from margin.common.protoconv import struct
    return struct(d)


def test_a_real_onnx_model_is_accepted_with_the_signature_of_its_graph(cluster):
    client = cluster.client()
    client.create_model("m")
    data = linear_onnx(b"weights")
    version = client.upload_bytes(data, meta(signature=signature_to_proto(LINEAR_SIGNATURE)))
    assert version.number == 1 and version.format == registry_pb2.ARTIFACT_FORMAT_ONNX
    assert [(t.name, list(t.shape)) for t in version.signature.outputs] == [("y", [-1, 3])]
    assert client.download_bytes(ref(number=1))[1] == data


def test_an_onnx_model_uploaded_without_a_signature_is_stored_with_its_graphs(cluster):
    client = cluster.client()
    client.create_model("m")
    uploaded = client.upload_bytes(embedding_onnx(), meta())
    got = client.stub.GetVersion(registry_pb2.GetVersionRequest(version=ref(number=uploaded.number)),
                                 metadata=client.metadata)
    derived = Signature((TensorSpec("ids", "INT64", (-1, -1)),), (TensorSpec("vectors", "FP32", (-1, -1, 4)),))
    assert signature_from_proto(uploaded.signature) == derived
    assert signature_from_proto(got.signature) == derived


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_a_dataset_is_stored_with_its_manifest_as_its_signature(cluster):
    client = cluster.client()
    client.create_model("data")
    data = _npz(ids=np.zeros((6, 5), np.int64), mask=np.ones((6, 5), np.uint8), y=np.arange(6, dtype=np.int32))
    uploaded = client.upload_bytes(data, meta("data", format=NPZ))
    got = client.stub.GetVersion(registry_pb2.GetVersionRequest(version=ref("data", uploaded.number)),
                                 metadata=client.metadata)
    manifest = Signature((TensorSpec("ids", "INT64", (6, 5)), TensorSpec("mask", "UINT8", (6, 5))),
                         (TensorSpec("y", "INT32", (6,)),))
    assert signature_from_proto(uploaded.signature) == manifest
    assert signature_from_proto(got.signature) == manifest
    assert client.download_bytes(ref("data", uploaded.number))[1] == data


# -- uploads that are not what they claim to be -----------------------------------------------------------------
TS = registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT
NPZ = registry_pb2.ARTIFACT_FORMAT_DATASET_NPZ
WRONG_SIGNATURE = Signature((TensorSpec("x", "FP32", (-1, 5)),), (TensorSpec("y", "INT64", (-1, 3)),))


def _torch_export_pt2() -> bytes:
    """A torch.export program (.pt2): a zip, like TorchScript, but not TorchScript."""
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(torch.nn.Linear(4, 3), (torch.zeros(2, 4),)), buffer)
    return buffer.getvalue()


def _torch_save() -> bytes:
    """What torch.save writes: a zip with data.pkl (a pickle) and no TorchScript code."""
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(4, 3).state_dict(), buffer)
    return buffer.getvalue()


def _plain_zip(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/notes.txt", payload)
    return buffer.getvalue()


# -- bad input: the right status, and nothing left behind ------------------------------------------------
def _raw_upload(client, messages):
    return client.stub.UploadVersion(iter(messages), metadata=client.metadata)


def _data_msgs(data: bytes, **kw):
    m = meta(**kw)
    m.sha256 = kw.get("sha256") or hashlib.sha256(data).hexdigest()
    return [registry_pb2.UploadVersionRequest(metadata=m)] + [
        registry_pb2.UploadVersionRequest(chunk=data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]


BAD_UPLOADS = {
    "unknown model": (lambda d: _data_msgs(d, model="nope"), grpc.StatusCode.NOT_FOUND, "not found"),
    "empty upload": (lambda d: [registry_pb2.UploadVersionRequest(
        metadata=meta(sha256=hashlib.sha256(b"").hexdigest()))],
                     grpc.StatusCode.INVALID_ARGUMENT, "empty upload"),
    "no messages": (lambda d: [], grpc.StatusCode.INVALID_ARGUMENT, "no messages"),
    "chunk before metadata": (lambda d: [registry_pb2.UploadVersionRequest(chunk=d)], grpc.StatusCode.INVALID_ARGUMENT,
                              "first UploadVersion message must carry metadata"),
    "metadata twice": (lambda d: [*_data_msgs(d), registry_pb2.UploadVersionRequest(metadata=meta())],
                       grpc.StatusCode.INVALID_ARGUMENT, "only once"),
    "sha256 mismatch": (lambda d: _data_msgs(d, sha256="0" * 64), grpc.StatusCode.INVALID_ARGUMENT, "sha256 mismatch"),
    "sha256 missing": (lambda d: [registry_pb2.UploadVersionRequest(metadata=meta()),
                                  registry_pb2.UploadVersionRequest(chunk=d)],
                       grpc.StatusCode.INVALID_ARGUMENT, "sha256"),
    "over the size limit": (lambda d: _data_msgs(os.urandom(MAX_UPLOAD + 1)), grpc.StatusCode.INVALID_ARGUMENT,
                            "exceeds the limit"),
    "declared size over the limit": (lambda d: _data_msgs(d, size_bytes=MAX_UPLOAD + 1),
                                     grpc.StatusCode.INVALID_ARGUMENT, "exceeds the upload limit"),
    "declared size differs": (lambda d: _data_msgs(d, size_bytes=len(d) + 5), grpc.StatusCode.INVALID_ARGUMENT,
                              "declared"),
    "format unset": (lambda d: _data_msgs(d, format=registry_pb2.ARTIFACT_FORMAT_UNSPECIFIED),
                     grpc.StatusCode.INVALID_ARGUMENT, "format"),
    "safetensors without architecture": (lambda d: _data_msgs(d, format=registry_pb2.ARTIFACT_FORMAT_SAFETENSORS),
                                         grpc.StatusCode.INVALID_ARGUMENT, "architecture"),
    "unknown parent": (lambda d: _data_msgs(d, parent=ref("m", 42)), grpc.StatusCode.NOT_FOUND, "m v42"),
    "path in model name": (lambda d: _data_msgs(d, model="../x"), grpc.StatusCode.INVALID_ARGUMENT, "not allowed"),
    "torchscript that is not one": (lambda d: _data_msgs(d, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT),
                                    grpc.StatusCode.INVALID_ARGUMENT, "not a TorchScript archive"),
    "random bytes as onnx": (lambda d: _data_msgs(d), grpc.StatusCode.INVALID_ARGUMENT, "ONNX model"),
    "onnx whose graph is not its signature": (
        lambda d: _data_msgs(linear_onnx(d), signature=signature_to_proto(WRONG_SIGNATURE)),
        grpc.StatusCode.INVALID_ARGUMENT, "declared input x: FP32[-1, 5], the graph has x: FP32[batch, 4]"),
    "onnx without a signature whose graph has none Margin can write": (
        lambda d: _data_msgs(identity_onnx(helper.make_tensor_type_proto(TensorProto.UINT32, ["batch", 4]))),
        grpc.StatusCode.INVALID_ARGUMENT, "Margin has no dtype for UINT32"),
    "torch.export pt2 as torchscript": (lambda d: _data_msgs(_torch_export_pt2(), format=TS),
                                        grpc.StatusCode.INVALID_ARGUMENT, "torch.export program (.pt2)"),
    "torch.save file as torchscript": (lambda d: _data_msgs(_torch_save(), format=TS),
                                       grpc.StatusCode.INVALID_ARGUMENT, "torch.save file"),
    "plain zip as torchscript": (lambda d: _data_msgs(_plain_zip(d), format=TS),
                                 grpc.StatusCode.INVALID_ARGUMENT, "zip archive but not a TorchScript archive"),
    "npz with an object array": (lambda d: _data_msgs(_npz(x=np.array([{"a": 1}, None]), y=np.zeros(2, np.int64)),
                                                      format=NPZ),
                                 grpc.StatusCode.INVALID_ARGUMENT, "array 'x' is an object array"),
    "npz declared with a signature that is not its manifest": (
        lambda d: _data_msgs(_npz(x=np.zeros((2, 5), np.float32), y=np.zeros(2, np.int64)), format=NPZ,
                             signature=signature_to_proto(WRONG_SIGNATURE)),
        grpc.StatusCode.INVALID_ARGUMENT, "a dataset's manifest is read from its arrays; leave --signature out"),
    "random bytes as npz": (lambda d: _data_msgs(d, format=NPZ), grpc.StatusCode.INVALID_ARGUMENT,
                            "not a .npz dataset"),
    "safetensors that is not one": (lambda d: _data_msgs(d, format=registry_pb2.ARTIFACT_FORMAT_SAFETENSORS,
                                                         architecture=_struct({"family": "mlp"})),
                                    grpc.StatusCode.INVALID_ARGUMENT, "not a safetensors file"),
    "undefined dtype number": (lambda d: _data_msgs(d, signature=common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="x", dtype=99, shape=[-1, 4])])), grpc.StatusCode.INVALID_ARGUMENT,
        "not a margin.v1.DType"),
    "bad dtype in signature": (lambda d: _data_msgs(d, signature=common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="x", shape=[-1, 4])])), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_get_a_clear_status_and_leave_nothing(cluster, case):
    client = cluster.client()
    client.create_model("m")
    good = client.upload_bytes(linear_onnx(b"v1 bytes"), meta())
    files_before = cluster.artifact_files()
    build, code, fragment = BAD_UPLOADS[case]
    got_code, details = status_of(lambda: _raw_upload(client, build(os.urandom(4096))))
    assert got_code == code, details
    assert fragment in details
    assert cluster.artifact_files() == files_before  # no partial or stray file
    versions = client.stub.ListVersions(registry_pb2.ListVersionsRequest(model="m"), metadata=client.metadata)
    assert [v.number for v in versions.versions] == [good.number]
    assert client.download_bytes(ref(number=1))[1] == linear_onnx(b"v1 bytes")


def test_cancelled_upload_leaves_nothing(cluster):
    client = cluster.client()
    client.create_model("m")
    sent = threading.Event()

    def messages():
        m = meta()
        m.sha256 = "a" * 64
        yield registry_pb2.UploadVersionRequest(metadata=m)
        yield registry_pb2.UploadVersionRequest(chunk=os.urandom(1 << 20))
        sent.set()
        threading.Event().wait(10)  # hang until cancelled
        yield registry_pb2.UploadVersionRequest(chunk=b"never")

    future = client.stub.UploadVersion.future(messages(), metadata=client.metadata)
    assert sent.wait(5)
    import time
    time.sleep(0.3)
    future.cancel()
    deadline = time.monotonic() + 5
    while cluster.artifact_files() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.artifact_files() == []
    assert client.stub.GetModel(registry_pb2.GetModelRequest(name="m"), metadata=client.metadata).latest_version == 0


BAD_CALLS = {
    "duplicate model": (lambda s, md: s.CreateModel(registry_pb2.CreateModelRequest(name="m"), metadata=md),
                        grpc.StatusCode.ALREADY_EXISTS),
    "dotdot name": (lambda s, md: s.CreateModel(registry_pb2.CreateModelRequest(name="a..b"), metadata=md),
                    grpc.StatusCode.INVALID_ARGUMENT),
    "slash name": (lambda s, md: s.CreateModel(registry_pb2.CreateModelRequest(name="a/b"), metadata=md),
                   grpc.StatusCode.INVALID_ARGUMENT),
    "long name": (lambda s, md: s.CreateModel(registry_pb2.CreateModelRequest(name="a" * 101), metadata=md),
                  grpc.StatusCode.INVALID_ARGUMENT),
    "unknown model": (lambda s, md: s.GetModel(registry_pb2.GetModelRequest(name="nope"), metadata=md),
                      grpc.StatusCode.NOT_FOUND),
    "unknown version": (lambda s, md: s.GetVersion(registry_pb2.GetVersionRequest(version=ref(number=9)), metadata=md),
                        grpc.StatusCode.NOT_FOUND),
    "number and alias": (lambda s, md: s.GetVersion(registry_pb2.GetVersionRequest(
        version=ref(number=1, alias="x")), metadata=md), grpc.StatusCode.INVALID_ARGUMENT),
    "download unknown": (lambda s, md: list(s.DownloadVersion(registry_pb2.DownloadVersionRequest(
        version=ref(number=9)), metadata=md)), grpc.StatusCode.NOT_FOUND),
    "download huge chunk": (lambda s, md: list(s.DownloadVersion(registry_pb2.DownloadVersionRequest(
        version=ref(number=1), chunk_size=64 << 20), metadata=md)), grpc.StatusCode.INVALID_ARGUMENT),
    "numeric alias": (lambda s, md: s.SetAlias(registry_pb2.SetAliasRequest(model="m", alias="7", number=1),
                                               metadata=md), grpc.StatusCode.INVALID_ARGUMENT),
    "alias to missing version": (lambda s, md: s.SetAlias(registry_pb2.SetAliasRequest(
        model="m", alias="prod", number=5), metadata=md), grpc.StatusCode.NOT_FOUND),
    "delete missing alias": (lambda s, md: s.DeleteAlias(registry_pb2.DeleteAliasRequest(model="m", alias="prod"),
                                                         metadata=md), grpc.StatusCode.NOT_FOUND),
    "nan metric": (lambda s, md: s.AttachMetrics(registry_pb2.AttachMetricsRequest(
        version=ref(number=1), metrics={"acc": float("nan")}), metadata=md), grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_calls_get_the_right_status(cluster, case):
    client = cluster.client()
    client.create_model("m")
    client.upload_bytes(linear_onnx(b"x"), meta())
    call, code = BAD_CALLS[case]
    got, details = status_of(lambda: call(client.stub, client.metadata))
    assert got == code, details
    assert details  # a human-readable message, never empty
