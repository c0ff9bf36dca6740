"""Model packages (format ``model-package``) in the registry over real gRPC: stored with the architecture read from
their code, refused when they break the contract or the package cap (MARGIN_MAX_PACKAGE_BYTES), private to their
tenant, refused by Deploy and compression, and uploaded by ``margin models upload-package``."""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from margin.cli.main import app
from margin.common.costs import PriceCatalog
from margin.common.dispatch import Dispatcher
from margin.common.errors import InvalidArgument
from margin.common.jobcontrol import Caller
from margin.common.jobevents import JobEvents
from margin.common.jobs import JobStore
from margin.common.modelpackage import inspect_package
from margin.common.protoconv import from_struct, signature_to_proto, struct
from margin.compression.core import CompressionCore, CompressionRequest
from margin.inference.deployments import check_servable
from margin.inference.triton_export import TritonOptions
from margin.sdk.registry_source import RegistrySource
from margin.v1 import registry_pb2
from typer.testing import CliRunner

from tests.conftest import Cluster, running_cluster
from tests.onnx_models import LINEAR_SIGNATURE, linear_onnx
from tests.service.test_registry_service import meta, ref, status_of

PACKAGE = registry_pb2.ARTIFACT_FORMAT_MODEL_PACKAGE
CAP = 64 << 10  # the registry's MARGIN_MAX_PACKAGE_BYTES in these tests
MODEL = (b"import torch\n\n\ndef build_model(**config):\n    return torch.nn.Linear(config.get('width', 4), 2)\n\n\n"
         b"def loss(outputs, batch):\n    return outputs.sum()\n")
REFUSAL = ("model pkg v1 is a model package (code): train it with `margin train submit --package`, then deploy or "
           "compress the version it registers")
NO_ADDRESS = "redis://127.0.0.1:9/0"  # never reached: every refusal here comes before a job is queued


@pytest.fixture()
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """The shared test cluster, its registry started with MARGIN_MAX_PACKAGE_BYTES set to :data:`CAP`."""
    monkeypatch.setenv("MARGIN_MAX_PACKAGE_BYTES", str(CAP))
    with running_cluster(f"sqlite:///{tmp_path / 'margin.db'}", tmp_path / "artifacts") as c:
        yield c


def upload(cluster: Cluster, data: bytes, model: str = "pkg", tenant: str = "acme", **kw) -> registry_pb2.ModelVersion:
    client = cluster.client(tenant)
    client.ensure_model(model)
    return client.upload_bytes(data, meta(model, format=PACKAGE, **kw))


def refused(cluster: Cluster, data: bytes, **kw) -> str:
    """The details of an upload refused INVALID_ARGUMENT, after checking it left no version and no file behind."""
    code, details = status_of(lambda: upload(cluster, data, **kw))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    client = cluster.client()
    versions = client.stub.ListVersions(registry_pb2.ListVersionsRequest(model="pkg"), metadata=client.metadata)
    assert list(versions.versions) == [] and cluster.artifact_files() == []
    return details


def test_a_python_file_becomes_a_model_package_version_described_by_its_code(cluster):
    version = upload(cluster, MODEL, description="my code")
    assert (version.number, version.format, version.description) == (1, PACKAGE, "my code")
    assert from_struct(version.architecture) == inspect_package(MODEL, CAP).describe() == {
        "entry": "model.py", "files": ["model.py"], "defines": ["build_model", "loss"]}
    assert not version.signature.inputs and not version.signature.outputs
    stored, data = cluster.client().download_bytes(ref("pkg", 1))
    assert data == MODEL and from_struct(stored.architecture) == from_struct(version.architecture)


def test_a_package_that_does_not_parse_is_refused_and_no_version_is_made(cluster):
    details = refused(cluster, b"import torch\n\ndef build_model(**config)\n    return None\n")
    assert details == "model.py line 3: expected ':'"


def test_a_package_without_build_model_is_refused(cluster):
    assert refused(cluster, b"def make(**config):\n    return None\n").startswith(
        "model.py defines no build_model(**config) function")


def test_a_declared_signature_or_architecture_is_refused(cluster):
    expected = "a model package's description is read from its code; leave --signature/--architecture out"
    assert refused(cluster, MODEL, signature=signature_to_proto(LINEAR_SIGNATURE)) == expected
    assert refused(cluster, MODEL, architecture=struct({"family": "mlp"})) == expected


def test_a_package_over_the_cap_is_refused_before_it_is_stored(cluster):
    oversize = MODEL + b"#" * CAP
    limit = f"{CAP} bytes (a model package's cap, MARGIN_MAX_PACKAGE_BYTES)"
    assert refused(cluster, oversize) == (f"declared size {len(oversize)} bytes exceeds the upload limit of "
                                          f"{limit}")  # before a byte is sent
    client = cluster.client()
    undeclared = meta("pkg", format=PACKAGE, sha256=hashlib.sha256(oversize).hexdigest())
    code, details = status_of(lambda: client.upload_chunks(undeclared, iter([oversize[:CAP], oversize[CAP:]])))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, f"upload exceeds the limit of {limit}")  # streaming
    assert cluster.artifact_files() == []
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.py", MODEL)
        archive.writestr("padding.py", b"#" * CAP)  # a small zip, over the cap once inflated
    assert len(buffer.getvalue()) < CAP
    assert "declare" in refused(cluster, buffer.getvalue()) and "uncompressed" in refused(cluster, buffer.getvalue())


def test_the_package_cap_applies_to_packages_only(cluster):
    client = cluster.client()
    client.create_model("m")
    onnx = linear_onnx(os.urandom(2 * CAP))
    assert client.upload_bytes(onnx, meta("m")).size_bytes == len(onnx)


def test_another_tenant_cannot_see_a_package(cluster):
    upload(cluster, MODEL)
    other = cluster.client("other")
    for call in (lambda: other.stub.GetVersion(registry_pb2.GetVersionRequest(version=ref("pkg", 1)),
                                               metadata=other.metadata),
                 lambda: other.download_bytes(ref("pkg", 1))):
        assert status_of(call)[0] == grpc.StatusCode.NOT_FOUND


def test_deploy_refuses_a_package(cluster):
    upload(cluster, MODEL)
    source = RegistrySource(cluster.registry.server.address)
    try:
        version = source.version(cluster.keys["acme"], "pkg", 1)
    finally:
        source.close()
    assert version.format == "model-package"
    with pytest.raises(InvalidArgument) as info:
        check_servable(version, TritonOptions())
    assert str(info.value) == REFUSAL


def test_compression_refuses_a_package(cluster):
    upload(cluster, MODEL)
    acme = cluster.registry.context.tenants.get_tenant("acme")
    source = RegistrySource(cluster.registry.server.address)
    dispatcher = Dispatcher(NO_ADDRESS)
    core = CompressionCore(JobStore(cluster.registry.context.sessions, PriceCatalog.load()),
                           JobEvents.from_url(NO_ADDRESS), dispatcher, source, PriceCatalog.load(),
                           tenant_remaining=lambda tenant, category: None)
    try:
        with pytest.raises(InvalidArgument) as info:
            core.estimate(Caller(acme.id, "acme", cluster.keys["acme"]),
                          CompressionRequest(source=("pkg", 1, ""), recipe={"name": "q", "steps": []}))
    finally:
        source.close()
        dispatcher.close()
    assert str(info.value) == REFUSAL


def cli(cluster: Cluster, *args: str):
    return CliRunner().invoke(app, [*args, "--registry", cluster.registry.server.address,
                                    "--api-key", cluster.keys["acme"]])


def test_the_cli_uploads_a_folder_as_a_zipped_package(cluster, tmp_path):
    folder = tmp_path / "code"
    (folder / "layers" / "__pycache__").mkdir(parents=True)
    (folder / "model.py").write_bytes(MODEL + b"\n\ndef metrics(outputs, batch):\n    return {}\n")
    (folder / "layers" / "__init__.py").write_bytes(b"")
    (folder / "layers" / "linear.py").write_bytes(b"import torch\n")
    (folder / "layers" / "__pycache__" / "linear.cpython-311.py").write_bytes(b"\x00 not source")
    (folder / "README.md").write_text("not code")
    result = cli(cluster, "models", "upload-package", str(folder), "--model", "pkg", "--create",
                 "--description", "from a folder")
    assert result.exit_code == 0, result.output
    assert "pkg v1 defines: build_model, loss, metrics" in result.output
    version = cluster.client().stub.GetVersion(registry_pb2.GetVersionRequest(version=ref("pkg", 1)),
                                               metadata=cluster.client().metadata)
    assert from_struct(version.architecture)["files"] == ["layers/__init__.py", "layers/linear.py", "model.py"]
    assert version.description == "from a folder"


def test_the_cli_uploads_a_file_and_prints_a_refusal(cluster, tmp_path):
    good, bad = tmp_path / "mine.py", tmp_path / "broken.py"
    good.write_bytes(MODEL)
    bad.write_bytes(b"def build_model(:\n")
    assert cli(cluster, "models", "upload-package", str(good), "--model", "pkg", "--create").exit_code == 0
    result = cli(cluster, "models", "upload-package", str(bad), "--model", "pkg")
    assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output and "model.py line 1" in result.output
    missing = cli(cluster, "models", "upload-package", str(good), "--model", "nope")
    assert missing.exit_code == 1 and "does not exist" in missing.output
