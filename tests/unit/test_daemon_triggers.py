"""The syncer's side of the sync triggers: what a periodic sync does with each kind of proxier
(a drift check that finds nothing, one that finds tampering, none at all), with fake proxiers
in place of the kernel backends."""

from __future__ import annotations

import pytest

from kproxy.backends.base import SyncResult
from kproxy.metrics import Metrics
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Changes, Snapshot, Store
from kproxy.runtime.dataplane import Plane
from kproxy.runtime.runner import SyncPlan
from kproxy.runtime.syncer import Syncer


class FakeProxier:
    """Records the syncs it is asked for."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def sync(self, snapshot: Snapshot, changes: Changes, *, full: bool) -> SyncResult:
        self.calls.append(full)
        return SyncResult(full=full)

    def cleanup(self) -> None:
        pass


class CheckingProxier(FakeProxier):
    """A proxier with a drift check that reports `found`."""

    def __init__(self, found: str | None) -> None:
        super().__init__()
        self.found = found
        self.checks = 0

    def drift(self) -> str | None:
        self.checks += 1
        return self.found


def daemon_with(proxier: FakeProxier) -> Syncer:
    return Syncer(
        Store(),
        [Plane(family=4, options=ProxyOptions(node_name="n"), proxier=proxier)],
        metrics=Metrics(),
        after_sync=lambda snapshot, changes, full: None,
        on_synced=lambda services: None,
    )


PERIODIC = SyncPlan(full=False, reason="periodic", check=True)


def counter(daemon: Syncer, name: str, reason: str) -> float:
    value = daemon.metrics.registry.get_sample_value(f"{name}_total", {"reason": reason})
    return value or 0.0


def test_periodic_sync_with_an_intact_dataplane_is_partial() -> None:
    proxier = CheckingProxier(found=None)
    daemon = daemon_with(proxier)
    assert daemon.sync(PERIODIC) == (True, False)
    assert proxier.checks == 1 and proxier.calls == [False]
    assert counter(daemon, "kproxy_sync_partial_proxy_rules", "periodic") == 1


def test_periodic_sync_that_finds_tampering_is_full() -> None:
    proxier = CheckingProxier(found="nat: KUBE-SVC-X flushed")
    daemon = daemon_with(proxier)
    assert daemon.sync(PERIODIC) == (True, True)
    assert proxier.calls == [True]
    assert counter(daemon, "kproxy_sync_full_proxy_rules", "tampered") == 1
    assert daemon.metrics.registry.get_sample_value(
        "kproxy_sync_proxy_rules_drift_detected_total"
    ) == pytest.approx(1)


def test_change_syncs_skip_the_check() -> None:
    proxier = CheckingProxier(found="would be drift")
    daemon = daemon_with(proxier)
    assert daemon.sync(SyncPlan(full=False, reason="change")) == (True, False)
    assert proxier.checks == 0 and proxier.calls == [False]


def test_a_proxier_without_a_check_gets_a_full_periodic_sync() -> None:
    proxier = FakeProxier()
    daemon = daemon_with(proxier)
    assert daemon.sync(PERIODIC) == (True, True)
    assert proxier.calls == [True]
    assert counter(daemon, "kproxy_sync_full_proxy_rules", "periodic") == 1
