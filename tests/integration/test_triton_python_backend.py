"""A real ``tritonserver`` (from the nvidia-pytriton wheel) serving TorchScript through the python backend.

No mocks: the server runs as a child process (ManagedProcess + triton_spec), the model is exported with
export_version, loaded and unloaded through tritonclient, and every answer is compared with running the
TorchScript file directly.
"""
from __future__ import annotations

import asyncio
import hashlib
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from margin.cluster.processes import ManagedProcess, MissingDependency, ProcessSpec
from margin.common.tensors import Signature, TensorSpec
from margin.inference.triton_export import TritonOptions, export_version
from margin.inference.triton_process import find_triton, prepare_backend_dir, triton_spec
from margin.registry.domain import VersionRecord

torch = pytest.importorskip("torch")
triton_grpc = pytest.importorskip("tritonclient.grpc")
triton_aio = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    # torch.jit is deprecated in this torch release, but TorchScript is what the served model.pt is.
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning"),
]

SIGNATURE = Signature(inputs=(TensorSpec("input", "FP32", (-1, 64)),),
                      outputs=(TensorSpec("logits", "FP32", (-1, 10)),))
# A generous queue delay, so concurrent rows are batched even on a loaded 2-core machine.
OPTIONS = TritonOptions(max_batch_size=32, max_queue_delay_microseconds=20000, backend="python")
LOAD_TIMEOUT_S = 60.0


def _install_or_skip():
    try:
        return find_triton()
    except MissingDependency as exc:
        pytest.skip(str(exc))


@dataclass
class Triton:
    spec: ProcessSpec
    process: ManagedProcess
    repository: Path
    client: triton_grpc.InferenceServerClient
    started_s: float


@dataclass
class Served:
    name: str
    module: torch.jit.ScriptModule


@pytest.fixture(scope="module")
def triton(tmp_path_factory) -> Iterator[Triton]:
    _install_or_skip()
    home = tmp_path_factory.mktemp("triton-home")
    repository = home / "models"
    spec = triton_spec(home, repository)
    process = ManagedProcess(spec, home)
    client = None
    try:
        began = time.monotonic()
        process.start()
        process.wait_healthy(60)
        started = time.monotonic() - began
        print(f"\ntritonserver ready in {started:.2f}s on {spec.address}")
        client = triton_grpc.InferenceServerClient(spec.address)
        yield Triton(spec, process, repository, client, started)
    finally:
        if client is not None:
            client.close()
        process.stop()


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    path = tmp_path_factory.mktemp("artifact") / "mlp.pt"
    torch.jit.script(model).save(str(path))
    return path


def _version(path: Path) -> VersionRecord:
    data = path.read_bytes()
    return VersionRecord(
        model="mlp", number=1, format="torchscript", sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
        signature=SIGNATURE, architecture={}, parent=None, recipe={}, metrics={}, cost=None,
        created_at=datetime(2025, 1, 1, tzinfo=UTC), aliases=(), description="",
    )


def _deploy(triton: Triton, mlp_file: Path, name: str) -> Served:
    export_version(_version(mlp_file), mlp_file, triton.repository, name, OPTIONS)
    began = time.monotonic()
    triton.client.load_model(name)
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while not triton.client.is_model_ready(name):
        assert time.monotonic() < deadline, f"{name} not ready after {LOAD_TIMEOUT_S}s\n{triton.process.log_tail()}"
        time.sleep(0.05)
    print(f"\n{name} loaded in {time.monotonic() - began:.2f}s")
    return Served(name, torch.jit.load(str(mlp_file)))


@pytest.fixture(scope="module")
def mlp(triton, mlp_file) -> Served:
    return _deploy(triton, mlp_file, "mlp")


def _request(x: np.ndarray, name: str = "input", datatype: str = "FP32"):
    tensor = triton_grpc.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def _expected(served: Served, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return served.module(torch.from_numpy(x)).numpy()


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------


def test_spec_argv_and_env(tmp_path):
    install = _install_or_skip()
    spec = triton_spec(tmp_path / "home", tmp_path / "repo", grpc_port=18001, http_port=18000, metrics_port=18002)
    assert spec.kind == "triton" and spec.port == 18001 and spec.address == "127.0.0.1:18001"
    assert spec.ports == {"grpc": 18001, "http": 18000, "metrics": 18002}
    assert spec.argv[0] == str(install.binary)
    for flag in ("--model-control-mode=explicit", "--grpc-port=18001", "--http-port=18000", "--metrics-port=18002",
                 "--log-verbose=0", "--exit-on-error=false", "--strict-readiness=false",
                 f"--model-repository={(tmp_path / 'repo').resolve()}",
                 f"--backend-directory={(tmp_path / 'home' / 'triton' / 'backends').resolve()}"):
        assert flag in spec.argv
    libs = spec.env["LD_LIBRARY_PATH"].split(":")
    assert libs[:2] == [sysconfig.get_config_var("LIBDIR"), str(install.libs)]
    assert spec.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    backend = tmp_path / "home" / "triton" / "backends" / "python"
    assert sorted(p.name for p in backend.iterdir()) == [
        "libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert (backend / "triton_python_backend_stub").resolve() == install.stub.resolve()
    # Idempotent: assembling it again changes nothing.
    assert prepare_backend_dir(tmp_path / "home" / "triton" / "backends") == tmp_path / "home" / "triton" / "backends"
    assert not spec.healthy(timeout=0.2)  # nothing listens there


def test_server_is_healthy_and_models_load_only_when_asked(triton, mlp_file):
    assert triton.spec.healthy()
    assert triton.client.is_server_live() and triton.client.is_server_ready()
    export_version(_version(mlp_file), mlp_file, triton.repository, "idle", OPTIONS)
    assert not triton.client.is_model_ready("idle")  # explicit model control: in the repository, not loaded
    index = {m.name: m.state for m in triton.client.get_model_repository_index().models}
    assert "idle" in index and index["idle"] != "READY"


def test_infer_batch_1_and_7_match_torchscript(triton, mlp):
    for n, seed in ((1, 1), (7, 2)):
        x = _rows(n, seed)
        began = time.monotonic()
        result = triton.client.infer(mlp.name, [_request(x)],
                                     outputs=[triton_grpc.InferRequestedOutput("logits")])
        print(f"\nbatch {n}: {1000 * (time.monotonic() - began):.1f} ms")
        logits = result.as_numpy("logits")
        assert logits.shape == (n, 10) and logits.dtype == np.float32
        assert np.allclose(logits, _expected(mlp, x), atol=1e-5)


def test_concurrent_single_rows_are_batched_and_correct(triton, mlp):
    rows = _rows(16, 3)

    def stats():
        return triton.client.get_inference_statistics(mlp.name).model_stats[0]

    before = stats()

    async def main():
        client = triton_aio.InferenceServerClient(triton.spec.address)
        try:
            async def one(i: int):
                x = rows[i:i + 1]
                tensor = triton_aio.InferInput("input", [1, 64], "FP32")
                tensor.set_data_from_numpy(x)
                return (await client.infer(mlp.name, [tensor])).as_numpy("logits")
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(main())
    expected = _expected(mlp, rows)
    for i, logits in enumerate(results):
        assert logits.shape == (1, 10)
        assert np.allclose(logits, expected[i:i + 1], atol=1e-5), f"request {i}"
    after = stats()
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    print(f"\n16 concurrent rows: {executions} model executions")
    assert inferences == 16
    assert executions < 16  # the dynamic batcher gathered rows into shared forward passes


@pytest.mark.parametrize("shape, datatype, message", [
    ((2, 63), "FP32", "unexpected shape"),
    ((2, 64, 1), "FP32", "unexpected shape"),
    ((33, 64), "FP32", "batch-size must be <= 32"),
    ((2, 64), "FP64", "data-type"),
])
def test_bad_input_is_an_error_not_a_crash(triton, mlp, shape, datatype, message):
    x = np.zeros(shape, dtype=np.float64 if datatype == "FP64" else np.float32)
    with pytest.raises(InferenceServerException, match=message):
        triton.client.infer(mlp.name, [_request(x, datatype=datatype)])
    _assert_still_serving(triton, mlp)


def test_unknown_input_name_is_an_error(triton, mlp):
    with pytest.raises(InferenceServerException, match="wrong"):
        triton.client.infer(mlp.name, [_request(np.zeros((1, 64), np.float32), name="wrong")])
    _assert_still_serving(triton, mlp)


def _assert_still_serving(triton: Triton, mlp: Served) -> None:
    # The server and the model are still up and still right.
    assert triton.process.proc.poll() is None
    assert triton.client.is_server_ready() and triton.client.is_model_ready(mlp.name)
    x = _rows(3, 4)
    assert np.allclose(triton.client.infer(mlp.name, [_request(x)]).as_numpy("logits"), _expected(mlp, x),
                       atol=1e-5)


def test_unload_then_infer_is_an_error(triton, mlp_file):
    served = _deploy(triton, mlp_file, "mlp_unload")
    x = _rows(2, 5)
    assert np.allclose(triton.client.infer(served.name, [_request(x)]).as_numpy("logits"), _expected(served, x),
                       atol=1e-5)
    triton.client.unload_model(served.name)
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while triton.client.is_model_ready(served.name):
        assert time.monotonic() < deadline, "model still ready after unload"
        time.sleep(0.05)
    with pytest.raises(InferenceServerException):
        triton.client.infer(served.name, [_request(x)])
    assert triton.client.is_server_ready()


class Picky(torch.nn.Module):
    """Two outputs (one only the batch dimension), and a forward that fails on NaN input."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bool(torch.isnan(x).any()):
            raise ValueError("picky: NaN in input")
        return x * 2.0, x.sum(dim=1)


def test_one_failing_request_does_not_fail_its_batch(triton, tmp_path):
    path = tmp_path / "picky.pt"
    torch.jit.script(Picky()).save(str(path))
    data = path.read_bytes()
    signature = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),),
                          outputs=(TensorSpec("double", "FP32", (-1, 4)), TensorSpec("total", "FP32", (-1,))))
    version = VersionRecord(
        model="picky", number=1, format="torchscript", sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data), signature=signature, architecture={}, parent=None, recipe={}, metrics={},
        cost=None, created_at=datetime(2025, 1, 1, tzinfo=UTC), aliases=(), description="")
    export_version(version, path, triton.repository, "picky",
                   TritonOptions(max_batch_size=16, max_queue_delay_microseconds=20000, backend="python"))
    triton.client.load_model("picky")
    assert triton.client.is_model_ready("picky")
    rows = np.arange(32, dtype=np.float32).reshape(8, 4)
    rows[5, 2] = np.nan

    async def main():
        client = triton_aio.InferenceServerClient(triton.spec.address)
        try:
            async def one(i: int):
                tensor = triton_aio.InferInput("x", [1, 4], "FP32")
                tensor.set_data_from_numpy(rows[i:i + 1])
                result = await client.infer("picky", [tensor])
                return result.as_numpy("double"), result.as_numpy("total")
            return await asyncio.gather(*(one(i) for i in range(8)), return_exceptions=True)
        finally:
            await client.close()

    try:
        results = asyncio.run(main())
        assert isinstance(results[5], InferenceServerException) and "NaN in input" in str(results[5])
        for i, result in enumerate(results):
            if i == 5:
                continue
            assert not isinstance(result, BaseException), f"request {i}: {result}"
            double, total = result
            assert np.array_equal(double, rows[i:i + 1] * 2)
            assert total.shape == (1, 1) and total[0, 0] == rows[i].sum()  # dims [1] reshaped to a scalar
        stats = triton.client.get_inference_statistics("picky").model_stats[0]
        print(f"\npicky: 8 requests in {stats.execution_count} executions")
        assert stats.execution_count < 8  # the NaN row shared a batch, yet only it failed
        assert triton.client.is_model_ready("picky")
    finally:
        triton.client.unload_model("picky")
