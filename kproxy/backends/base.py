"""The contract every dataplane backend (iptables, IPVS) implements for the daemon."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kproxy.errors import DataplaneError
from kproxy.model.store import Changes, Snapshot


class SyncError(DataplaneError):
    """A sync could not be applied; the next sync must be full."""


@dataclass(frozen=True, slots=True)
class SyncResult:
    full: bool
    services_written: int = 0
    rules: dict[str, int] = field(default_factory=dict)  # table -> rule count programmed
    detail: str = ""


class Proxier(Protocol):
    """One dataplane for one node. `sync` reconciles the kernel with `snapshot`.

    With `full=False` the proxier may rewrite only `changes.services`; it must still be correct
    for any service whose state it has not seen before. Never flushes what is already there:
    start-up is a reconcile, so established connections survive restarts.
    """

    def sync(self, snapshot: Snapshot, changes: Changes, *, full: bool) -> SyncResult: ...

    def cleanup(self) -> None: ...


@runtime_checkable
class DriftCheck(Protocol):
    """A proxier that can tell cheaply whether its kernel state is still what it wrote.

    The sync loop calls `drift()` on every periodic sync (see kproxy.runtime.runner): None means
    "still ours" (and must cost far less than a full sync: the loop runs it every sync period);
    otherwise a short description of what changed, and the sync becomes a full one.
    """

    def drift(self) -> str | None: ...
