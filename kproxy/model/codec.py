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

import dataclasses
import types
import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from kproxy.model.objects import EndpointSlice, NodeInfo, Ref, Service
from kproxy.model.store import Snapshot

T = TypeVar("T")

_MISSING = dataclasses.MISSING
_fields_cache: dict[type, tuple[tuple[str, Any], ...]] = {}
_hints_cache: dict[type, dict[str, Any]] = {}


def _defaults(cls: type) -> tuple[tuple[str, Any], ...]:
    """(field name, default or _MISSING) of a dataclass, cached."""
    out = _fields_cache.get(cls)
    if out is None:
        items = []
        for f in dataclasses.fields(cls):
            if f.default is not _MISSING:
                default: Any = f.default
            elif f.default_factory is not _MISSING:
                default = f.default_factory()
            else:
                default = _MISSING
            items.append((f.name, default))
        out = _fields_cache[cls] = tuple(items)
    return out


def encode(value: Any) -> Any:
    """A dataclass (or a tuple/list/mapping of them, or a plain value) as JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for name, default in _defaults(type(value)):
            item = getattr(value, name)
            if item is default or (default is not _MISSING and item == default):
                continue
            out[name] = encode(item)
        return out
    if isinstance(value, tuple | list | frozenset | set):
        return [encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    return value


def _hints(cls: type) -> dict[str, Any]:
    out = _hints_cache.get(cls)
    if out is None:
        out = _hints_cache[cls] = typing.get_type_hints(cls)
    return out


def decode(cls: type[T], data: Any) -> T:
    """Rebuild a `cls` dataclass from `encode`'s output (unknown fields ignored)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    kwargs = {
        name: _decode_as(hints[name], data[name])
        for name, _ in _defaults(cls)
        if name in data and name in hints
    }
    return cls(**kwargs)


def _decode_as(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return decode(tp, value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode_as(args[0], v) for v in value)
        return tuple(_decode_as(a, v) for a, v in zip(args, value, strict=False))
    if origin is frozenset:
        return frozenset(_decode_as(args[0], v) for v in value)
    if origin is typing.Union or origin is types.UnionType:
        options = [a for a in args if a is not type(None)]
        if isinstance(value, dict):
            for a in options:
                if isinstance(a, type) and dataclasses.is_dataclass(a):
                    return decode(a, value)
        if isinstance(value, list):
            for a in options:
                if typing.get_origin(a) in (tuple, frozenset):
                    return _decode_as(a, value)
        return value
    return value


# -- the snapshot --------------------------------------------------------------------------------
def encode_snapshot(snapshot: Snapshot) -> dict[str, Any]:
    """Services, their EndpointSlices (by service) and the Node, as compact JSON-ready data."""
    return {
        "generation": snapshot.generation,
        "synced": snapshot.synced,
        "node": encode(snapshot.node) if snapshot.node is not None else None,
        "services": [encode(svc) for svc in snapshot.services.values()],
        "slices": [encode(sl) for group in snapshot.slices.values() for sl in group],
    }


def decode_snapshot(data: Mapping[str, Any]) -> Snapshot:
    services: dict[Ref, Service] = {}
    for item in data.get("services", ()):
        svc = decode(Service, item)
        services[svc.ref] = svc
    grouped: dict[Ref, list[EndpointSlice]] = {}
    for item in data.get("slices", ()):
        sl = decode(EndpointSlice, item)
        grouped.setdefault(sl.service_ref, []).append(sl)
    node = data.get("node")
    return Snapshot(
        services=MappingProxyType(services),
        slices=MappingProxyType({ref: tuple(group) for ref, group in grouped.items()}),
        node=decode(NodeInfo, node) if node is not None else None,
        generation=int(data.get("generation", 0)),
        synced=bool(data.get("synced", True)),
    )
