"""The in-memory cluster model and its change tracking.

`Store` is the one mutable object of the model: the Kubernetes and manifest sources feed it
converted objects, and each sync takes a `Snapshot` (immutable) plus the set of services that
changed since the previous snapshot. That set is what makes partial syncs possible: a backend
rewrites only those services' rules. Thread-safe; the lock is held only for dict updates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from kproxy.model.objects import EndpointSlice, NodeInfo, Ref, Service

_EMPTY: Mapping[Ref, tuple[EndpointSlice, ...]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The cluster as kproxy knows it at one moment. Never mutated."""

    services: Mapping[Ref, Service]
    slices: Mapping[Ref, tuple[EndpointSlice, ...]]
    node: NodeInfo | None = None
    generation: int = 0
    synced: bool = True

    def slices_for(self, ref: Ref) -> tuple[EndpointSlice, ...]:
        return self.slices.get(ref, ())


EMPTY_SNAPSHOT = Snapshot(services=MappingProxyType({}), slices=_EMPTY, synced=False)


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed between two snapshots."""

    services: frozenset[Ref] = frozenset()
    node_changed: bool = False
    full: bool = False
    # earliest EndpointSlice last-change-trigger-time among the changes (for latency metrics)
    trigger_times: tuple[float, ...] = ()
    queued_at: float | None = field(default=None)

    @property
    def empty(self) -> bool:
        return not self.services and not self.node_changed and not self.full


class Store:
    """Current Services, EndpointSlices (by slice ref) and Node, with dirty tracking."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._services: dict[Ref, Service] = {}
        self._slices: dict[Ref, EndpointSlice] = {}
        # each service's slices (in the order they arrived) as the tuples a Snapshot holds,
        # kept up to date per service so that a snapshot is two C-level dict copies, not a
        # rebuild of every group (at 10k services that rebuild cost more than the rest of a
        # one-endpoint sync). The tuple is the only per-service index: a service has a few
        # slices, and a dict per service cost ~4 MB at 10k services.
        self._grouped: dict[Ref, tuple[EndpointSlice, ...]] = {}
        self._node: NodeInfo | None = None
        self._dirty: set[Ref] = set()
        self._node_dirty = False
        self._triggers: list[float] = []
        self._first_queued: float | None = None
        self._generation = 0
        self._listeners: list[Callable[[], None]] = []
        self._synced_kinds: set[str] = set()
        self.required_kinds: frozenset[str] = frozenset({"Service", "EndpointSlice"})

    # -- listeners -------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback` (without arguments, outside the lock) after every change."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    def _touch(self, ref: Ref) -> None:
        self._dirty.add(ref)
        if self._first_queued is None:
            self._first_queued = self._clock()
        self._generation += 1

    # -- services --------------------------------------------------------------------------
    def set_service(self, svc: Service) -> None:
        with self._lock:
            if self._services.get(svc.ref) == svc:
                return
            self._services[svc.ref] = svc
            self._touch(svc.ref)
        self._notify()

    def delete_service(self, ref: Ref) -> None:
        with self._lock:
            if self._services.pop(ref, None) is None:
                return
            self._touch(ref)
        self._notify()

    def replace_services(self, services: Iterable[Service]) -> None:
        new = {s.ref: s for s in services}
        with self._lock:
            for ref in set(self._services) | set(new):
                if self._services.get(ref) != new.get(ref):
                    self._touch(ref)
            self._services = new
            self._synced_kinds.add("Service")
            self._generation += 1
        self._notify()

    # -- endpoint slices -------------------------------------------------------------------
    def set_slice(self, sl: EndpointSlice) -> None:
        with self._lock:
            old = self._slices.get(sl.ref)
            if old == sl:
                return
            if old is not None and old.service_ref != sl.service_ref:
                self._drop_slice(old)
            self._put_slice(sl)
        self._notify()

    def delete_slice(self, ref: Ref) -> None:
        with self._lock:
            old = self._slices.get(ref)
            if old is None:
                return
            self._drop_slice(old)
        self._notify()

    def replace_slices(self, slices: Iterable[EndpointSlice]) -> None:
        new = {s.ref: s for s in slices}
        with self._lock:
            for ref, old in list(self._slices.items()):
                if new.get(ref) != old:
                    self._drop_slice(old)
            for ref, sl in new.items():
                if self._slices.get(ref) != sl:
                    self._put_slice(sl)
            self._synced_kinds.add("EndpointSlice")
            self._generation += 1
        self._notify()

    def _put_slice(self, sl: EndpointSlice) -> None:
        ref = sl.ref
        self._slices[ref] = sl
        service_ref = sl.service_ref
        group = self._grouped.get(service_ref, ())
        for i, old in enumerate(group):
            if old.namespace == sl.namespace and old.name == sl.name:
                self._grouped[service_ref] = (*group[:i], sl, *group[i + 1 :])
                break
        else:
            self._grouped[service_ref] = (*group, sl)
        if sl.trigger_time is not None:
            self._triggers.append(sl.trigger_time)
        self._touch(service_ref)

    def _drop_slice(self, sl: EndpointSlice) -> None:
        self._slices.pop(sl.ref, None)
        service_ref = sl.service_ref
        group = self._grouped.get(service_ref)
        if group is not None:
            rest = tuple(g for g in group if g.namespace != sl.namespace or g.name != sl.name)
            if rest:
                self._grouped[service_ref] = rest
            else:
                del self._grouped[service_ref]
        self._touch(service_ref)

    # -- node ------------------------------------------------------------------------------
    def set_node(self, node: NodeInfo | None) -> None:
        with self._lock:
            if node == self._node:
                self._synced_kinds.add("Node")
                return
            self._node = node
            self._node_dirty = True
            self._synced_kinds.add("Node")
            self._generation += 1
            if self._first_queued is None:
                self._first_queued = self._clock()
        self._notify()

    def mark_synced(self, kind: str) -> None:
        with self._lock:
            self._synced_kinds.add(kind)
        self._notify()

    # -- reading ---------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        with self._lock:
            return self.required_kinds <= self._synced_kinds

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._dirty)

    @property
    def oldest_pending(self) -> float | None:
        """Clock time at which the oldest change not yet taken by `take` was queued."""
        with self._lock:
            return self._first_queued

    def peek(self) -> Snapshot:
        """The current snapshot, without consuming the pending changes."""
        with self._lock:
            return self._snapshot_locked()

    def take(self) -> tuple[Snapshot, Changes]:
        """The current snapshot and everything that changed since the last `take`."""
        with self._lock:
            snap = self._snapshot_locked()
            changes = Changes(
                services=frozenset(self._dirty),
                node_changed=self._node_dirty,
                trigger_times=tuple(self._triggers),
                queued_at=self._first_queued,
            )
            self._dirty = set()
            self._node_dirty = False
            self._triggers = []
            self._first_queued = None
            return snap, changes

    def _snapshot_locked(self) -> Snapshot:
        return Snapshot(
            services=MappingProxyType(dict(self._services)),
            slices=MappingProxyType(dict(self._grouped)),
            node=self._node,
            generation=self._generation,
            synced=self.required_kinds <= self._synced_kinds,
        )


def without_proxy_for(snapshot: Snapshot, ip: str) -> Snapshot:
    """The snapshot with the service owning cluster IP `ip` left unproxied: kproxy answers DNS
    on the cluster DNS Service IP itself, so no rule may DNAT that address away."""
    owners = [ref for ref, svc in snapshot.services.items() if ip in svc.cluster_ips]
    if not owners:
        return snapshot
    services = dict(snapshot.services)
    for ref in owners:
        services[ref] = replace(services[ref], skip_proxy=True)
    return replace(snapshot, services=MappingProxyType(services))
