"""The registry core called directly (no gRPC): versions, lineage, recovery of the artifact store."""
from __future__ import annotations

import hashlib
import os
import time

import pytest
from margin.common.db import make_engine, make_sessionmaker
from margin.common.errors import InvalidArgument, NotFound
from margin.common.tenancy import TenantStore
from margin.registry.artifacts import LocalArtifactStore
from margin.registry.core import RegistryCore, RegistryLimits
from margin.registry.domain import CostRecord, UploadRequest, VersionSelector

from tests.onnx_models import linear_onnx


@pytest.fixture()
def core(tmp_path):
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'm.db'}"))
    tenants = TenantStore(sessions)
    tenant = tenants.create_tenant("acme")
    store = LocalArtifactStore(tmp_path / "artifacts")
    registry = RegistryCore(sessions, store, RegistryLimits(max_upload_bytes=1 << 20))
    registry.tenant_id = tenant.id
    yield registry
    store.close()


def put(core: RegistryCore, model: str, data: bytes, **kw) -> int:
    req = UploadRequest(model=model, format=kw.pop("format", "onnx"), sha256=hashlib.sha256(data).hexdigest(),
                        **kw)
    with core.begin_upload(core.tenant_id, req) as upload:
        upload.write(data)
        return upload.commit().number


def test_lineage_follows_parents_and_sums_costs(core):
    core.create_model(core.tenant_id, "m")
    a = put(core, "m", linear_onnx(b"a"), cost=CostRecord(total_micros=100))
    b = put(core, "m", linear_onnx(b"b"), parent=VersionSelector("m", a), cost=CostRecord(total_micros=20))
    c = put(core, "m", linear_onnx(b"c"), parent=VersionSelector("m", b))
    chain, total = core.lineage(core.tenant_id, VersionSelector("m", c))
    assert [v.number for v in chain] == [c, b, a] and total == 120
    assert core.get_version(core.tenant_id, VersionSelector("m")).number == c  # latest


def test_upload_left_without_commit_leaves_no_file(core):
    core.create_model(core.tenant_id, "m")
    with core.begin_upload(core.tenant_id, UploadRequest(model="m", format="onnx", sha256="0" * 64)) as upload:
        upload.write(b"half")
    assert list(core.store.root.rglob("*.part")) == [] and list(core.store.root.rglob("*.bin")) == []
    with pytest.raises(NotFound):
        core.get_version(core.tenant_id, VersionSelector("m"))


def test_writes_past_the_limit_are_refused(core):
    core.create_model(core.tenant_id, "m")
    with core.begin_upload(core.tenant_id, UploadRequest(model="m", format="onnx", sha256="0" * 64)) as upload:
        upload.write(os.urandom(1 << 20))
        with pytest.raises(InvalidArgument, match="exceeds the limit"):
            upload.write(b"x")


def test_start_removes_dead_uploads_and_unreferenced_files(core, tmp_path):
    core.create_model(core.tenant_id, "m")
    kept = put(core, "m", linear_onnx(b"keep me"))
    # a store whose process died: its lock is released, its partial upload stays behind
    dead = LocalArtifactStore(tmp_path / "artifacts")
    dead.start_upload().write(b"partial")
    os.close(dead._lock_fd)
    orphan = tmp_path / "artifacts" / "t1" / "m1" / "orphan.bin"
    orphan.write_bytes(b"published but never committed")
    old = time.time() - 3600
    os.utime(orphan, (old, old))

    core.recover(orphan_grace_seconds=600)
    assert list((tmp_path / "artifacts").rglob("*.part")) == []
    assert not orphan.exists()
    assert core.open_version(core.tenant_id, VersionSelector("m", kept), 1024)[1].__next__() == linear_onnx(b"keep me")


def test_a_live_stores_partial_uploads_are_left_alone(core, tmp_path):
    other = LocalArtifactStore(tmp_path / "artifacts")
    pending = other.start_upload()
    pending.write(b"in flight")
    core.recover()
    assert pending.path.exists()
    other.close()
