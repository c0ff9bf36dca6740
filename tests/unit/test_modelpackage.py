"""Model packages (a team's PyTorch code, registry format ``model-package``): checked by reading and parsing, never
by running; refused, saying why, when they break the contract; unpacked for the worker without escaping the
destination folder."""
from __future__ import annotations

import io
import stat
import struct
import warnings
import zipfile

import pytest
from margin.common.errors import InvalidArgument
from margin.common.modelpackage import CONTRACT_FUNCTIONS, MAX_FILES, inspect_package, unpack

CAP = 1 << 20
MODEL = b"""import torch
from helpers.layers import block


def build_model(**config):
    return torch.nn.Sequential(block(config.get("width", 8)))


def loss(outputs, batch):
    return outputs.mean()


if True:
    def metrics(outputs, batch):  # not at the top level: not part of the contract
        return {}


async def example_inputs(batch_size):  # async: not callable as the contract says
    return None
"""
SIMPLE = b"def build_model(**config):\n    return None\n\n\ndef example_inputs(batch_size):\n    return None\n"
HELPERS = {"helpers/__init__.py": b"", "helpers/layers.py": b"import torch\n\n\ndef block(width):\n"
                                                             b"    return torch.nn.Linear(width, width)\n"}


def zip_of(members: dict[str, bytes], extra: tuple[tuple[zipfile.ZipInfo, bytes], ...] = ()) -> bytes:
    """A zip holding exactly ``members`` (name -> bytes), deflated, then any hand-made ``extra`` members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about duplicate names, which one case wants
        for name, data in members.items():
            archive.writestr(name, data)
        for info, data in extra:
            archive.writestr(info, data)
    return buffer.getvalue()


def declare_size(data: bytes, name: str, size: int) -> bytes:
    """``data`` (a zip) with member ``name``'s uncompressed size rewritten to ``size`` in its local header and its
    central directory entry: a member that claims to be small."""
    patched = bytearray(data)
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    struct.pack_into("<I", patched, info.header_offset + 22, size)
    entry = patched.find(b"PK\x01\x02")
    while entry != -1:
        name_length = struct.unpack_from("<H", patched, entry + 28)[0]
        if patched[entry + 46:entry + 46 + name_length] == name.encode():
            struct.pack_into("<I", patched, entry + 24, size)
        entry = patched.find(b"PK\x01\x02", entry + 4)
    return bytes(patched)


def refusal(data: bytes, max_bytes: int = CAP) -> str:
    with pytest.raises(InvalidArgument) as info:
        inspect_package(data, max_bytes)
    return str(info.value)


def test_a_single_file_is_the_entry_and_its_top_level_contract_functions_are_recorded():
    info = inspect_package(SIMPLE, CAP)
    assert (info.entry, info.files, info.defines) == ("model.py", {"model.py": SIMPLE}, ("build_model",
                                                                                          "example_inputs"))
    assert info.describe() == {"entry": "model.py", "files": ["model.py"], "defines": ["build_model",
                                                                                      "example_inputs"]}


def test_a_zip_with_a_helper_package_is_accepted_with_every_file():
    data = zip_of({"model.py": MODEL, **HELPERS, "helpers/": b""})  # a directory entry is ignored
    info = inspect_package(data, CAP)
    assert info.files == {"model.py": MODEL, **HELPERS}
    # metrics is nested in an if, example_inputs is async: neither is a top-level def
    assert info.describe() == {"entry": "model.py", "files": ["helpers/__init__.py", "helpers/layers.py",
                                                              "model.py"], "defines": ["build_model", "loss"]}
    assert set(info.defines) <= set(CONTRACT_FUNCTIONS)


@pytest.mark.parametrize(("data", "expected"), [
    (b"x = 1\ny = 2\nz = = 3\n", "model.py line 3: invalid syntax"),
    (zip_of({"model.py": SIMPLE, **HELPERS, "helpers/layers.py": b"def block(width):\n    return (\n"}),
     "helpers/layers.py line 2: '(' was never closed"),
    (b"def build_model(**config):\n    return 1\x00\n", "model.py: source code string cannot contain null bytes"),
    (b"x = " + b"-" * 200_000 + b"1\n", "model.py is nested too deeply"),
], ids=["entry", "helper", "null byte", "nested too deeply"])
def test_code_that_does_not_parse_is_refused_naming_the_file_and_line(data, expected):
    assert refusal(data).startswith(expected)


@pytest.mark.parametrize(("source", "found"), [
    (b"def make_model(**config):\n    return None\n", "none at its top level"),
    (b"build_model = lambda **config: None\n", "none at its top level"),
    (b"class build_model:\n    pass\n", "none at its top level"),
    (b"if True:\n    def build_model(**config):\n        return None\n", "none at its top level"),
    (b"async def build_model(**config):\n    return None\n", "it is an async def"),
])
def test_an_entry_without_a_top_level_def_build_model_is_refused(source, found):
    message = refusal(source)
    assert message.startswith(f"model.py defines no build_model(**config) function: {found}")
    assert "def build_model(**config):" in message  # says what to write


def test_a_zip_without_model_py_at_its_root_is_refused():
    assert "has no model.py at its root" in refusal(zip_of({"src/__init__.py": b"", "src/model.py": SIMPLE}))


def test_a_zip_bomb_is_refused_before_it_is_inflated():
    padding = b"#" * (4 * CAP)  # deflates to a few kilobytes
    honest = zip_of({"model.py": SIMPLE, "pad.py": padding})
    assert len(honest) < CAP
    assert refusal(honest) == (f"the model package's files declare {len(SIMPLE) + len(padding)} bytes "
                               f"uncompressed; at most {CAP} are allowed (MARGIN_MAX_PACKAGE_BYTES)")
    # the same member claiming 100 bytes: no more than 100 are inflated, and they do not match its CRC
    lying = declare_size(honest, "pad.py", 100)
    assert "not a readable zip archive" in refusal(lying) and "pad.py" in refusal(lying)
    # the cap counts the files' sum, not each one alone
    assert "declare" in refusal(zip_of({"model.py": SIMPLE, "a.py": b"#" * 600, "b.py": b"#" * 600}), 1000)


def test_an_upload_over_the_cap_is_refused_even_as_one_file():
    assert refusal(SIMPLE + b"#" * CAP) == (f"the model package is {len(SIMPLE) + CAP} bytes; at most {CAP} are "
                                            "allowed (MARGIN_MAX_PACKAGE_BYTES)")


@pytest.mark.parametrize("name", ["../evil.py", "/abs.py", "helpers/../../evil.py", "a\\b.py", "data.txt",
                                  "model.pyc", "sp ace.py", "./model2.py", "dir//x.py", "é.py"])
def test_member_names_outside_the_allowed_form_are_refused(name):
    assert f"holds {name!r}: member names must be relative paths" in refusal(zip_of({"model.py": SIMPLE,
                                                                                   name: b""}))


def test_a_symlink_member_is_refused():
    link = zipfile.ZipInfo("link.py")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    assert "'link.py' is a symbolic link" in refusal(zip_of({"model.py": SIMPLE}, ((link, b"/etc/passwd"),)))


def test_more_than_the_allowed_number_of_files_is_refused():
    members = {"model.py": SIMPLE, **{f"m{i}.py": b"" for i in range(MAX_FILES)}}
    assert refusal(zip_of(members)) == (f"the model package holds {MAX_FILES + 1} files; at most {MAX_FILES} are "
                                        "allowed")
    assert inspect_package(zip_of({"model.py": SIMPLE, **{f"m{i}.py": b"" for i in range(MAX_FILES - 1)}}), CAP)


def test_duplicate_names_and_a_name_that_is_file_and_folder_are_refused():
    twice = zip_of({"model.py": SIMPLE}, ((zipfile.ZipInfo("model.py"), SIMPLE),))
    assert "holds 'model.py' more than once" in refusal(twice)
    both = zip_of({"model.py": SIMPLE, "x.py": b"", "x.py/__init__.py": b"", "x.py/y.py": b""})
    assert "'x.py' is both a file and a folder" in refusal(both)


def test_a_file_in_a_folder_without_init_is_refused():
    assert "'lib/x.py' is in lib/, which has no __init__.py" in refusal(zip_of({"model.py": SIMPLE,
                                                                                "lib/x.py": b""}))


def test_code_that_is_not_utf8_is_refused():
    latin1 = "# café\n".encode("latin-1") + SIMPLE
    assert refusal(latin1).startswith("model.py is not UTF-8 text")
    assert refusal(zip_of({"model.py": SIMPLE, "util.py": latin1})).startswith("util.py is not UTF-8 text")
    assert inspect_package(b"\xef\xbb\xbf" + SIMPLE, CAP).defines  # a UTF-8 byte order mark is UTF-8


def test_a_truncated_zip_is_refused():
    assert "not a readable zip archive" in refusal(zip_of({"model.py": SIMPLE})[:40])


def test_unpack_writes_the_files_with_fixed_modes(tmp_path):
    data = zip_of({"model.py": MODEL, **HELPERS})
    dest = tmp_path / "pkg"
    info = unpack(data, dest, CAP)
    written = {p.relative_to(dest).as_posix(): p for p in dest.rglob("*")}
    assert sorted(written) == ["helpers", "helpers/__init__.py", "helpers/layers.py", "model.py"]
    assert {name: p.read_bytes() for name, p in written.items() if p.is_file()} == info.files
    assert {name: stat.S_IMODE(p.stat().st_mode) for name, p in written.items()} == {
        "helpers": 0o755, "helpers/__init__.py": 0o644, "helpers/layers.py": 0o644, "model.py": 0o644}
    unpack(data, dest, CAP)  # again over the same folder (a retried attempt): the same files
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == sorted(written)


@pytest.mark.parametrize(("planted", "data"), [
    ("helpers", zip_of({"model.py": MODEL, **HELPERS})),  # a folder of the package
    ("model.py", SIMPLE),                                   # a file of the package
])
def test_unpack_follows_no_symlink_planted_in_dest(tmp_path, planted, data):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "pkg"
    dest.mkdir()
    (dest / planted).symlink_to(outside / planted if planted.endswith(".py") else outside)
    with pytest.raises(OSError):
        unpack(data, dest, CAP)
    assert list(outside.iterdir()) == []


def test_unpack_of_a_refused_package_writes_nothing(tmp_path):
    dest = tmp_path / "pkg"
    with pytest.raises(InvalidArgument):
        unpack(zip_of({"model.py": SIMPLE, "../evil.py": b"print('x')\n"}), dest, CAP)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []
