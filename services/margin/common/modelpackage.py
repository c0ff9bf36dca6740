"""A team's model code, as the registry stores it (format ``model-package``): the shared parser and the contract.

Margin checks a package by *reading* it, never by running it: no service imports, compiles or executes a package;
only a training worker runs one, inside a sandbox. So everything here is read from bytes and ``ast`` trees.

The contract
------------
* **Layout.** An upload is either one UTF-8 Python file, which is the entry module (stored as ``model.py``), or a
  ``.zip`` (it starts with ``PK\\x03\\x04``) of ``.py`` files whose entry is ``model.py`` at the zip's root.
  Sub-packages are allowed: a file in a folder needs that folder (and each one above it) to hold an
  ``__init__.py``. Directory entries (names ending ``/``) are ignored.
* **Caps.** The upload and the total *uncompressed* size of its files are each at most ``max_bytes`` (default
  ``MARGIN_MAX_PACKAGE_BYTES``). A zip member's declared size is checked before it is read, and the bytes read are
  counted too (never more than one byte past what is left), so a zip bomb is refused before it is inflated. At most
  :data:`MAX_FILES` files.
* **Names.** Each member name is relative, made of ``[A-Za-z0-9_./-]``, ends ``.py``, and has no empty, ``.`` or
  ``..`` part (so no absolute path, no backslash, no way out of the folder it is unpacked in); no name appears
  twice, and no name is both a file and a folder. Symbolic links (a member whose mode is ``S_IFLNK``) and encrypted
  members are refused.
* **Code.** Every file decodes as UTF-8 and parses (``ast.parse``); a syntax error is refused naming the file, the
  line and the error, e.g. ``model.py line 3: invalid syntax``.
* **Entry points.** ``model.py`` defines ``build_model(**config)`` as a top-level (synchronous) ``def``: it returns
  the ``torch.nn.Module`` to train. It may also define, at top level, ``loss(outputs, batch)``,
  ``metrics(outputs, batch)`` and ``example_inputs(batch_size)``; which of :data:`CONTRACT_FUNCTIONS` it defines is
  recorded (:attr:`PackageInfo.defines`), and :meth:`PackageInfo.describe` is what the registry stores as the
  version's architecture.

Refusals are :class:`~margin.common.errors.InvalidArgument`. This module imports nothing from Margin's services, so
the registry and the worker share it.
"""
from __future__ import annotations

import ast
import io
import os
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from margin.common import config
from margin.common.errors import InvalidArgument

FORMAT = "model-package"
ENTRY = "model.py"
CONTRACT_FUNCTIONS = ("build_model", "loss", "metrics", "example_inputs")
MAX_FILES = 64
ZIP_MAGIC = b"PK\x03\x04"
PACKAGE_INIT = "__init__.py"
_NAME = re.compile(r"[A-Za-z0-9_./-]+")
_UNREADABLE_ZIP = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, EOFError, OSError,
                   zlib.error, struct.error, RuntimeError)
_BUILD_MODEL_HINT = ("define `def build_model(**config):` at the top level of model.py, returning the "
                     "torch.nn.Module to train")


@dataclass(frozen=True)
class PackageInfo:
    """A package that passed :func:`inspect_package`: its entry module, every file's bytes by name, and the
    contract functions its entry module defines."""

    entry: str
    files: dict[str, bytes]
    defines: tuple[str, ...]

    def describe(self) -> dict:
        """What the registry stores as the version's architecture (JSON-able): entry, file names, defines."""
        return {"entry": self.entry, "files": sorted(self.files), "defines": sorted(self.defines)}


def package_cap(max_bytes: int | None = None) -> int:
    """The cap on a package's size: ``max_bytes``, or ``MARGIN_MAX_PACKAGE_BYTES`` when None."""
    return config.MAX_PACKAGE_BYTES.get_int() if max_bytes is None else max_bytes


def package_refusal(label: str) -> InvalidArgument:
    """The refusal for serving or compressing the package ``label`` (``"<model> v<n>"``): a package is code, and
    what can be served or compressed is the model a training job builds from it."""
    return InvalidArgument(f"model {label} is a model package (code): train it with `margin train submit "
                           "--package`, then deploy or compress the version it registers")


def inspect_package(data: bytes, max_bytes: int | None = None) -> PackageInfo:
    """The package in ``data`` (one .py file, or a .zip of them), checked against the contract in the module
    docstring without running any of it; :class:`InvalidArgument` saying what is wrong otherwise. ``max_bytes``:
    the cap on the upload and on its uncompressed total (None: ``MARGIN_MAX_PACKAGE_BYTES``)."""
    max_bytes = package_cap(max_bytes)
    if len(data) > max_bytes:
        raise InvalidArgument(f"the model package is {len(data)} bytes; at most {max_bytes} are allowed "
                              "(MARGIN_MAX_PACKAGE_BYTES)")
    files = _zip_files(data, max_bytes) if data.startswith(ZIP_MAGIC) else {ENTRY: data}
    trees = {name: _parse(name, source) for name, source in files.items()}
    if ENTRY not in trees:
        raise InvalidArgument(f"the model package's zip has no {ENTRY} at its root (it holds {sorted(files)}); "
                              f"the entry module must be {ENTRY}")
    return PackageInfo(ENTRY, files, _defines(trees[ENTRY]))


def unpack(data: bytes, dest: Path, max_bytes: int | None = None) -> PackageInfo:
    """Check the package in ``data`` again (:func:`inspect_package`) and write its files under ``dest`` (created if
    missing): folders mode 0o755, files 0o644, an earlier file of the same name replaced. Nothing inside ``dest`` is
    followed if it is a symbolic link (each step is opened relative to its folder with ``O_NOFOLLOW``), so no file
    is written outside ``dest``."""
    info = inspect_package(data, max_bytes)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, content in sorted(info.files.items()):
            _write_file(root, name.split("/"), content)
    finally:
        os.close(root)
    return info


# -- reading -----------------------------------------------------------------------------------------------------

def _zip_files(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """The .py files of the zip in ``data`` by name, every member checked before any is read."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.infolist() if not m.filename.endswith("/")]
            _check_members(members, max_bytes)
            files, left = {}, max_bytes
            for member in members:
                files[member.filename] = _read_member(archive, member, left)
                left -= len(files[member.filename])
    except _UNREADABLE_ZIP as err:
        raise InvalidArgument(f"the model package is not a readable zip archive: {_first_line(err)}") from None
    return files


def _check_members(members: list[zipfile.ZipInfo], max_bytes: int) -> None:
    if len(members) > MAX_FILES:
        raise InvalidArgument(f"the model package holds {len(members)} files; at most {MAX_FILES} are allowed")
    names = [m.filename for m in members]
    for member in members:
        _check_name(member.filename)
        if stat.S_ISLNK(member.external_attr >> 16):
            raise InvalidArgument(f"the model package's {member.filename!r} is a symbolic link; package files "
                                  "must be regular .py files")
        if member.flag_bits & 0x1:
            raise InvalidArgument(f"the model package's {member.filename!r} is encrypted")
        if names.count(member.filename) > 1:
            raise InvalidArgument(f"the model package holds {member.filename!r} more than once")
    _check_folders(set(names))
    declared = sum(m.file_size for m in members)
    if declared > max_bytes:
        raise InvalidArgument(f"the model package's files declare {declared} bytes uncompressed; at most "
                              f"{max_bytes} are allowed (MARGIN_MAX_PACKAGE_BYTES)")


def _check_name(name: str) -> None:
    parts = name.split("/")
    if not _NAME.fullmatch(name) or not name.endswith(".py") or any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"the model package holds {name!r}: member names must be relative paths of "
                              "[A-Za-z0-9_./-] ending .py, with no empty, '.' or '..' part")


def _check_folders(names: set[str]) -> None:
    """Each folder a file is in is a package (holds ``__init__.py``), and no name is both a file and a folder."""
    for name in sorted(names):
        parts = name.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in names:
                raise InvalidArgument(f"the model package's {folder!r} is both a file and a folder")
            if f"{folder}/{PACKAGE_INIT}" not in names:
                raise InvalidArgument(f"the model package's {name!r} is in {folder}/, which has no {PACKAGE_INIT}: "
                                      f"sub-packages need one (an empty {folder}/{PACKAGE_INIT} will do)")


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, left: int) -> bytes:
    """The member's bytes, reading at most one byte past ``left`` (what the cap still allows), whatever its header
    declared."""
    with archive.open(member) as stream:
        content = stream.read(left + 1)
    if len(content) > left:
        raise InvalidArgument(f"the model package's {member.filename!r} inflates past the "
                              "MARGIN_MAX_PACKAGE_BYTES cap on the package's uncompressed size")
    return content


def _parse(name: str, source: bytes) -> ast.Module:
    """``source`` parsed (never compiled or run); refused naming the file, and the line, when it cannot be."""
    try:
        source.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"{name} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    try:
        return ast.parse(source, filename=name)
    except SyntaxError as err:
        where = f"{name} line {err.lineno}" if err.lineno else name
        raise InvalidArgument(f"{where}: {err.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise InvalidArgument(f"{name} is nested too deeply for Python's parser") from None


def _defines(entry: ast.Module) -> tuple[str, ...]:
    """The contract functions the entry module defines with a top-level ``def``; refused without ``build_model``."""
    defined = {node.name for node in entry.body if isinstance(node, ast.FunctionDef)}
    if "build_model" not in defined:
        is_async = any(isinstance(n, ast.AsyncFunctionDef) and n.name == "build_model" for n in entry.body)
        found = "it is an async def, which Margin cannot call" if is_async else "none at its top level"
        raise InvalidArgument(f"{ENTRY} defines no build_model(**config) function: {found}; {_BUILD_MODEL_HINT}")
    return tuple(f for f in CONTRACT_FUNCTIONS if f in defined)


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


# -- writing -----------------------------------------------------------------------------------------------------

def _write_file(root: int, parts: list[str], content: bytes) -> None:
    """Write ``content`` at ``parts`` under the folder open as ``root``, making folders on the way and following no
    symbolic link."""
    folder = root
    try:
        for part in parts[:-1]:
            folder = _enter(folder, part, close=folder != root)
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=folder)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb", closefd=False) as out:
                out.write(content)
        finally:
            os.close(fd)
    finally:
        if folder != root:
            os.close(folder)


def _enter(parent: int, name: str, close: bool) -> int:
    """The folder ``name`` in ``parent`` (made 0o755 when missing) opened without following a link; ``parent``
    is closed when ``close``."""
    try:
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
            made = True
        except FileExistsError:
            made = False
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        if made:
            os.fchmod(fd, 0o755)
        return fd
    finally:
        if close:
            os.close(parent)
