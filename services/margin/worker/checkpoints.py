"""Job checkpoints in the artifact store: model, optimizer, scaler, RNG and position, written atomically.

Checkpoints are written by Margin's own workers (never uploaded by a user) and read back with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers — no arbitrary unpickling.
A model package's checkpoint is written inside its sandbox: the worker only copies it (:meth:`save_file`) and
hands it back to the job's next sandbox; no worker process ever loads it.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch


class CheckpointStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.pt"

    def save(self, job_id: str, state: dict) -> dict:
        """Write the checkpoint (tmp file + rename, so a crash never leaves half of one); returns its record."""
        start = time.perf_counter()
        path = self.path(job_id)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return {"key": path.name, "epoch": state["epoch"], "batch": state["batch"], "step": state["step"],
                "bytes": path.stat().st_size, "seconds": time.perf_counter() - start}

    def save_file(self, job_id: str, source, pos: dict) -> dict:
        """Store the file object ``source`` (a sandboxed package's checkpoint, which the worker copies but never
        loads: only the next sandbox of the same job does) as the job's checkpoint at position ``pos``."""
        start = time.perf_counter()
        path = self.path(job_id)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        return {"key": path.name, "epoch": pos["epoch"], "batch": pos["batch"], "step": pos["step"],
                "bytes": path.stat().st_size, "seconds": time.perf_counter() - start}

    def load(self, job_id: str) -> dict | None:
        path = self.path(job_id)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)
