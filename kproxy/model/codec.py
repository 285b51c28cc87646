"""A compact JSON form of kproxy's frozen dataclasses (the model snapshot, the settings), for the
running agent's inspection socket (`kproxy status`/`explain` read the agent's wanted state).

Generic over dataclasses, so a field someone adds to a model object travels without touching this
module: an object is a JSON object of the fields that differ from their default (an endpoint that
is ready, serving and not terminating is just its address and node), tuples are lists, and a
decoder fills the missing fields with their defaults and ignores fields it does not know (an agent
newer than the command). Decoding is driven by the dataclasses' type hints (tuples, unions with
None, nested dataclasses, `int | str`).

`encode_snapshot` runs on request only (never per sync); at 10k services x 10 endpoints it takes
a fraction of a second and produces a few MB (docs/benchmarks.md). Standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import operator
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from kproxy.model.objects import EndpointSlice, NodeInfo, Ref, Service
from kproxy.model.store import Snapshot

T = TypeVar("T")


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Run a bulk encode/decode with the cycle collector paused: building a 10k-service
    document allocates ~10^6 containers and none of them form cycles, but every few hundred
    allocations the collector would walk the (large) heap again (at 10k services that made
    json.loads 8x and the whole request ~3x slower)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_MISSING = dataclasses.MISSING
Convert = Callable[[Any], Any] | None  # None: the value is JSON as it is
_encoders: dict[type, Callable[[Any], dict[str, Any]]] = {}
_decoders: dict[type, _DecodePlan] = {}


# Each dataclass gets an encoder and a decoder planned once from its type hints (which fields,
# their defaults, which need converting), so the per-object work is a loop of getattr and
# compare: at 100k endpoints a generic walk checking every value's type costs ~10x more.
def _fields(cls: type) -> list[tuple[str, Any, Any]]:
    public = getattr(cls, "__codec_fields__", None)
    if public is not None:
        # a record that stores its fields in another shape (Endpoint: an address and a shared
        # state) travels as the fields its constructor takes as keywords
        params = inspect.signature(cls).parameters
        hints = typing.get_type_hints(vars(cls)["__init__"])
        return [
            (
                n,
                _MISSING if params[n].default is inspect.Parameter.empty else params[n].default,
                hints[n],
            )
            for n in public
        ]
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            default: Any = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = _MISSING
        out.append((f.name, default, hints[f.name]))
    return out


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_of(tp: Any) -> Any:
    """X for `X | None` (None for any other type)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _value_encoder(tp: Any) -> Convert:
    if _is_dataclass_type(tp):
        return _encoder(tp)
    inner = _optional_of(tp)
    if inner is not None:
        enc = _value_encoder(inner)
        return None if enc is None else (lambda v: None if v is None else enc(v))
    origin = typing.get_origin(tp)
    if origin in (tuple, frozenset):
        args = typing.get_args(tp)
        item = _value_encoder(args[0]) if len(args) == 2 and args[1] is Ellipsis else None
        if item is None:
            return encode if any(_is_dataclass_type(a) for a in args) else list
        return lambda v: [item(x) for x in v]
    if origin is not None or tp is Any:
        return encode  # anything else: the generic walk
    return None


def _encoder(cls: type) -> Callable[[Any], dict[str, Any]]:
    enc = _encoders.get(cls)
    if enc is not None:
        return enc
    plan: list[tuple[str, Any, Convert]] = []
    getter: list[Callable[[Any], tuple[Any, ...]]] = []

    def encode_object(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (name, default, convert), value in zip(plan, getter[0](obj), strict=True):
            if value is default or value == default:
                continue
            out[name] = value if convert is None else convert(value)
        return out

    _encoders[cls] = encode_object  # before planning: a class may refer to itself
    plan.extend((n, d, _value_encoder(tp)) for n, d, tp in _fields(cls))
    names = [n for n, _d, _c in plan]
    # attrgetter of one name returns the value, not a 1-tuple
    getter.append(
        operator.attrgetter(*names) if len(names) > 1 else (lambda o: (getattr(o, names[0]),))
    )
    return encode_object


def _value_decoder(tp: Any) -> Convert:
    if _is_dataclass_type(tp):
        cls: type = tp
        return lambda v: decode(cls, v)
    inner = _optional_of(tp)
    if inner is not None:
        dec = _value_decoder(inner)
        return None if dec is None else (lambda v: None if v is None else dec(v))
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            each = _value_decoder(args[0])
            if each is None:
                return tuple
            return lambda v: tuple(each(x) for x in v)
        items = [_value_decoder(a) for a in args]
        return lambda v: tuple(x if d is None else d(x) for d, x in zip(items, v, strict=False))
    if origin is frozenset:
        member = _value_decoder(args[0])
        if member is None:
            return frozenset
        return lambda v: frozenset(member(x) for x in v)
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class _DecodePlan:
    known: frozenset[str]
    convert: tuple[tuple[str, Callable[[Any], Any]], ...]  # the fields that need converting


def _decoder(cls: type) -> _DecodePlan:
    plan = _decoders.get(cls)
    if plan is None:
        converters = [(n, _value_decoder(tp)) for n, _d, tp in _fields(cls)]
        plan = _decoders[cls] = _DecodePlan(
            frozenset(n for n, _c in converters),
            tuple((n, c) for n, c in converters if c is not None),
        )
    return plan


def encode(value: Any) -> Any:
    """A dataclass (or a tuple/list/mapping of them, or a plain value) as JSON-ready data:
    a dataclass is an object of its fields that differ from their defaults."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encoder(type(value))(value)
    if isinstance(value, tuple | list | frozenset | set):
        return [encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    return value


def decode(cls: type[T], data: Any) -> T:
    """Rebuild a `cls` dataclass from `encode`'s output (unknown fields ignored, missing ones
    take their defaults)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    plan = _decoder(cls)
    if not data.keys() <= plan.known:  # from a newer agent: drop what this version lacks
        data = {k: v for k, v in data.items() if k in plan.known}
    kwargs = data
    for name, convert in plan.convert:
        value = data.get(name)
        if value is not None:
            if kwargs is data:
                kwargs = dict(data)
            kwargs[name] = convert(value)
    return cls(**kwargs)


# -- the snapshot: rows ---------------------------------------------------------------------------
# 100k endpoints dominate a 10k-service snapshot, so its objects travel as rows: the values of
# every field in order (one C-level attrgetter call per object; json.dumps writes tuples as
# arrays), with the field names once per class in "schema". A reader whose classes gained or lost
# fields maps the names (missing ones take their defaults, unknown ones are dropped).
_row_encoders: dict[type, Callable[[Any], Any]] = {}


def _row_encoder(cls: type) -> Callable[[Any], Any]:
    enc = _row_encoders.get(cls)
    if enc is not None:
        return enc
    fields = _fields(cls)
    names = [n for n, _d, _t in fields]
    getter: Callable[[Any], Any] = (
        operator.attrgetter(*names) if len(names) > 1 else (lambda o: (getattr(o, names[0]),))
    )
    converts = [
        (i, c) for i, (_n, _d, tp) in enumerate(fields) if (c := _row_value_encoder(tp)) is not None
    ]
    if not converts:
        _row_encoders[cls] = getter
        return getter

    def encode_row(obj: Any) -> list[Any]:
        values = list(getter(obj))
        for i, convert in converts:
            values[i] = convert(values[i])
        return values

    _row_encoders[cls] = encode_row
    return encode_row


def _row_value_encoder(tp: Any) -> Convert:
    if _is_dataclass_type(tp):
        return _row_encoder(tp)
    inner = _optional_of(tp)
    if inner is not None:
        enc = _row_value_encoder(inner)
        if enc is None:
            return None
        return lambda v: None if v is None else enc(v)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        each = _row_value_encoder(args[0])
        if each is None:
            return None  # a tuple of plain values is a JSON array as it is
        return lambda v: [each(x) for x in v]
    if origin is frozenset:
        return list
    return None


def _schema(*roots: type) -> dict[str, list[str]]:
    """Field names of `roots` and of every dataclass their fields hold, by class name."""
    out: dict[str, list[str]] = {}
    todo = list(roots)
    while todo:
        cls = todo.pop()
        if cls.__name__ in out:
            continue
        fields = _fields(cls)
        out[cls.__name__] = [n for n, _d, _t in fields]
        for _n, _d, tp in fields:
            stack = [tp]
            while stack:
                t = stack.pop()
                if _is_dataclass_type(t):
                    todo.append(t)
                stack.extend(typing.get_args(t))
    return out


class _RowReader:
    """Row decoders for one document, planned from its schema against this version's classes."""

    def __init__(self, schema: Mapping[str, list[str]]) -> None:
        self._schema = schema
        self._decoders: dict[type, Callable[[Any], Any]] = {}

    def decoder(self, cls: type) -> Callable[[Any], Any]:
        dec = self._decoders.get(cls)
        if dec is not None:
            return dec
        fields = _fields(cls)
        own = [n for n, _d, _t in fields]
        hints = {n: tp for n, _d, tp in fields}
        theirs = list(self._schema.get(cls.__name__, own))
        plan = [(n, self._value(hints[n]) if n in hints else None) for n in theirs]
        if theirs == own and not hasattr(cls, "__codec_fields__"):
            converts = [(i, c) for i, (_n, c) in enumerate(plan) if c is not None]

            def decode_row(row: list[Any]) -> Any:
                for i, convert in converts:  # the row is json.loads' own list: changed in place
                    value = row[i]
                    if value is not None:
                        row[i] = convert(value)
                return cls(*row)

            dec = decode_row
        else:

            def decode_mapped(row: list[Any]) -> Any:
                kwargs = {}
                for (name, convert), value in zip(plan, row, strict=False):
                    if name not in hints:
                        continue
                    kwargs[name] = value if convert is None or value is None else convert(value)
                return cls(**kwargs)

            dec = decode_mapped
        self._decoders[cls] = dec
        return dec

    def _value(self, tp: Any) -> Convert:
        if _is_dataclass_type(tp):
            return self.decoder(tp)
        inner = _optional_of(tp)
        if inner is not None:
            return self._value(inner)  # None never reaches a converter
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                each = self._value(args[0])
                if each is None:
                    return tuple
                return lambda v: tuple(each(x) for x in v)
            return tuple
        if origin is frozenset:
            return frozenset
        return None


def encode_snapshot(snapshot: Snapshot) -> dict[str, Any]:
    """Services, their EndpointSlices and the Node as compact JSON-ready rows (see above)."""
    service = _row_encoder(Service)
    slice_ = _row_encoder(EndpointSlice)
    return {
        "schema": _schema(Service, EndpointSlice, NodeInfo),
        "generation": snapshot.generation,
        "synced": snapshot.synced,
        "node": _row_encoder(NodeInfo)(snapshot.node) if snapshot.node is not None else None,
        "services": [service(svc) for svc in snapshot.services.values()],
        "slices": [slice_(sl) for group in snapshot.slices.values() for sl in group],
    }


def decode_snapshot(data: Mapping[str, Any]) -> Snapshot:
    """The Snapshot `encode_snapshot` wrote (after json.loads; its lists are reused)."""
    reader = _RowReader(data.get("schema", {}))
    service = reader.decoder(Service)
    slice_ = reader.decoder(EndpointSlice)
    services: dict[Ref, Service] = {}
    for row in data.get("services", ()):
        svc = service(row)
        services[svc.ref] = svc
    grouped: dict[Ref, list[EndpointSlice]] = {}
    for row in data.get("slices", ()):
        sl = slice_(row)
        grouped.setdefault(sl.service_ref, []).append(sl)
    node = data.get("node")
    return Snapshot(
        services=MappingProxyType(services),
        slices=MappingProxyType({ref: tuple(group) for ref, group in grouped.items()}),
        node=reader.decoder(NodeInfo)(node) if node is not None else None,
        generation=int(data.get("generation", 0)),
        synced=bool(data.get("synced", True)),
    )
