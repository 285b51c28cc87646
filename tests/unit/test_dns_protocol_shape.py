"""The daemon-to-worker protocol's version follows the shape of what crosses the pipe.

`kproxy.dns.frames.PROTOCOL` must change whenever the pickled classes sent to the DNS workers
change (see the frames module's docstring); a worker from a kproxy upgraded in place refuses a
daemon of another version instead of misreading its model. The version is bumped by hand, so
this test records the classes' fields (names, types, defaults) for the current version: a
change to any of them fails here until PROTOCOL is bumped and the shape below updated with it.
(What the bytes inside a field mean, e.g. DnsSlice.addrs' packing, is not visible in the shape:
their docstrings say to bump PROTOCOL for those too.)
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from kproxy.dns import frames
from kproxy.dns.index import DnsPort, DnsService, DnsSlice, ModelDelta
from kproxy.dns.options import DNSOptions

# PROTOCOL -> the fingerprint of the shapes below at that version.
SHAPES = {2: "b7c381d6c3bbfd2c"}


def _text(annotation: object) -> str:
    """An annotation as written (a NamedTuple's are ForwardRefs under postponed evaluation)."""
    return str(getattr(annotation, "__forward_arg__", annotation))


def shape(cls: type) -> list[tuple[str, str, str]]:
    """(field, annotation, default) of a dataclass or NamedTuple, in order."""
    if dataclasses.is_dataclass(cls):
        out = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = f"factory {f.default_factory.__name__}"
            else:
                default = "-"
            out.append((f.name, _text(f.type), default))
        return out
    defaults: dict[str, Any] = getattr(cls, "_field_defaults", {})
    annotations = cls.__annotations__
    return [
        (name, _text(annotations[name]), repr(defaults[name]) if name in defaults else "-")
        for name in cls._fields  # type: ignore[attr-defined]
    ]


def fingerprint() -> str:
    text = repr(
        [
            (cls.__qualname__, shape(cls))
            for cls in (ModelDelta, DnsService, DnsSlice, DnsPort, DNSOptions)
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_the_pickled_classes_have_the_shape_recorded_for_this_protocol() -> None:
    got = fingerprint()
    assert SHAPES.get(frames.PROTOCOL) == got, (
        f"the classes sent to the DNS workers changed shape (fingerprint {got}) without a new "
        f"kproxy.dns.frames.PROTOCOL (now {frames.PROTOCOL}): bump PROTOCOL and record "
        f"{{{frames.PROTOCOL + 1}: {got!r}}} in SHAPES"
    )


def test_the_fingerprint_sees_a_changed_field() -> None:
    before = shape(DnsPort)
    changed = dataclasses.make_dataclass("DnsPort", [("name", str), ("port", int)])
    assert shape(changed) != before
