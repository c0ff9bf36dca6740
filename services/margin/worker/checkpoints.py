"""Job checkpoints in the artifact store: model, optimizer, scaler, RNG and position, written atomically.

Checkpoints are written by Margin's own workers (never uploaded by a user) and read back with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers — no arbitrary unpickling.
"""
from __future__ import annotations

import os
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

    def load(self, job_id: str) -> dict | None:
        path = self.path(job_id)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)
