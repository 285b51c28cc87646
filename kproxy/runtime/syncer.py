"""One sync: take the store's snapshot and changes, decide full or partial, call each plane's
proxier, record the result (metrics, health, log, readiness) and run the follow-ups.

The sync loop (kproxy.runtime.runner) calls `Syncer.sync` in its thread; `wanted` and
`rejected_services` are read by the inspection socket from other threads (plain reads).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from kproxy import memtrim
from kproxy.backends.base import DriftCheck, SyncError, SyncResult
from kproxy.metrics import Metrics
from kproxy.model.store import Changes, Snapshot, Store, without_proxy_for
from kproxy.runtime.dataplane import Plane
from kproxy.runtime.runner import SyncPlan

log = logging.getLogger("kproxy")


class Syncer:
    def __init__(
        self,
        store: Store,
        planes: Sequence[Plane],
        *,
        metrics: Metrics,
        after_sync: Callable[[Snapshot, Changes, bool], None],
        on_synced: Callable[[int], None],
        dns_service_ip: str = "",
    ) -> None:
        """`after_sync(snapshot, changes, full)` (kproxy.runtime.followups) and
        `on_synced(services)` (health, readiness) after every sync that landed;
        `dns_service_ip`: the Service address kproxy's DNS answers on itself (left unproxied)."""
        self.store = store
        self.planes = list(planes)
        self.metrics = metrics
        self.after_sync = after_sync
        self.on_synced = on_synced
        self.dns_service_ip = dns_service_ip
        self.wanted: tuple[Snapshot, float] | None = None  # last snapshot handed to the planes

    def _all_checkable(self) -> bool:
        return all(isinstance(p.proxier, DriftCheck) for p in self.planes)

    def drift(self) -> str | None:
        """The periodic check: does any plane's kernel state differ from what it wrote?"""
        for plane in self.planes:
            if not isinstance(plane.proxier, DriftCheck):
                continue
            try:
                found = plane.proxier.drift()
            except Exception as err:  # a check that cannot run is treated as drift
                log.exception("drift check of IPv%d rules failed", plane.family)
                found = f"check failed: {err}"
            if found:
                return f"IPv{plane.family}: {found}"
        return None

    def sync(self, plan: SyncPlan) -> tuple[bool, bool]:
        """(landed, full) for the sync loop."""
        snapshot, changes = self.store.take()
        self.metrics.endpoint_changes_pending.set(0)
        self.metrics.service_changes_pending.set(0)
        if self.dns_service_ip:
            snapshot = without_proxy_for(snapshot, self.dns_service_ip)
        full, reason = plan.full, plan.reason
        started = time.monotonic()
        if not full and changes.node_changed:
            full, reason = True, "node"
        if not full and plan.check and not self._all_checkable():
            # a proxier without a cheap drift check keeps the old rule: the periodic sync
            # rewrites everything (nftables until it implements DriftCheck)
            full, reason = True, "periodic"
        if not full and plan.check:
            drift = self.drift()
            if drift:
                self.metrics.drift_detected.inc()
                log.warning("kproxy's rules were changed from outside (%s): full resync", drift)
                full, reason = True, "tampered"
        if full:
            changes = Changes(
                services=changes.services,
                node_changed=True,
                full=True,
                trigger_times=changes.trigger_times,
                queued_at=changes.queued_at,
            )
        self.wanted = (snapshot, time.time())
        results: list[SyncResult] = []
        ok = True
        for plane in self.planes:
            try:
                results.append(plane.proxier.sync(snapshot, changes, full=full))
            except SyncError as err:
                ok = False
                log.error("sync of IPv%d rules failed: %s", plane.family, err)
            except Exception:
                ok = False
                log.exception("sync of IPv%d rules failed", plane.family)
        elapsed = time.monotonic() - started
        self.metrics.rejected_services.set(len(self.rejected_services()))
        if not ok:
            self.metrics.sync_failures.inc()
            self.metrics.restore_failures.inc()
            return False, full
        if not full and any(r.full for r in results):
            full, reason = True, "proxier"  # the proxier found it had to rewrite everything
        self._record(snapshot, changes, results, elapsed=elapsed, full=full, reason=reason)
        self.after_sync(snapshot, changes, full)
        if full:
            memtrim.trim()  # the full render's text is gone: give its pages back
        return True, full

    def rejected_services(self) -> list[dict[str, object]]:
        """The services a proxier left out because the kernel tools refused their rules."""
        out: list[dict[str, object]] = []
        for plane in self.planes:
            for ref, bad in getattr(plane.proxier, "rejected", {}).items():
                out.append({"service": str(ref), "family": plane.family, "error": bad.error})
        return out

    def _record(
        self,
        snapshot: Snapshot,
        changes: Changes,
        results: list[SyncResult],
        *,
        elapsed: float,
        full: bool,
        reason: str,
    ) -> None:
        m = self.metrics
        m.sync_duration.observe(elapsed)
        (m.sync_full_duration if full else m.sync_partial_duration).observe(elapsed)
        (m.sync_full if full else m.sync_partial).labels(reason).inc()
        now = time.time()
        m.last_sync.set(now)
        for trigger in changes.trigger_times:
            if trigger <= now:
                m.network_programming.observe(now - trigger)
        m.services.set(len(snapshot.services))
        tables: dict[str, int] = {}
        for r in results:
            for table, count in r.rules.items():
                tables[table] = tables.get(table, 0) + count
        for table, count in tables.items():
            m.rules.labels(table).set(count)
        written = sum(r.services_written for r in results)
        log.info(
            "synced %s in %.1f ms: %s sync (%s), %d services, %d changed, %d written",
            "all rules" if full else "changes",
            elapsed * 1000,
            "full" if full else "partial",
            reason,
            len(snapshot.services),
            len(changes.services),
            written,
            extra={
                "duration_ms": round(elapsed * 1000, 2),
                "full": full,
                "reason": reason,
                "services": len(snapshot.services),
                "changed": len(changes.services),
                "written": written,
            },
        )
        self.on_synced(len(snapshot.services))
