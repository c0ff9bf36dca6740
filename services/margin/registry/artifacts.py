"""The local artifact store: crash-safe uploads into a directory.

An upload is written to ``.uploads/<instance>/<id>.part`` and only renamed into place once complete and
verified; the database row that makes it a version is committed after the rename. Each store instance
holds an exclusive ``flock`` on ``.uploads/<instance>.lock`` for its lifetime, so at start a store can
tell which partial uploads belong to a process that died (its lock is free) and delete them — a registry
killed mid-upload leaves nothing behind once restarted. Published files no version refers to (a crash
between rename and commit) are removed by :meth:`LocalArtifactStore.collect_garbage`.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

UPLOADS = ".uploads"


class PendingUpload:
    """Bytes being received: hashed and counted as they are written; deleted unless published."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "xb")
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._sha.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class LocalArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.instance = uuid.uuid4().hex[:12]
        self._uploads = self.root / UPLOADS / self.instance
        self._uploads.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / UPLOADS / f"{self.instance}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    # -- writing --------------------------------------------------------------------------------
    def start_upload(self) -> PendingUpload:
        return PendingUpload(self._uploads / f"{uuid.uuid4().hex}.part")

    def publish(self, pending: PendingUpload, key: str) -> None:
        """Move a complete upload to ``key`` atomically (same filesystem rename, then directory fsync)."""
        pending.close()
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(pending.path, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self._path(key)

    def read_chunks(self, key: str, chunk_size: int) -> Iterator[bytes]:
        with open(self._path(key), "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    # -- recovery -------------------------------------------------------------------------------
    def recover_dead_uploads(self) -> int:
        """Delete partial uploads of store instances whose process is gone. Returns how many files."""
        removed = 0
        base = self.root / UPLOADS
        for lock in base.glob("*.lock"):
            instance = lock.stem
            if instance == self.instance:
                continue
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live store owns it
            else:
                parts = base / instance
                removed += sum(1 for _ in parts.glob("*.part")) if parts.exists() else 0
                shutil.rmtree(parts, ignore_errors=True)
                lock.unlink(missing_ok=True)
            finally:
                os.close(fd)
        if removed:
            log.warning("removed %d partial upload(s) left by a stopped registry", removed)
        return removed

    def collect_garbage(self, referenced: Iterable[str], grace_seconds: float) -> int:
        """Delete published files no version refers to, if older than ``grace_seconds``."""
        keep = set(referenced)
        cutoff = time.time() - grace_seconds
        removed = 0
        for path in self.root.rglob("*.bin"):
            if UPLOADS in path.relative_to(self.root).parts:
                continue
            key = path.relative_to(self.root).as_posix()
            if key not in keep and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.warning("removed %d artifact file(s) that no version refers to", removed)
        return removed

    def close(self) -> None:
        shutil.rmtree(self._uploads, ignore_errors=True)
        os.close(self._lock_fd)
        (self.root / UPLOADS / f"{self.instance}.lock").unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"artifact key {key!r} escapes the store")
        return path
