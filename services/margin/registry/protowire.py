"""Walking a serialized protobuf message's fields without parsing it, to read a few small fields of a large message.

An ONNX model is one protobuf of up to 2 GiB, nearly all of it weights. Reading its graph's inputs and outputs
with the protobuf library would copy and parse every weight; walking the wire format over a memory map reads only
the field headers on the way (``https://protobuf.dev/programming-guides/encoding/``).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class Field:
    number: int
    wire_type: int
    start: int  # the value's bytes: for LEN, the payload without its length prefix
    end: int


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(buf: memoryview, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """The fields of the message in ``buf[start:end]``, in order (groups, unused since proto2, are refused)."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            _, after = _varint(buf, pos, end)
        elif wire_type == I64:
            after = pos + 8
        elif wire_type == LEN:
            length, pos = _varint(buf, pos, end)
            after = pos + length
        elif wire_type == I32:
            after = pos + 4
        else:
            raise WireError(f"field {number}: wire type {wire_type} is not supported")
        if number == 0 or after > end:
            raise WireError(f"field {number} is malformed or runs past the end of its message")
        yield Field(number, wire_type, pos, after)
        pos = after


def submessages(buf: memoryview, number: int, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """The length-delimited fields numbered ``number`` (a message field's occurrences) of the message."""
    return (f for f in fields(buf, start, end) if f.number == number and f.wire_type == LEN)
