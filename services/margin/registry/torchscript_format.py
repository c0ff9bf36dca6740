"""Is an upload a TorchScript archive (what ``torch.jit.save`` writes), not merely some zip?

Only the zip's table of contents is read: nothing is unpickled or loaded. ``torch.jit.save`` writes, under one
top folder ``<root>/``, ``data.pkl`` (the module's state), ``constants.pkl`` and ``code/`` (the compiled
TorchScript source). Other PyTorch files are zips too, and are told apart so the refusal can say what was sent:
``torch.export.save`` (a ``.pt2``: ``archive_format``, ``models/``, or ``serialized_exported_program.json`` in
older versions) and ``torch.save`` (``data.pkl`` but no ``code/``: a pickled state_dict or module).
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from margin.common.errors import InvalidArgument

HOW = ("save the model as TorchScript: torch.jit.save(torch.jit.script(model), path) "
       "(or torch.jit.trace(model, example_inputs))")


def check_torchscript(path: Path) -> None:
    """Raise :class:`InvalidArgument`, saying what the file is and what to upload instead, unless the file at
    ``path`` has the layout of a TorchScript archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError, struct.error):
        raise InvalidArgument(f"the upload is not a TorchScript archive (not a zip file); {HOW}") from None
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise InvalidArgument(f"the upload is a zip archive but not a TorchScript archive (its entries are not all "
                              f"in one top folder); {HOW}")
    root = roots.pop()
    inside = {name[len(root) + 1:] for name in names}
    if "archive_format" in inside or any(n.startswith("models/") or n.endswith("serialized_exported_program.json")
                                         for n in inside):
        raise InvalidArgument("the upload is a torch.export program (.pt2), not TorchScript: Margin serves "
                              f"TorchScript; {HOW}")
    has_code = any(n.startswith("code/") and n.endswith(".py") for n in inside)
    if "data.pkl" in inside and not has_code:
        raise InvalidArgument("the upload is a torch.save file (a pickled state_dict or module), not TorchScript; "
                              f"{HOW}, or upload the weights as safetensors with an architecture")
    missing = [n for n, present in (("data.pkl", "data.pkl" in inside), ("constants.pkl", "constants.pkl" in inside),
                                    ("code/*.py", has_code)) if not present]
    if missing:
        raise InvalidArgument(f"the upload is a zip archive but not a TorchScript archive (it has no "
                              f"{', '.join(f'{root}/{m}' for m in missing)}); {HOW}")
