"""The bridge from the sources (API watch, manifest directory) to the model `Store`.

`StoreSink` implements the sources' `Sink` protocol: it converts raw objects and updates the
store. An object that cannot be converted is logged with its namespace/name and reason, counted,
and left out: it never stops the other services. A refusal is logged once per object and
reason (not again on every relist or manifest reload, again once the object was accepted in
between); what conversion accepts only leniently (leading-zero IPv4 addresses) once per object
and text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from kproxy.kube.convert import (
    InvalidObject,
    object_ref,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)
from kproxy.kube.validate import short
from kproxy.model.objects import EndpointSlice, NodeInfo, Ref, Service
from kproxy.model.store import Store

log = logging.getLogger("kproxy.kube")

RawObject = dict[str, Any]
NOTED_MAX = 10_000  # remembered notes; past this the memory starts over (a note may repeat)


class StoreSink:
    """Converts raw objects and feeds them to a Store. Safe to call from several threads."""

    def __init__(
        self,
        store: Store,
        *,
        node_name: str,
        on_invalid: Callable[[str], None] | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._node_name = node_name
        self._on_invalid = on_invalid or (lambda kind: None)
        self._on_event = on_event or (lambda kind: None)
        self._noted: set[tuple[str, str, str, str]] = set()
        self._refused: dict[tuple[str, str, str], set[str]] = {}

    def _invalid(self, kind: str, obj: RawObject, reason: str) -> None:
        self._on_invalid(kind)
        ns, name = object_ref(obj)
        if len(self._refused) >= NOTED_MAX:
            self._refused.clear()
        reasons = self._refused.setdefault((kind, ns, name), set())
        if reason in reasons:
            return
        reasons.add(reason)
        ref = f"{short(ns)}/{short(name)}"
        log.warning(
            "skipping invalid %s %s: %s",
            kind,
            ref,
            reason,
            extra={"kind": kind, "object": ref, "reason": reason},
        )

    def _accepted(self, kind: str, obj: RawObject) -> None:
        if self._refused:
            self._refused.pop((kind, *object_ref(obj)), None)

    def _noter(self, kind: str, obj: RawObject) -> Callable[[str], None]:
        def note(text: str) -> None:
            ns, name = object_ref(obj)
            key = (kind, ns, name, text)
            if key in self._noted:
                return
            if len(self._noted) >= NOTED_MAX:
                self._noted.clear()
            self._noted.add(key)
            ref = f"{short(ns)}/{short(name)}"
            log.warning("accepting %s %s: %s", kind, ref, text, extra={"kind": kind, "object": ref})

        return note

    def _service(self, obj: RawObject) -> Service | None:
        try:
            svc = parse_service(obj, on_note=self._noter("Service", obj))
        except (InvalidObject, TypeError, AttributeError, KeyError) as err:
            self._invalid("Service", obj, str(err) or type(err).__name__)
            return None
        self._accepted("Service", obj)
        return svc

    def _slice(self, obj: RawObject) -> EndpointSlice | None:
        bad: list[str] = []

        def bad_endpoint(reason: str) -> None:
            bad.append(reason)
            self._invalid("EndpointSlice", obj, f"endpoint skipped: {reason}")

        try:
            sl = parse_endpoint_slice(
                obj, on_bad_endpoint=bad_endpoint, on_note=self._noter("EndpointSlice", obj)
            )
        except (InvalidObject, TypeError, AttributeError, KeyError) as err:
            self._invalid("EndpointSlice", obj, str(err) or type(err).__name__)
            return None
        if not bad:
            self._accepted("EndpointSlice", obj)
        return sl

    def _node(self, obj: RawObject) -> NodeInfo | None:
        try:
            node = parse_node(obj, on_note=self._noter("Node", obj))
        except (InvalidObject, TypeError, AttributeError, KeyError) as err:
            self._invalid("Node", obj, str(err) or type(err).__name__)
            return None
        self._accepted("Node", obj)
        return node

    # -- Sink protocol ---------------------------------------------------------------------
    def replace(self, kind: str, objects: Iterable[RawObject]) -> None:
        """Convert every object, then replace the store's set (nothing changes if reading
        `objects` raises). Raw objects are dropped as soon as they are converted."""
        count = 0
        if kind == "Service":
            services = []
            for obj in objects:
                count += 1
                svc = self._service(obj)
                if svc is not None:
                    services.append(svc)
            self._store.replace_services(services)
        elif kind == "EndpointSlice":
            slices = []
            for obj in objects:
                count += 1
                sl = self._slice(obj)
                if sl is not None:
                    slices.append(sl)
            self._store.replace_slices(slices)
        elif kind == "Node":
            mine = []
            for obj in objects:
                count += 1
                if object_ref(obj)[1] == self._node_name:
                    mine.append(obj)
            node = self._node(mine[0]) if mine else None
            self._store.set_node(node)
        for _ in range(count):  # a (re)list counts each object as a change, as kube-proxy's adds do
            self._on_event(kind)

    def apply(self, kind: str, event_type: str, obj: RawObject) -> None:
        self._on_event(kind)
        ns, name = object_ref(obj)
        ref = Ref(ns, name)
        if kind == "Service":
            svc = None if event_type == "DELETED" else self._service(obj)
            if svc is None:
                self._store.delete_service(ref)
            else:
                self._store.set_service(svc)
        elif kind == "EndpointSlice":
            sl = None if event_type == "DELETED" else self._slice(obj)
            if sl is None:
                self._store.delete_slice(ref)
            else:
                self._store.set_slice(sl)
        elif kind == "Node" and name == self._node_name:
            self._store.set_node(None if event_type == "DELETED" else self._node(obj))
