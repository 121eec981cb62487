"""Hypothesis strategies that build any protobuf message from its descriptor, for fuzzing gRPC services.

Lifecycle: pure; ``message_strategy(descriptor, texts)`` walks the message's fields once and
returns a strategy of filled messages:
- scalars: integers across the whole range of their wire type (biased to small values, which
  real requests hold, and to the edges), 32-bit floats including NaN, infinities and subnormals
  (biased to [0, 1]), booleans, enum fields as any int32 (unknown values included: proto3 enums
  are open);
- strings from ``texts(field)`` (the caller mixes meaningful words with arbitrary Unicode, per
  field: proto3 strings are valid UTF-8, so no lone surrogates), bytes as arbitrary bytes;
- ``optional`` fields (proto3 presence) set or left unset; a ``oneof`` with none or one member
  set; repeated fields with 0 to ``max_items`` elements; nested messages down to ``max_depth``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

Texts = Callable[[FieldDescriptor], st.SearchStrategy[str]]

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, -1, 0, 1, 2, 2**31 - 1, -(2**31)) if low <= v <= high]
    plausible = st.integers(max(low, 0), min(high, 64))  # what a real request holds: drawn most often
    return st.one_of(
        plausible, plausible, st.integers(max(low, -4), min(high, 300)), st.sampled_from(edges), st.integers(low, high)
    )


def scalar(field: FieldDescriptor, texts: Texts) -> st.SearchStrategy[Any]:
    if field.type in INT_RANGES:
        return integers(*INT_RANGES[field.type])
    if field.type == FieldDescriptor.TYPE_FLOAT:
        plausible = st.floats(0.0, 1.0, width=32)
        return st.one_of(
            plausible, plausible, st.floats(-4.0, 4.0, width=32), st.floats(width=32, allow_subnormal=True)
        )
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_STRING:
        return texts(field)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    raise TypeError(f"{field.full_name}: no strategy for field type {field.type}")


def _synthetic(field: FieldDescriptor) -> bool:
    """A proto3 ``optional`` field: its own one-member oneof named ``_<field>``."""
    oneof = field.containing_oneof
    return oneof is not None and oneof.name == f"_{field.name}" and len(oneof.fields) == 1


def message_strategy(
    descriptor: Descriptor,
    texts: Texts,
    *,
    max_items: int = 4,
    max_depth: int = 3,
) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(descriptor)

    def value(field: FieldDescriptor) -> st.SearchStrategy[Any]:
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            return scalar(field, texts)
        if max_depth <= 0:
            return st.just(GetMessageClass(field.message_type)())
        return message_strategy(field.message_type, texts, max_items=max_items, max_depth=max_depth - 1)

    oneofs = [o for o in descriptor.oneofs if not _synthetic(o.fields[0])]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        out = cls()
        chosen = {o.name: draw(st.sampled_from([None, *o.fields])) for o in oneofs}
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and oneof.name in chosen:
                if chosen[oneof.name] is not field:
                    continue
            elif (_synthetic(field) or field.type == FieldDescriptor.TYPE_MESSAGE) and not draw(st.booleans()):
                continue  # optional / message field left unset
            if field.is_repeated:
                getattr(out, field.name).extend(draw(st.lists(value(field), max_size=max_items)))
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                sub = getattr(out, field.name)
                sub.SetInParent()  # set even when the drawn message is empty (a oneof member counts)
                sub.CopyFrom(draw(value(field)))
            else:
                setattr(out, field.name, draw(value(field)))
        return out

    return build()
