"""The rules of the Leases kproxy keeps (coordination.k8s.io/v1), without I/O.

Two uses, one record format (`spec.holderIdentity`, `leaseDurationSeconds`, `renewTime`,
`acquireTime`, `leaseTransitions`):
- `kproxy-lb-allocator`: leader election; exactly one agent allocates addresses at a time.
- `kproxy-agent-<node>`: each agent's heartbeat; the layer-2 election counts a node only while
  its agent renews this Lease (see kproxy.lb.select).

Expiry is judged the way client-go's leader election judges it: by when *this* process last saw
the record change (a monotonic clock), never by comparing `renewTime` with the local wall clock,
so clock skew between nodes cannot make two leaders. A holder that stops cleanly releases its
Lease (empty holderIdentity), which anyone may take at once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

ALLOCATOR_LEASE = "kproxy-lb-allocator"
AGENT_LEASE_PREFIX = "kproxy-agent-"


def agent_lease_name(node: str) -> str:
    return f"{AGENT_LEASE_PREFIX}{node}"


def micro_time(now: float) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    holder: str = ""
    duration: int = 0
    renew_time: str = ""
    acquire_time: str = ""
    transitions: int = 0
    resource_version: str = ""

    @classmethod
    def from_raw(cls, obj: dict[str, Any]) -> LeaseRecord:
        spec = obj.get("spec") or {}
        meta = obj.get("metadata") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration=int(spec.get("leaseDurationSeconds") or 0),
            renew_time=str(spec.get("renewTime") or ""),
            acquire_time=str(spec.get("acquireTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=str(meta.get("resourceVersion") or ""),
        )

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "holderIdentity": self.holder or None,
            "leaseDurationSeconds": self.duration,
            "leaseTransitions": self.transitions,
        }
        if self.renew_time:
            out["renewTime"] = self.renew_time
        if self.acquire_time:
            out["acquireTime"] = self.acquire_time
        return out

    def key(self) -> tuple[str, str, int]:
        """What changes on every renewal (the observed-change test)."""
        return (self.holder, self.renew_time, self.transitions)


@dataclass(slots=True)
class Observation:
    """The last record seen and the local monotonic time it was first seen in that form."""

    record: LeaseRecord
    seen_at: float

    def see(self, record: LeaseRecord, now: float) -> None:
        if record.key() != self.record.key():
            self.seen_at = now
        self.record = record

    def expired(self, now: float) -> bool:
        return not self.record.holder or now - self.seen_at > self.record.duration


def claim(current: LeaseRecord | None, *, me: str, duration: int, now_wall: float) -> LeaseRecord:
    """The record to write to hold (or keep holding) the Lease."""
    stamp = micro_time(now_wall)
    if current is None:
        return LeaseRecord(me, duration, stamp, stamp, 0)
    if current.holder == me:
        return LeaseRecord(
            me,
            duration,
            stamp,
            current.acquire_time or stamp,
            current.transitions,
            current.resource_version,
        )
    return LeaseRecord(
        me, duration, stamp, stamp, current.transitions + 1, current.resource_version
    )


def release(current: LeaseRecord, *, now_wall: float) -> LeaseRecord:
    """The record that gives the Lease up (anyone may take it at once)."""
    return LeaseRecord(
        "",
        1,
        micro_time(now_wall),
        current.acquire_time,
        current.transitions,
        current.resource_version,
    )


def should_try(observed: Observation | None, *, me: str, now: float) -> bool:
    """May `me` write the Lease now? (It holds it, nobody does, or the holder went quiet.)"""
    if observed is None:
        return True
    return observed.record.holder == me or observed.expired(now)
