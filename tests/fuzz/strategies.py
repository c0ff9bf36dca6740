"""Hypothesis strategies for random margin.v1 messages, built from their descriptors (a new field or message is
covered without changes here).

Every field may be set or left out; values lean to the edges: huge and negative integers, NaN and ±inf, strings
with newlines, control characters or 10,000 characters, Timestamps out of range (nanos ≥ 1e9, year 10000),
Structs holding NaN and architecture-like sizes (hidden [1e6, 1e6]), enum numbers the contract does not define. A
pool of real names (the seeded tenant's model, deployment and job, known families, datasets, device classes) and
*templates* — valid messages of some types, of which random fields are replaced — make many requests get past
the first check and reach real objects rather than stop at INVALID_ARGUMENT or NOT_FOUND.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from hypothesis import strategies as st

FD = pb_descriptor.FieldDescriptor
MAX_DEPTH = 4
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

BASE_NAMES = ("digits", "mlp", "cnn", "minilm", "sklearn:digits", "sklearn:iris", "margin:sentences", "cpu",
              "nvidia-a100", "accuracy", "cosine", "USD", "EUR", "prod", "latest", "1", "_platform", "admin",
              "dynamic_int8", "static_int8", "embedding_int8", "fp16", "input", "logits", "triton/cpu", "worker/cpu",
              "serving", "worker", "READY", "training:1:1", "mk_abc_def", "http://127.0.0.1:8000/x")
ODD_STRINGS = ("", " ", "x\n", "x\r\n", "\n", "\t", "\x00", "a\x00b", "\x7f", "\u0085", "\u2028", "\u202e", "é",
               "日本", "..", "../etc/passwd", "a/b", "-a", ".a", "a" * 101, "x" * 10_000, "%s%n", "{}", "null",
               "NaN", "1e400", "-1", "0", "99999999999999999999", "Bearer x")
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 0.5, 1.0, 1e6, 2.0**53 + 1)
SPECIAL_INTS = (0, 1, -1, 2, 8, 64, 1000, 10**6, 2**31 - 1, -(2**31), 2**53 + 1, 2**62, 2**63 - 1, -(2**63))
TS_SECONDS = (0, -1, 1_700_000_000, 253_402_300_799, 253_402_300_800, -62_135_596_800, -62_135_596_801,
              2**63 - 1, -(2**63))
TS_NANOS = (0, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31))


def text_strategy(pool: Iterable[str]) -> st.SearchStrategy[str]:
    names = tuple(dict.fromkeys((*pool, *BASE_NAMES)))
    return st.one_of(st.sampled_from(names), st.sampled_from(ODD_STRINGS),
                     st.text(st.characters(blacklist_categories=("Cs",)), max_size=24))


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(max(lo, 0), 10), st.sampled_from([i for i in SPECIAL_INTS if lo <= i <= hi]),
                     st.integers(lo, hi))


def _floats(width: int) -> st.SearchStrategy[float]:
    return st.one_of(st.floats(0, 1, width=width), st.sampled_from(SPECIAL_FLOATS), st.floats(width=width))


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    return st.builds(timestamp_pb2.Timestamp, seconds=st.one_of(st.sampled_from(TS_SECONDS), st.integers(*INT64)),
                     nanos=st.one_of(st.sampled_from(TS_NANOS), st.integers(*INT32)))


def struct_values(text: st.SearchStrategy[str]) -> st.SearchStrategy:
    sizes = st.one_of(st.sampled_from([1, 8, 64, 128, 8192, 1e6, 1e12, 0, -1, 0.5, math.nan, math.inf, True, "8"]),
                      st.floats())
    leaves = st.one_of(st.none(), st.booleans(), sizes, text)
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(text, inner, max_size=3)), max_leaves=8)


def architectures(text: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    """Dicts shaped like an architecture (family, sizes) with values at the edges."""
    size = st.one_of(st.sampled_from([1, 8, 10, 64, 8192, 1e6, 0, -1, 2.5, math.nan, math.inf, -math.inf, True,
                                      "8", None]), st.integers(-10, 10**7))
    return st.fixed_dictionaries({}, optional={
        "family": st.one_of(st.sampled_from(["mlp", "cnn", "minilm", ""]), text),
        "input_dim": size, "image_size": size, "num_classes": size, "dropout": st.one_of(size, st.floats()),
        "hidden": st.one_of(st.lists(size, max_size=4), size), "channels": st.one_of(st.lists(size, max_size=4), size),
        "config": st.dictionaries(st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size", "vocab_size", "max_position_embeddings",
                                                   "type_vocab_size"]), size, max_size=7)})


def structs(text: st.SearchStrategy[str]) -> st.SearchStrategy[struct_pb2.Struct]:
    def build(values: dict) -> struct_pb2.Struct:
        msg = struct_pb2.Struct()
        msg.update(values)
        return msg
    return st.one_of(architectures(text), st.dictionaries(text, struct_values(text), max_size=4)).map(build)


class MessageStrategies:
    """Strategies for messages of any type, sharing one pool of strings and the templates (message full name ->
    valid messages of that type); built lazily and cached per type."""

    def __init__(self, pool: Iterable[str] = (), templates: Mapping[str, Sequence[Message]] | None = None):
        self.text = text_strategy(pool)
        self._templates = dict(templates or {})
        self._cache: dict[tuple[str, int], st.SearchStrategy] = {}

    def of(self, descriptor: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        key = (descriptor.full_name, depth)
        if key not in self._cache:
            self._cache[key] = st.deferred(lambda: self._build(descriptor, depth))
        return self._cache[key]

    def _build(self, descriptor: pb_descriptor.Descriptor, depth: int) -> st.SearchStrategy[Message]:
        templates = self._templates.get(descriptor.full_name)
        special = {"google.protobuf.Timestamp": timestamps, "google.protobuf.Struct": lambda: structs(self.text)}
        if descriptor.full_name in special:
            strategy = special[descriptor.full_name]()
            return st.one_of(strategy, st.sampled_from(templates)) if templates else strategy
        cls = message_factory.GetMessageClass(descriptor)
        if depth >= MAX_DEPTH:
            return st.just(cls())
        fields = {f.name: self._field(f, depth) for f in descriptor.fields}
        random = st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(cls(), descriptor, values))
        if not templates or not fields:
            return random

        def mutated(template: Message) -> st.SearchStrategy[Message]:
            """The template with at most two of its fields replaced (or cleared) by random values."""
            names = st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)
            return names.flatmap(lambda chosen: st.fixed_dictionaries(
                {n: fields[n] for n in chosen}).map(lambda values: _build(template, descriptor, values)))
        from_templates = st.sampled_from(templates).flatmap(mutated)
        return st.one_of(random, from_templates, from_templates)

    def _field(self, f: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key = self._scalar(f.message_type.fields_by_name["key"], depth)
            return st.dictionaries(key, self._scalar(f.message_type.fields_by_name["value"], depth), max_size=3)
        one = self._scalar(f, depth)
        return st.lists(one, max_size=3) if f.is_repeated else one

    def _scalar(self, f: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy:
        t = f.type
        if t == FD.TYPE_MESSAGE:
            return self.of(f.message_type, depth + 1)
        if t == FD.TYPE_STRING:
            return self.text
        if t == FD.TYPE_BYTES:
            return st.one_of(st.binary(max_size=64), st.sampled_from([b"\x00" * 256, bytes(range(256)) * 16]))
        if t == FD.TYPE_BOOL:
            return st.booleans()
        if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return _floats(64 if t == FD.TYPE_DOUBLE else 32)
        if t == FD.TYPE_ENUM:
            return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]),
                             st.sampled_from([-1, 99, 2**31 - 1]))
        if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
            return _ints(*INT32)
        if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
            return _ints(*UINT32)
        if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
            return _ints(*UINT64)
        return _ints(*INT64)


def _build(base: Message, descriptor: pb_descriptor.Descriptor, values: dict) -> Message:
    msg = type(base)()
    msg.CopyFrom(base)
    for name, value in values.items():
        msg.ClearField(name)
        _assign(msg, descriptor.fields_by_name[name], value)
    return msg


def _assign(msg: Message, f: pb_descriptor.FieldDescriptor, value) -> None:
    target = getattr(msg, f.name)
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        for k, v in value.items():
            if f.message_type.fields_by_name["value"].message_type is not None:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif f.is_repeated:
        if f.message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif f.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(msg, f.name, value)
