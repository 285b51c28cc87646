"""The contract between the object sources (API watch, manifest directory) and their consumer.

A source hands raw API JSON (plain dicts, exactly as the apiserver or a manifest file spells them)
to a `Sink`. Kinds are "Service", "EndpointSlice" and "Node".

- `replace(kind, objects)` delivers the complete current set of one kind, after a (re)list or a
  manifest change. Sources never call it because of an error: an empty list means "there are none".
  `objects` is an iterable to be read once (the API source decodes list pages while the sink
  reads them, so that the raw JSON of a large list is never all alive at once). Reading it may
  raise (a page failed to arrive): the sink must then change nothing, so it converts everything
  first and updates its state only at the end.
- `apply(kind, event_type, obj)` delivers one watch event: ADDED, MODIFIED or DELETED.

Implementations must be thread-safe: the API source calls from one thread per kind.

A `Source` (kproxy.kube.watch.KubeSource, kproxy.kube.manifests.ManifestSource) feeds a sink from
its own threads once started, until the stop event it was built with is set.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

RawObject = dict[str, Any]

KINDS = ("Service", "EndpointSlice", "Node")
EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED")


class Sink(Protocol):
    def replace(self, kind: str, objects: Iterable[RawObject]) -> None: ...

    def apply(self, kind: str, event_type: str, obj: RawObject) -> None: ...


class Source(Protocol):
    def start(self) -> None:
        """Start feeding the sink (returns at once)."""

    def wait_synced(self, timeout: float) -> bool:
        """True once every kind was listed at least once (waits up to `timeout` seconds)."""

    def join(self, timeout: float) -> bool:
        """After the stop event: wait for the source's threads; True when they all ended."""
