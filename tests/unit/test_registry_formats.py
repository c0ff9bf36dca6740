"""The registry's format checks called directly: TorchScript must be a TorchScript archive, ONNX a valid,
self-contained ONNX model whose graph agrees with the declared signature."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from margin.common.errors import InvalidArgument
from margin.common.tensors import Signature, TensorSpec
from margin.registry.formats import check_format
from onnx import TensorProto, helper

from tests.onnx_models import LINEAR_SIGNATURE, linear_onnx

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


def write(tmp_path: Path, data: bytes, name: str = "upload.part") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refusal(path: Path, fmt: str, signature: Signature | None = None) -> str:
    with pytest.raises(InvalidArgument) as info:
        check_format(path, fmt, signature)
    return str(info.value)


# -- TorchScript ----------------------------------------------------------------------------------------------

def test_scripted_and_traced_modules_are_torchscript(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    for name, saved in (("scripted.pt", torch.jit.script(module)),
                        ("traced.pt", torch.jit.trace(module, torch.zeros(1, 4)))):
        torch.jit.save(saved, str(tmp_path / name))
        check_format(tmp_path / name, "torchscript")


def test_a_torch_export_program_is_not_torchscript(tmp_path):
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 3), (torch.zeros(2, 4),)), str(path))
    message = refusal(path, "torchscript")
    assert "torch.export program (.pt2)" in message and "torch.jit.save" in message


@pytest.mark.parametrize("what", ["state_dict", "module"])
def test_a_torch_save_file_is_not_torchscript(tmp_path, what):
    module = torch.nn.Linear(4, 3)
    buffer = io.BytesIO()
    torch.save(module.state_dict() if what == "state_dict" else module, buffer)
    message = refusal(write(tmp_path, buffer.getvalue()), "torchscript")
    assert "torch.save file" in message and "torch.jit.save" in message


@pytest.mark.parametrize("entries", [
    {"notes.txt": b"hi"},                                    # no top folder
    {"a/data.pkl": b"x", "b/code/m.py": b"y"},               # two top folders
    {"m/data.pkl": b"x", "m/code/__torch__/m.py": b"y"},     # no constants.pkl
    {"m/readme.md": b"a zip of something else"},
])
def test_a_zip_that_is_not_laid_out_as_torchscript_is_refused(tmp_path, entries):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    assert "not a TorchScript archive" in refusal(write(tmp_path, buffer.getvalue()), "torchscript")


def test_bytes_that_are_not_a_zip_are_not_torchscript(tmp_path):
    assert "not a zip file" in refusal(write(tmp_path, os.urandom(5000)), "torchscript")


# -- ONNX -----------------------------------------------------------------------------------------------------

def test_a_valid_onnx_model_is_accepted_with_or_without_its_signature(tmp_path):
    path = write(tmp_path, linear_onnx(os.urandom(1000)))
    check_format(path, "onnx")
    check_format(path, "onnx", LINEAR_SIGNATURE)
    unbatched = Signature((TensorSpec("x", "FP32", (2, 4)),), (TensorSpec("y", "FP32", (2, 3)),))
    check_format(path, "onnx", unbatched)  # the graph's symbolic batch dimension takes any size


@pytest.mark.parametrize("data", [os.urandom(5000), b"", b"\x08\x07", linear_onnx()[:-20]],
                         ids=["random", "empty", "no graph", "truncated"])
def test_bytes_that_are_not_an_onnx_model_are_refused(tmp_path, data):
    assert "ONNX model" in refusal(write(tmp_path, data), "onnx")


@pytest.mark.parametrize("declared, fragment", [
    (Signature((TensorSpec("x", "FP32", (-1, 5)),), (TensorSpec("y", "FP32", (-1, 3)),)),
     "declared input x: FP32[-1, 5], the graph has x: FP32[batch, 4]"),
    (Signature((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP16", (-1, 3)),)),
     "declared output y: FP16[-1, 3], the graph has y: FP32[batch, 3]"),
    (Signature((TensorSpec("x", "FP32", (-1, 4, 1)),), (TensorSpec("y", "FP32", (-1, 3)),)),
     "declared input x: FP32[-1, 4, 1], the graph has x: FP32[batch, 4]"),
    (Signature((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("logits", "FP32", (-1, 3)),)),
     "declared output logits: FP32[-1, 3] is not among the graph's outputs [y: FP32[batch, 3]]"),
    (Signature((TensorSpec("input", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),)),
     "the graph's input x: FP32[batch, 4] is not in the declared signature"),
])
def test_an_onnx_graph_that_disagrees_with_the_declared_signature_is_refused_naming_both(tmp_path, declared,
                                                                                          fragment):
    message = refusal(write(tmp_path, linear_onnx()), "onnx", declared)
    assert fragment in message and "does not match the declared signature" in message


def test_an_input_with_an_initializer_is_optional(tmp_path):
    model = onnx.load_model_from_string(linear_onnx())
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]))  # IR 3 style
    check_format(write(tmp_path, model.SerializeToString()), "onnx", LINEAR_SIGNATURE)


def test_an_onnx_model_with_external_data_is_refused_even_when_the_file_is_beside_it(tmp_path):
    model = onnx.load_model_from_string(linear_onnx())
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("length", "48")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "weights.bin").write_bytes(bytes(48))
    assert "external files" in refusal(write(tmp_path, model.SerializeToString()), "onnx")
    weight.external_data[0].value = "../../etc/passwd"
    assert "external files" in refusal(write(tmp_path, model.SerializeToString()), "onnx")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the checker's folder is gone


def test_names_that_are_not_utf8_are_refused_not_a_crash(tmp_path):
    data = linear_onnx().replace(b"batch", b"bat\xff\xfe")
    message = refusal(write(tmp_path, data), "onnx", Signature((TensorSpec("x", "FP32", (-1, 5)),),
                                                               (TensorSpec("y", "FP32", (-1, 3)),)))
    assert "declared input x: FP32[-1, 5]" in message
