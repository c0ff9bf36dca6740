"""Dataset manifests: read from the .npy headers of an .npz upload (never its data, never by unpickling), stored as
the version's signature, and checked against a model's inputs or a training architecture at submit."""
from __future__ import annotations

import io
import pathlib
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from margin.common.errors import InvalidArgument
from margin.common.manifest import check_features, check_inputs, check_labels, has_labels, rows
from margin.common.tensors import Signature, TensorSpec
from margin.modelzoo.spec import TrainSpec
from margin.registry.formats import check_format
from margin.registry.npz_format import MAX_ARRAYS, read_manifest
from margin.sdk.registry_source import VersionInfo
from margin.training.core import dataset_rows
from numpy.lib import format as npy

X, Y = np.zeros((5, 3), np.float32), np.arange(5, dtype=np.int64)
DIGITS = Signature((TensorSpec("x", "FP32", (1797, 64)),), (TensorSpec("y", "INT64", (1797,)),))
UNLABELLED = Signature((TensorSpec("ids", "INT64", (4, 7)), TensorSpec("mask", "UINT8", (4, 7))))


def savez(tmp_path: Path, compressed: bool = False, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def raw_zip(tmp_path: Path, members: dict[str, bytes]) -> Path:
    """A zip holding exactly ``members`` (name -> bytes), for uploads np.savez would never write."""
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about duplicate names, which one case wants
        for name, data in members.items():
            archive.writestr(name.split("#")[0], data)  # "x.npy#2": a second member named x.npy
    return path


def npy_bytes(array: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    buffer = io.BytesIO()
    npy.write_array(buffer, array, version=version)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy header describing ``shape``, without data."""
    buffer = io.BytesIO()
    npy.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def refusal(path: Path) -> str:
    with pytest.raises(InvalidArgument) as info:
        read_manifest(path)
    return str(info.value)


def refused(check, *args, **kw) -> str:
    with pytest.raises(InvalidArgument) as info:
        check(*args, **kw)
    return str(info.value)


# -- reading a manifest ---------------------------------------------------------------------------------------

def test_features_and_labels_become_the_input_x_and_the_output_y(tmp_path):
    manifest = read_manifest(savez(tmp_path, x=X, y=Y))
    assert manifest == Signature((TensorSpec("x", "FP32", (5, 3)),), (TensorSpec("y", "INT64", (5,)),))


def test_named_inputs_keep_file_order_and_a_dataset_without_y_has_no_outputs(tmp_path):
    ids, mask = np.zeros((4, 7), np.int64), np.ones((4, 7), np.uint8)
    assert read_manifest(savez(tmp_path, ids=ids, mask=mask)) == UNLABELLED
    labelled = read_manifest(savez(tmp_path, compressed=True, y=np.zeros(4, np.int32), mask=mask, ids=ids))
    assert labelled.input_names == ["mask", "ids"] and labelled.outputs == (TensorSpec("y", "INT32", (4,)),)


def test_big_endian_fortran_and_version_2_headers_are_read(tmp_path):
    members = {"x.npy": npy_bytes(np.asfortranarray(np.zeros((3, 2), ">f8")), version=(2, 0)),
               "y.npy": npy_bytes(np.zeros(3, ">i2"))}
    manifest = read_manifest(raw_zip(tmp_path, members))
    assert manifest == Signature((TensorSpec("x", "FP64", (3, 2)),), (TensorSpec("y", "INT16", (3,)),))


class _Trap:
    """Pickles to a call that creates ``marker``: loading the array with pickle enabled would run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_pickled_object_array_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = savez(tmp_path, x=np.array([_Trap(marker)] * 2, dtype=object), y=np.zeros(2, np.int64))
    assert "object array" in refusal(path) and "'x'" in refusal(path)
    assert not marker.exists()
    with np.load(path, allow_pickle=True) as data:  # the trap is real: unpickling springs it
        data["x"]
    assert marker.exists()


@pytest.mark.parametrize(("arrays", "fragment"), [
    ({"x": np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")])}, "array 'x' has a structured dtype"),
    ({"x": np.array(["a", "b"])}, "array 'x' has dtype <U1"),
    ({"x": np.zeros((2, 2), np.uint32)}, "array 'x' has dtype uint32"),
    ({"x": np.zeros((2, 2), np.complex64)}, "array 'x' has dtype complex64"),
    ({"x": np.float32(1.0)}, "array 'x' is 0-d"),
    ({"x": np.zeros((0, 3), np.float32), "y": np.zeros(0, np.int64)}, "array 'x' has zero rows"),
    ({"x": np.zeros((3, 0), np.float32)}, "array 'x' has shape [3, 0]"),
    ({"x": X, "y": Y[:4]}, "the same number of rows: x has 5, y has 4"),
    ({"x": X, "y": Y.astype(np.float32)}, "labels `y` must be 1-D integers, one per row; found y: FP32[5]"),
    ({"x": X, "y": Y.reshape(5, 1)}, "labels `y` must be 1-D integers, one per row; found y: INT64[5, 1]"),
    ({"a b": X}, "array name 'a b' is not allowed"),
    ({f"a{i}": Y for i in range(MAX_ARRAYS + 1)}, f"holds {MAX_ARRAYS + 1} files; at most {MAX_ARRAYS} arrays"),
], ids=["structured", "strings", "uint32", "complex", "0-d", "zero rows", "zero columns", "rows differ",
        "float labels", "2-d labels", "bad name", "too many arrays"])
def test_arrays_margin_cannot_describe_are_refused_naming_them(tmp_path, arrays, fragment):
    assert fragment in refusal(savez(tmp_path, **arrays))


@pytest.mark.parametrize(("members", "fragment"), [
    ({}, "holds no arrays"),
    ({"x.npy": npy_bytes(X), "notes.txt": b"hi"}, "holds 'notes.txt', which is not a <name>.npy array"),
    ({"data/": b"", "x.npy": npy_bytes(X)}, "holds 'data/', which is not a <name>.npy array"),
    ({"x.npy": npy_bytes(X), "x.npy#2": npy_bytes(X)}, "holds 'x.npy' more than once"),
    ({"data/x.npy": npy_bytes(X)}, "array name 'data/x' is not allowed"),
    ({"x.npy": b"garbage that is no npy"}, "array 'x': the .npy header is unreadable"),
    ({"x.npy": npy_header((5, 3))[:-10]}, "array 'x': the .npy header is unreadable"),
    ({"x.npy": npy_header((5, 3)).replace(b"'descr'", b"'dtype'")}, "array 'x': the .npy header is unreadable"),
    ({"x.npy": npy_bytes(X)[:8].replace(b"\x01\x00", b"\x03\x00") + npy_bytes(X)[8:]},
     "array 'x': .npy format version 3.0 is not supported"),
    ({"x.npy": b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFF_FFFF)}, "header is 4294967295 bytes; at most 65536"),
    ({"x.npy": npy_header((1000, 3))}, "describes FP32[1000, 3] (12000 bytes) but the member holds 0 bytes"),
    ({"x.npy": npy_header((2 ** 62, 3)) + bytes(12)}, "but the member holds 12 bytes"),
    ({"x.npy": npy_header((-1, 3))}, "array 'x' has shape [-1, 3]: every dimension must be positive"),
], ids=["empty zip", "not npy", "folder", "duplicate", "path in name", "garbage", "truncated header",
        "header keys", "version 3", "huge header", "data missing", "huge shape", "negative dimension"])
def test_zips_that_are_not_plain_npz_are_refused(tmp_path, members, fragment):
    assert fragment in refusal(raw_zip(tmp_path, members))


def test_bytes_that_are_not_a_zip_are_not_a_dataset(tmp_path):
    path = tmp_path / "data.npz"
    path.write_bytes(npy_bytes(X))  # a bare .npy is not an .npz
    assert "not a .npz dataset (expected a zip archive)" in refusal(path)


# -- the registry's format check ------------------------------------------------------------------------------

def test_a_dataset_upload_is_stored_with_its_manifest_and_a_declared_one_must_match(tmp_path):
    path = savez(tmp_path, x=X, y=Y)
    manifest = read_manifest(path)
    assert check_format(path, "dataset-npz") == manifest
    assert check_format(path, "dataset-npz", manifest) == manifest
    declared = Signature((TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "INT64", (-1,)),))
    with pytest.raises(InvalidArgument, match="leave --signature out"):
        check_format(path, "dataset-npz", declared)


# -- checks against a manifest --------------------------------------------------------------------------------

def test_rows_and_labels_of_a_manifest():
    assert (rows(DIGITS), has_labels(DIGITS)) == (1797, True)
    assert (rows(UNLABELLED), has_labels(UNLABELLED)) == (4, False)
    assert (rows(Signature()), has_labels(Signature())) == (0, False)


def test_a_model_whose_inputs_are_arrays_of_the_dataset_fits():
    model = Signature((TensorSpec("mask", "UINT8", (-1, 7)), TensorSpec("ids", "INT64", (-1, -1))),
                      (TensorSpec("logits", "FP32", (-1, 2)),))
    check_inputs(UNLABELLED, model, what="dataset d v1")
    check_inputs(DIGITS, Signature((TensorSpec("x", "FP32", (8, 64)),)), what="dataset d v1")  # rows are not checked


@pytest.mark.parametrize(("model_input", "fragment"), [
    (TensorSpec("pixels", "FP32", (-1, 64)),
     "dataset d v1 has no array 'pixels' (the model's input 'pixels'); its arrays: x: FP32[1797, 64], "
     "y: INT64[1797]"),
    (TensorSpec("x", "FP16", (-1, 64)), "dataset d v1: array 'x' does not fit the model's input: expected "
                                        "FP16[64] per row (-1: any size), found FP32[64] per row"),
    (TensorSpec("x", "FP32", (-1, 32)), "expected FP32[32] per row (-1: any size), found FP32[64] per row"),
    (TensorSpec("x", "FP32", (-1, 8, 8)), "expected FP32[8, 8] per row (-1: any size), found FP32[64] per row"),
], ids=["missing", "dtype", "size", "rank"])
def test_a_model_input_the_dataset_cannot_feed_is_refused_naming_both(model_input, fragment):
    assert fragment in refused(check_inputs, DIGITS, Signature((model_input,)), what="dataset d v1")


def test_a_dataset_without_a_manifest_must_be_uploaded_again():
    message = refused(check_inputs, Signature(), Signature((TensorSpec("x", "FP32", (-1, 4)),)), what="dataset d v1")
    assert "dataset d v1 has no manifest" in message and "upload the dataset again" in message
    assert "upload the dataset again" in refused(check_features, Signature(), 64, what="dataset d v1")


def test_labels_must_be_present_and_integer():
    check_labels(DIGITS, what="dataset d v1")
    assert "dataset d v1 has no labels `y`; its arrays: ids: INT64[4, 7]" in refused(check_labels, UNLABELLED,
                                                                                      what="dataset d v1")
    float_labels = Signature(DIGITS.inputs, (TensorSpec("y", "FP32", (1797,)),))
    assert "must be 1-D integers" in refused(check_labels, float_labels, what="dataset d v1")


@pytest.mark.parametrize(("manifest", "fragment"), [
    (DIGITS, "dataset d v1: `x` has 64 features but the architecture expects 10"),
    (UNLABELLED, "dataset d v1 has no array 'x' (the features); its arrays: ids"),
    (Signature((TensorSpec("x", "FP32", (5, 8, 8)),)), "a numeric (rows, features) array; found x: FP32[5, 8, 8]"),
    (Signature((TensorSpec("x", "BOOL", (5, 10)),)), "a numeric (rows, features) array; found x: BOOL[5, 10]"),
], ids=["feature count", "no x", "3-d", "bool"])
def test_training_features_must_be_a_numeric_matrix_of_the_architectures_width(manifest, fragment):
    assert fragment in refused(check_features, manifest, 10, what="dataset d v1")


# -- training's row count ---------------------------------------------------------------------------------------

def _dataset(signature: Signature, size_bytes: int) -> VersionInfo:
    return VersionInfo("d", 1, "dataset-npz", signature, {}, "0" * 64, size_bytes, {})


def test_training_counts_rows_from_the_manifest_and_guesses_only_without_one():
    spec = TrainSpec(model="m", family="mlp", architecture={"input_dim": 64, "num_classes": 10})
    assert dataset_rows(spec, _dataset(DIGITS, size_bytes=100)) == 1797
    assert dataset_rows(spec, _dataset(Signature(), size_bytes=264 * 50)) == 50  # 64 fp32 + an int64 label a row
    assert "architecture expects 32" in refused(dataset_rows, TrainSpec(
        model="m", family="mlp", architecture={"input_dim": 32, "num_classes": 10}), _dataset(DIGITS, 100))
