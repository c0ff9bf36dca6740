"""Unit tests for margin.inference.triton_export: config.pbtxt text and the exported model folder."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from margin.common.errors import FailedPrecondition, InvalidArgument
from margin.common.tensors import Signature, TensorSpec
from margin.inference.triton_export import (
    TRITON_DTYPES,
    TritonOptions,
    backends_for,
    export_version,
    triton_config,
)
from margin.registry.domain import VersionRecord

# torch.jit is deprecated in this torch release, but TorchScript is what Triton's libtorch backend loads.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

MLP = Signature(
    inputs=(TensorSpec("input", "FP32", (-1, 64)),),
    outputs=(TensorSpec("logits__0", "FP32", (-1, 10)),),
)
MLP_OPTIONS = TritonOptions(max_batch_size=32, preferred_batch_sizes=(8, 16),
                            max_queue_delay_microseconds=500, instance_count=2)

MLP_CONFIG = """\
name: "mlp"
platform: "pytorch_libtorch"
max_batch_size: 32
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }
]
output [
  {
    name: "logits__0"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 8, 16 ]
  max_queue_delay_microseconds: 500
}
instance_group [
  {
    count: 2
    kind: KIND_CPU
  }
]
"""


PY_MLP = Signature(
    inputs=(TensorSpec("input", "FP32", (-1, 64)),),
    outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
)
PY_OPTIONS = TritonOptions(max_batch_size=32, max_queue_delay_microseconds=2000, backend="python")

PY_MLP_CONFIG = """\
name: "mlp"
backend: "python"
max_batch_size: 32
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
dynamic_batching {
  max_queue_delay_microseconds: 2000
}
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
"""

# The generic python-backend model.py, as the source tree holds it.
PYTHON_MODEL = Path(__file__).resolve().parents[2] / "services" / "margin" / "inference" / "triton_python_model.py"


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"tritonclient's ModelConfig proto is not importable: {exc}")
    return model_config_pb2


def _parse(text: str):
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    return text_format.Parse(text, pb2.ModelConfig()), pb2


# ---------------------------------------------------------------------------------------------------------
# config text


def test_mlp_config_exact_text():
    assert triton_config("mlp", MLP, MLP_OPTIONS) == MLP_CONFIG


def test_mlp_config_parses_as_triton_model_config():
    config, pb2 = _parse(triton_config("mlp", MLP, MLP_OPTIONS))
    assert config.name == "mlp"
    assert config.platform == "pytorch_libtorch"
    assert config.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input", pb2.TYPE_FP32, [64])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits__0", pb2.TYPE_FP32, [10])]
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert len(config.instance_group) == 1
    assert config.instance_group[0].count == 2
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU


def test_python_backend_config_exact_text():
    assert triton_config("mlp", PY_MLP, PY_OPTIONS) == PY_MLP_CONFIG


def test_python_backend_config_parses_with_backend_not_platform():
    config, pb2 = _parse(triton_config("mlp", PY_MLP, PY_OPTIONS))
    assert config.backend == "python" and config.platform == ""
    assert [o.name for o in config.output] == ["logits"]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU


@pytest.mark.parametrize("name", ["logits", "scores__x", "probs__0"])
def test_python_backend_outputs_may_have_any_name(name):
    sig = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec(name, "FP32", (-1, 2)),))
    assert f'name: "{name}"' in triton_config("m", sig, TritonOptions(backend="python"))


def test_python_backend_gpu_instances():
    text = triton_config("mlp", PY_MLP, TritonOptions(backend="python", instance_kind="KIND_GPU", instance_count=2))
    config, pb2 = _parse(text)
    assert config.backend == "python"
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert config.instance_group[0].count == 2


def test_python_backend_keeps_batching_rules():
    sig = Signature(inputs=(TensorSpec("x", "FP32", (4,)),), outputs=(TensorSpec("y", "FP32", (2,)),))
    with pytest.raises(InvalidArgument, match="first dimension is not -1"):
        triton_config("m", sig, TritonOptions(backend="python", max_batch_size=8))
    text = triton_config("m", sig, TritonOptions(backend="python", max_batch_size=0))
    assert 'backend: "python"' in text and "dims: [ 4 ]" in text and "dynamic_batching" not in text


def test_backends_for_each_format_default_first():
    assert backends_for("torchscript") == ["pytorch_libtorch", "python"]
    assert backends_for("onnx") == ["onnxruntime", "python"]
    assert backends_for("safetensors") == []


def test_every_dtype_maps_to_a_triton_data_type():
    _, pb2 = _parse("")
    for triton_type in TRITON_DTYPES.values():
        assert pb2.DataType.Value(triton_type) != pb2.TYPE_INVALID  # raises ValueError for unknown names


def test_multi_tensor_onnx_gpu_config_parses():
    sig = Signature(
        inputs=(TensorSpec("ids", "INT64", (-1, -1)), TensorSpec("mask", "BOOL", (-1, -1))),
        outputs=(TensorSpec("scores", "FP16", (-1, 3)), TensorSpec("label", "INT32", (-1,))),
    )
    text = triton_config("clf", sig, TritonOptions(max_batch_size=4, instance_kind="KIND_GPU",
                                                   backend="onnxruntime"))
    assert "preferred_batch_size" not in text
    config, pb2 = _parse(text)
    assert config.platform == "onnxruntime_onnx"
    assert [(i.name, list(i.dims)) for i in config.input] == [("ids", [-1]), ("mask", [-1])]
    assert [o.data_type for o in config.output] == [pb2.TYPE_FP16, pb2.TYPE_INT32]
    # A tensor that is only the batch dimension becomes dims [1] reshaped to a scalar.
    assert list(config.output[1].dims) == [1]
    assert config.output[1].HasField("reshape") and list(config.output[1].reshape.shape) == []
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU


def test_max_batch_size_zero_keeps_full_dims_and_no_dynamic_batching():
    sig = Signature(inputs=(TensorSpec("x", "FP32", (3, 224, 224)),),
                    outputs=(TensorSpec("y__0", "FP32", (1000,)),))
    text = triton_config("resnet", sig, TritonOptions(max_batch_size=0))
    assert "max_batch_size: 0\n" in text
    assert "dims: [ 3, 224, 224 ]" in text
    assert "dims: [ 1000 ]" in text
    assert "dynamic_batching" not in text
    # A batched signature served without batching keeps its -1 too.
    text = triton_config("mlp", MLP, TritonOptions(max_batch_size=0))
    assert "dims: [ -1, 64 ]" in text and "dims: [ -1, 10 ]" in text
    config, _ = _parse(text)
    assert list(config.input[0].dims) == [-1, 64]
    assert not config.HasField("dynamic_batching")


def test_unbatched_signature_with_batching_is_invalid():
    sig = Signature(inputs=(TensorSpec("x", "FP32", (1, 64)),),
                    outputs=(TensorSpec("y__0", "FP32", (-1, 10)),))
    with pytest.raises(InvalidArgument, match=r"first dimension is not -1.*x: FP32\[1, 64\].*max_batch_size 0"):
        triton_config("m", sig, TritonOptions(max_batch_size=8))


@pytest.mark.parametrize("name", ["logits", "logits_0", "logits__x", "__0"])
def test_libtorch_output_names_must_be_indexed(name):
    sig = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec(name, "FP32", (-1, 2)),))
    with pytest.raises(InvalidArgument, match=r"<name>__<index>"):
        triton_config("m", sig, TritonOptions())
    # ONNX outputs keep their graph names.
    assert f'name: "{name}"' in triton_config("m", sig, TritonOptions(backend="onnxruntime"))


def test_libtorch_output_indices_must_be_distinct():
    sig = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),),
                    outputs=(TensorSpec("a__0", "FP32", (-1, 2)), TensorSpec("b__0", "FP32", (-1, 2))))
    with pytest.raises(InvalidArgument, match="index 0"):
        triton_config("m", sig, TritonOptions())


@pytest.mark.parametrize("sig", [
    Signature(),
    Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),)),
    Signature(outputs=(TensorSpec("y__0", "FP32", (-1, 4)),)),
])
def test_signature_needs_inputs_and_outputs(sig):
    with pytest.raises(InvalidArgument, match="at least one input and one output"):
        triton_config("m", sig, TritonOptions())


def test_tensor_names_are_escaped():
    sig = Signature(inputs=(TensorSpec('we"ird\\', "FP32", (-1, 4)),),
                    outputs=(TensorSpec("y__0", "FP32", (-1, 2)),))
    config, _ = _parse(triton_config("m", sig, TritonOptions()))
    assert config.input[0].name == 'we"ird\\'


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch_size": -1}, "max_batch_size must be a non-negative"),
    ({"preferred_batch_sizes": (0,)}, "between 1 and max_batch_size"),
    ({"max_batch_size": 8, "preferred_batch_sizes": (4, 16)}, r"16 .*between 1 and max_batch_size \(8\)"),
    ({"max_batch_size": 0, "preferred_batch_sizes": (1,)}, "max_batch_size > 0"),
    ({"preferred_batch_sizes": (4, 4)}, "duplicates"),
    ({"max_queue_delay_microseconds": -5}, "max_queue_delay_microseconds must be"),
    ({"instance_count": 0}, "instance_count must be"),
    ({"instance_kind": "KIND_TPU"}, "instance_kind 'KIND_TPU'.*KIND_CPU"),
    ({"backend": "tensorrt_plan"}, "backend 'tensorrt_plan' is not supported.*onnxruntime.*pytorch_libtorch"),
])
def test_bad_options_are_invalid(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        TritonOptions(**kwargs)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden"])
def test_bad_model_name_is_invalid(name):
    with pytest.raises(InvalidArgument):
        triton_config(name, MLP, TritonOptions())


# ---------------------------------------------------------------------------------------------------------
# export_version


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Linear(64, 10))
    path = tmp_path_factory.mktemp("artifact") / "artifact.bin"
    module.save(str(path))
    return path


def _version(path: Path, fmt: str = "torchscript", signature: Signature = MLP) -> VersionRecord:
    data = path.read_bytes()
    return VersionRecord(
        model="mlp", number=3, format=fmt, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
        signature=signature, architecture={}, parent=None, recipe={}, metrics={}, cost=None,
        created_at=datetime(2025, 1, 1, tzinfo=UTC), aliases=(), description="",
    )


def test_export_torchscript_writes_config_and_model(tmp_path, torchscript_file):
    repo = tmp_path / "repo"
    folder = export_version(_version(torchscript_file), torchscript_file, repo, "mlp", MLP_OPTIONS)
    assert folder == repo / "mlp"
    assert (folder / "config.pbtxt").read_text() == MLP_CONFIG
    assert (folder / "1" / "model.pt").read_bytes() == torchscript_file.read_bytes()
    assert (folder / "1" / "model.pt").stat().st_ino == torchscript_file.stat().st_ino  # same fs: hard link
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        "mlp", "mlp/1", "mlp/1/model.pt", "mlp/config.pbtxt"]  # no temp folders left behind
    # The exported file is still a loadable TorchScript module.
    torch = pytest.importorskip("torch")
    loaded = torch.jit.load(str(folder / "1" / "model.pt"))
    assert loaded(torch.zeros(2, 64)).shape == (2, 10)


def test_export_default_options_follow_the_format(tmp_path, torchscript_file):
    folder = export_version(_version(torchscript_file), torchscript_file, tmp_path, "mlp")
    text = (folder / "config.pbtxt").read_text()
    assert 'platform: "pytorch_libtorch"' in text and "max_batch_size: 64" in text


def test_export_python_backend_writes_model_py_too(tmp_path, torchscript_file):
    repo = tmp_path / "repo"
    version = _version(torchscript_file, signature=PY_MLP)
    folder = export_version(version, torchscript_file, repo, "mlp", PY_OPTIONS)
    assert (folder / "config.pbtxt").read_text() == PY_MLP_CONFIG
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        "mlp", "mlp/1", "mlp/1/model.pt", "mlp/1/model.py", "mlp/config.pbtxt"]
    assert (folder / "1" / "model.pt").read_bytes() == torchscript_file.read_bytes()
    model_py = folder / "1" / "model.py"
    assert model_py.read_bytes() == PYTHON_MODEL.read_bytes()
    assert model_py.stat().st_ino != PYTHON_MODEL.stat().st_ino  # a copy: editing the source never changes it
    assert "class TritonPythonModel" in model_py.read_text()
    compile(model_py.read_text(), str(model_py), "exec")  # valid Python (importing it needs Triton's stub)


def test_export_python_backend_then_libtorch_replaces_model_py(tmp_path, torchscript_file):
    repo = tmp_path / "repo"
    export_version(_version(torchscript_file, signature=PY_MLP), torchscript_file, repo, "mlp", PY_OPTIONS)
    folder = export_version(_version(torchscript_file), torchscript_file, repo, "mlp", MLP_OPTIONS)
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.pt"]
    assert (folder / "config.pbtxt").read_text() == MLP_CONFIG


def test_python_backend_serves_onnx_with_the_same_model_py(tmp_path):
    artifact = tmp_path / "model.bin"
    artifact.write_bytes(b"onnx bytes")
    sig = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),))
    repo = tmp_path / "repo"
    folder = export_version(_version(artifact, "onnx", sig), artifact, repo, "clf", PY_OPTIONS)
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        "clf", "clf/1", "clf/1/model.onnx", "clf/1/model.py", "clf/config.pbtxt"]
    assert (folder / "1" / "model.onnx").read_bytes() == artifact.read_bytes()
    assert (folder / "1" / "model.py").read_bytes() == PYTHON_MODEL.read_bytes()
    config, _ = _parse((folder / "config.pbtxt").read_text())
    assert config.backend == "python" and config.platform == "" and config.max_batch_size == 32
    assert config.HasField("dynamic_batching") and [list(i.dims) for i in config.input] == [[4]]


def test_libtorch_backend_cannot_serve_onnx(tmp_path):
    artifact = tmp_path / "model.bin"
    artifact.write_bytes(b"onnx bytes")
    sig = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),))
    with pytest.raises(InvalidArgument, match=r"backend 'pytorch_libtorch' cannot serve format 'onnx'; "
                                              r"use backend 'onnxruntime' or 'python'"):
        export_version(_version(artifact, "onnx", sig), artifact, tmp_path / "repo", "clf", TritonOptions())
    assert not (tmp_path / "repo").exists()


def test_export_onnx_uses_onnx_file_name(tmp_path):
    artifact = tmp_path / "model.bin"
    artifact.write_bytes(b"not really onnx, but bytes are bytes")
    sig = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),))
    folder = export_version(_version(artifact, "onnx", sig), artifact, tmp_path / "repo", "clf")
    assert (folder / "1" / "model.onnx").read_bytes() == artifact.read_bytes()
    assert 'platform: "onnxruntime_onnx"' in (folder / "config.pbtxt").read_text()
    with pytest.raises(InvalidArgument, match="cannot serve format 'onnx'"):
        export_version(_version(artifact, "onnx", sig), artifact, tmp_path / "repo", "clf", TritonOptions())


def test_reexport_replaces_the_folder(tmp_path, torchscript_file):
    repo = tmp_path / "repo"
    folder = export_version(_version(torchscript_file), torchscript_file, repo, "mlp", MLP_OPTIONS)
    (folder / "stale.txt").write_text("left from before")
    (folder / "2").mkdir()
    again = export_version(_version(torchscript_file), torchscript_file, repo, "mlp",
                           TritonOptions(max_batch_size=0))
    assert again == folder
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt"]
    assert "max_batch_size: 0\n" in (folder / "config.pbtxt").read_text()
    assert (folder / "1" / "model.pt").read_bytes() == torchscript_file.read_bytes()
    assert [p.name for p in repo.iterdir()] == ["mlp"]  # old folder and staging folder removed


def test_failed_export_leaves_existing_folder_alone(tmp_path, torchscript_file):
    repo = tmp_path / "repo"
    export_version(_version(torchscript_file), torchscript_file, repo, "mlp", MLP_OPTIONS)
    bad = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),))
    with pytest.raises(InvalidArgument):
        export_version(_version(torchscript_file, signature=bad), torchscript_file, repo, "mlp")
    assert (repo / "mlp" / "config.pbtxt").read_text() == MLP_CONFIG
    assert [p.name for p in repo.iterdir()] == ["mlp"]


@pytest.mark.parametrize("fmt", ["safetensors", "dataset-npz"])
def test_non_servable_format_is_failed_precondition(tmp_path, fmt):
    artifact = tmp_path / "weights.bin"
    artifact.write_bytes(b"\0" * 16)
    with pytest.raises(FailedPrecondition, match=rf"format '{fmt}'.*torchscript.*onnx"):
        export_version(_version(artifact, fmt), artifact, tmp_path / "repo", "mlp")
    assert not (tmp_path / "repo").exists()


def test_missing_artifact_is_failed_precondition(tmp_path, torchscript_file):
    with pytest.raises(FailedPrecondition, match="does not exist"):
        export_version(_version(torchscript_file), tmp_path / "gone.pt", tmp_path / "repo", "mlp")


def test_export_rejects_path_like_model_name(tmp_path, torchscript_file):
    with pytest.raises(InvalidArgument, match=r"'\.\./x' is not allowed"):
        export_version(_version(torchscript_file), torchscript_file, tmp_path / "repo", "../x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "repo").exists()
