"""Conversions between margin.v1 messages and plain Python values, shared by every servicer."""
from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from margin.common.errors import InvalidArgument
from margin.common.tensors import Signature, TensorSpec
from margin.v1 import common_pb2


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def struct(value: dict | None) -> struct_pb2.Struct:
    msg = struct_pb2.Struct()
    if value:
        msg.update(value)
    return msg


def _plain(value):
    """Struct numbers are doubles: give whole numbers back as ints (sizes, counts), recursively."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def from_struct(msg: struct_pb2.Struct) -> dict:
    """A Struct as a dict, whole numbers as ints."""
    return _plain(json_format.MessageToDict(msg))


def money(micros: int, currency: str = "USD") -> common_pb2.Money:
    return common_pb2.Money(currency=currency, micros=micros)


def cost(c: dict, currency: str = "USD") -> common_pb2.Cost:
    """A Cost from a dict with total/compute/energy_micros, device_class, device_hours and energy_kwh."""
    return common_pb2.Cost(total=money(c["total_micros"], currency), compute=money(c["compute_micros"], currency),
                           energy=money(c["energy_micros"], currency), device_class=c["device_class"],
                           device_hours=c["device_hours"], energy_kwh=c["energy_kwh"])


def dtype_name(value: int) -> str:
    """``DTYPE_FP32`` (as sent) -> ``"FP32"``; a number the contract does not define is INVALID_ARGUMENT
    (proto3 enums are open, so a raw client can send any integer)."""
    try:
        return common_pb2.DType.Name(value).removeprefix("DTYPE_")
    except ValueError:
        raise InvalidArgument(f"dtype {value} is not a margin.v1.DType") from None


def dtype_value(name: str) -> int:
    return common_pb2.DType.Value(f"DTYPE_{name}")


def signature_from_proto(msg: common_pb2.Signature) -> Signature:
    def spec(t: common_pb2.TensorSpec) -> TensorSpec:
        return TensorSpec(t.name, dtype_name(t.dtype), tuple(t.shape))
    return Signature(tuple(spec(t) for t in msg.inputs), tuple(spec(t) for t in msg.outputs))


def signature_to_proto(sig: Signature) -> common_pb2.Signature:
    def spec(t: TensorSpec) -> common_pb2.TensorSpec:
        return common_pb2.TensorSpec(name=t.name, dtype=dtype_value(t.dtype), shape=t.shape)
    return common_pb2.Signature(inputs=[spec(t) for t in sig.inputs], outputs=[spec(t) for t in sig.outputs])
