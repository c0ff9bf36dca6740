"""Conversions between margin.v1 messages and plain Python values, shared by every servicer."""
from __future__ import annotations

import math
from datetime import UTC, datetime

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from margin.common.errors import InvalidArgument
from margin.common.tensors import Signature, TensorSpec
from margin.v1 import common_pb2


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


# The range a Timestamp (and a Python datetime) can hold: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


def time_from_proto(ts: timestamp_pb2.Timestamp, what: str) -> datetime:
    """A request's Timestamp as an aware UTC datetime. A client can send any seconds and nanos: outside what a
    Timestamp may hold (years 1 to 9999, nanos 0 to 999,999,999) it is INVALID_ARGUMENT naming the field ``what``."""
    if not (MIN_TIMESTAMP_SECONDS <= ts.seconds <= MAX_TIMESTAMP_SECONDS and 0 <= ts.nanos < 1_000_000_000):
        raise InvalidArgument(f"{what}: seconds={ts.seconds} nanos={ts.nanos} is not a valid time (years 1 to 9999, "
                              "nanos 0 to 999999999)")
    return ts.ToDatetime(tzinfo=UTC)


def finite(value: float, what: str) -> float:
    """A double from a request: NaN and ±inf are INVALID_ARGUMENT naming the field ``what``."""
    if not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number, got {value}")
    return value


def optional_time(msg: Message, field: str, what: str | None = None) -> datetime | None:
    """``msg.<field>`` through :func:`time_from_proto` (named ``what``, default the field), or None when unset."""
    return time_from_proto(getattr(msg, field), what or field) if msg.HasField(field) else None


def struct(value: dict | None) -> struct_pb2.Struct:
    msg = struct_pb2.Struct()
    if value:
        msg.update(value)
    return msg


def _plain(value: struct_pb2.Value, path: str):
    """A Struct value as plain Python. Struct numbers are doubles: whole numbers come back as ints (sizes,
    counts); NaN and ±inf (which JSON cannot hold) are INVALID_ARGUMENT naming where they are."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidArgument(f"{path} must be a finite number, got {number}")
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "struct_value":
        return {k: _plain(v, f"{path}.{k}") for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value.list_value.values)]
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or no kind set


def from_struct(msg: struct_pb2.Struct, what: str = "struct") -> dict:
    """A Struct as a dict, whole numbers as ints; a non-finite number is INVALID_ARGUMENT naming its path
    under ``what`` (e.g. ``spec.architecture.hidden[1]``)."""
    return {k: _plain(v, f"{what}.{k}") for k, v in msg.fields.items()}


def check_structs(msg: Message, what: str) -> None:
    """Raise INVALID_ARGUMENT naming the first non-finite number in any Struct inside ``msg`` (JSON conversion,
    ``json_format.MessageToDict``, would fail on it with a ValueError)."""
    if isinstance(msg, struct_pb2.Struct):
        from_struct(msg, what)
        return
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        name = f"{what}.{field.name}" if what else field.name
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    check_structs(item, f"{name}[{key!r}]")
        elif field.is_repeated:
            for i, item in enumerate(value):
                check_structs(item, f"{name}[{i}]")
        else:
            check_structs(value, name)


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
