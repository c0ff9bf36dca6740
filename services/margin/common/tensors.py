"""Tensor signatures as plain data: what a model takes and returns (names, dtypes, shapes)."""
from __future__ import annotations

from dataclasses import dataclass, field

from margin.common.errors import InvalidArgument

# Margin dtype name -> numpy dtype string. Names match the proto's DType enum without the prefix.
DTYPES: dict[str, str] = {
    "FP32": "float32", "FP16": "float16", "BF16": "bfloat16", "FP64": "float64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "UINT8": "uint8",
    "BOOL": "bool", "BYTES": "object",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidArgument("every tensor in a signature needs a name")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"tensor {self.name!r}: unknown dtype {self.dtype!r}; one of {sorted(DTYPES)}")
        if not self.shape or any(d == 0 or d < -1 for d in self.shape):
            raise InvalidArgument(f"tensor {self.name!r}: shape {list(self.shape)} must be non-empty, "
                                  "each dimension positive or -1")

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...] = field(default_factory=tuple)
    outputs: tuple[TensorSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for group, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise InvalidArgument(f"duplicate {group} names in signature: {names}")

    @property
    def empty(self) -> bool:
        return not self.inputs and not self.outputs

    @property
    def batched(self) -> bool:
        """True when every tensor's first dimension is the (variable) batch dimension."""
        specs = (*self.inputs, *self.outputs)
        return bool(specs) and all(s.shape[0] == -1 for s in specs)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def describe(self) -> str:
        return (f"inputs [{', '.join(s.describe() for s in self.inputs)}] -> "
                f"outputs [{', '.join(s.describe() for s in self.outputs)}]")

    def to_dict(self) -> dict:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, data: dict | None) -> Signature:
        data = data or {}
        return cls(tuple(TensorSpec.from_dict(d) for d in data.get("inputs", [])),
                   tuple(TensorSpec.from_dict(d) for d in data.get("outputs", [])))
