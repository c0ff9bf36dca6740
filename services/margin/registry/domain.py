"""The registry's domain objects: plain data, no gRPC, no SQL."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from margin.common.tensors import Signature

FORMATS = ("torchscript", "safetensors", "onnx", "dataset-npz", "model-package")
SERVABLE_FORMATS = ("torchscript", "onnx")


@dataclass(frozen=True)
class VersionSelector:
    """A version by number, by alias, or (neither) the latest."""

    model: str
    number: int = 0
    alias: str = ""

    def describe(self) -> str:
        if self.number:
            return f"{self.model} v{self.number}"
        if self.alias:
            return f"{self.model}@{self.alias}"
        return f"{self.model} (latest)"


@dataclass(frozen=True)
class CostRecord:
    currency: str = "USD"
    total_micros: int = 0
    compute_micros: int = 0
    energy_micros: int = 0
    device_class: str = ""
    device_hours: float = 0.0
    energy_kwh: float = 0.0


@dataclass(frozen=True)
class UploadRequest:
    """Everything about a new version except its bytes."""

    model: str
    format: str
    sha256: str
    size_bytes: int = 0                      # 0 = not declared
    signature: Signature = field(default_factory=Signature)
    architecture: dict = field(default_factory=dict)
    parent: VersionSelector | None = None
    recipe: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    cost: CostRecord | None = None
    description: str = ""
    idempotency_key: str = ""                # same key in the same model -> the same version


@dataclass(frozen=True)
class ModelRecord:
    name: str
    description: str
    labels: dict[str, str]
    created_at: datetime
    latest_version: int
    aliases: dict[str, int]


@dataclass(frozen=True)
class VersionRecord:
    model: str
    number: int
    format: str
    sha256: str
    size_bytes: int
    signature: Signature
    architecture: dict
    parent: VersionSelector | None
    recipe: dict
    metrics: dict[str, float]
    cost: CostRecord | None
    created_at: datetime
    aliases: tuple[str, ...]
    description: str
