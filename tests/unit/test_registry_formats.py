"""The registry's format checks called directly: TorchScript must be a TorchScript archive, ONNX a valid,
self-contained ONNX model whose graph agrees with the declared signature, or gives its own when none is declared."""
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

from tests.onnx_models import LINEAR_SIGNATURE, embedding_onnx, identity_onnx, linear_onnx

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


def write(tmp_path: Path, data: bytes, name: str = "upload.part") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refusal(path: Path, fmt: str, signature: Signature | None = None) -> str:
    with pytest.raises(InvalidArgument) as info:
        check_format(path, fmt, signature)
    return str(info.value)


def tensor(elem_type: int, shape: list[int | str | None] | None) -> onnx.TypeProto:
    """An ONNX tensor type (``shape`` None: no shape, the rank unknown)."""
    return helper.make_tensor_type_proto(elem_type, shape)


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

def test_a_valid_onnx_model_keeps_a_declared_signature_its_graph_agrees_with(tmp_path):
    path = write(tmp_path, linear_onnx(os.urandom(1000)))
    assert check_format(path, "onnx", LINEAR_SIGNATURE) == LINEAR_SIGNATURE
    unbatched = Signature((TensorSpec("x", "FP32", (2, 4)),), (TensorSpec("y", "FP32", (2, 3)),))
    assert check_format(path, "onnx", unbatched) == unbatched  # the graph's symbolic batch dimension takes any size


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


def test_an_input_with_an_initializer_is_optional_and_not_in_the_derived_signature(tmp_path):
    model = onnx.load_model_from_string(linear_onnx())
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]))  # IR 3 style
    path = write(tmp_path, model.SerializeToString())
    assert check_format(path, "onnx", LINEAR_SIGNATURE) == LINEAR_SIGNATURE
    assert check_format(path, "onnx") == LINEAR_SIGNATURE


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
    assert "its name is not UTF-8" in refusal(write(tmp_path, embedding_onnx().replace(b"ids", b"i\xffs")), "onnx")


# -- ONNX without a declared signature: the graph's own ----------------------------------------------------------

def test_without_a_signature_the_graphs_symbolic_batch_becomes_minus_1_and_fixed_dims_stay(tmp_path):
    derived = check_format(write(tmp_path, linear_onnx(os.urandom(1000))), "onnx")
    assert derived == LINEAR_SIGNATURE  # x: FP32[batch, 4] -> [-1, 4]; the UINT8 payload initializer is no input


def test_without_a_signature_a_fixed_batch_dimension_is_kept(tmp_path):
    derived = check_format(write(tmp_path, identity_onnx(tensor(TensorProto.FLOAT, [2, 4]))), "onnx")
    assert derived == Signature((TensorSpec("x", "FP32", (2, 4)),), (TensorSpec("y", "FP32", (2, 4)),))


def test_without_a_signature_int64_token_ids_and_every_symbolic_dimension_are_derived(tmp_path):
    derived = check_format(write(tmp_path, embedding_onnx()), "onnx")
    assert derived == Signature((TensorSpec("ids", "INT64", (-1, -1)),), (TensorSpec("vectors", "FP32", (-1, -1, 4)),))


def test_without_a_signature_an_unnamed_dimension_becomes_minus_1(tmp_path):
    derived = check_format(write(tmp_path, identity_onnx(tensor(TensorProto.BOOL, [None, 3]))), "onnx")
    assert derived.inputs == (TensorSpec("x", "BOOL", (-1, 3)),)


@pytest.mark.parametrize("value_type, fragment", [
    (tensor(TensorProto.UINT32, ["batch", 4]), "x: UINT32[batch, 4]: Margin has no dtype for UINT32"),
    (tensor(TensorProto.FLOAT, []), "x: FP32[]: a scalar"),
    (helper.make_sequence_type_proto(tensor(TensorProto.FLOAT, [4])), "x: sequence_type (not a tensor)"),
], ids=["unrepresentable dtype", "scalar", "sequence"])
def test_without_a_signature_a_graph_margin_cannot_describe_is_refused_saying_to_declare_one(tmp_path, value_type,
                                                                                             fragment):
    message = refusal(write(tmp_path, identity_onnx(value_type)), "onnx")
    assert fragment in message and fragment.replace("x:", "y:") in message, message
    assert "declare the signature" in message, message


@pytest.mark.parametrize("declared", [None, Signature((TensorSpec("x", "FP32", (-1, 8)),),
                                                      (TensorSpec("y", "FP32", (-1, 8)),))],
                         ids=["undeclared", "declared"])
def test_a_graph_tensor_of_unknown_rank_is_refused_saying_to_export_its_shape(tmp_path, declared):
    message = refusal(write(tmp_path, _unchecked_identity(tensor(TensorProto.FLOAT, None))), "onnx", declared)
    assert "has no shape" in message and "export the model with the shapes" in message, message


def _unchecked_identity(value_type: onnx.TypeProto) -> bytes:
    """identity_onnx for a type onnx.checker refuses (it cannot build one): a valid model with the type swapped."""
    model = onnx.load_model_from_string(identity_onnx(tensor(TensorProto.FLOAT, [4])))
    for value in (*model.graph.input, *model.graph.output):
        value.type.CopyFrom(value_type)
    return model.SerializeToString()
