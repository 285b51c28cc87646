"""Runtime pieces without the kernel: the sync loop's pacing and the DNS-IP exclusion."""

from __future__ import annotations

import itertools
import threading
import time

from kproxy.model.objects import Ref
from kproxy.model.store import Store
from kproxy.runtime.daemon import without_proxy_for
from kproxy.runtime.health import HealthState
from kproxy.runtime.runner import SyncLoop
from tests.support.builders import make_service


def run_loop(loop: SyncLoop, stop: threading.Event, seconds: float) -> None:
    t = threading.Thread(target=loop.run)
    t.start()
    time.sleep(seconds)
    stop.set()
    loop.request()
    t.join(5)
    assert not t.is_alive()


def test_first_sync_is_full_and_requests_coalesce() -> None:
    calls: list[tuple[float, bool]] = []
    stop = threading.Event()
    loop = SyncLoop(
        sync=lambda full: calls.append((time.monotonic(), full)) or True,
        min_interval=0.2,
        max_interval=60,
        stop=stop,
        tick_interval=0.05,
    )
    t = threading.Thread(target=loop.run)
    t.start()
    time.sleep(0.05)
    for _ in range(50):  # a burst of events
        loop.request()
    time.sleep(0.6)
    stop.set()
    loop.request()
    t.join(5)
    assert calls[0][1] is True
    assert 2 <= len(calls) <= 4  # the burst became one or two syncs
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(calls)]
    assert all(g >= 0.19 for g in gaps)
    assert all(full is False for _, full in calls[1:])


def test_failure_forces_full_retry() -> None:
    results = iter([True, False, True])
    calls: list[bool] = []

    def sync(full: bool) -> bool:
        calls.append(full)
        return next(results, True)

    stop = threading.Event()
    loop = SyncLoop(
        sync=sync,
        min_interval=0.0,
        max_interval=60,
        stop=stop,
        retry_interval=0.1,
        tick_interval=0.05,
    )
    t = threading.Thread(target=loop.run)
    t.start()
    time.sleep(0.05)
    loop.request()
    time.sleep(0.4)
    stop.set()
    loop.request()
    t.join(5)
    assert calls[:3] == [True, False, True]  # the retry after the failure is full


def test_periodic_full_sync() -> None:
    calls: list[bool] = []
    stop = threading.Event()
    loop = SyncLoop(
        sync=lambda full: calls.append(full) or True,
        min_interval=0.0,
        max_interval=0.15,
        stop=stop,
        tick_interval=0.02,
    )
    run_loop(loop, stop, 0.5)
    assert len(calls) >= 3 and all(calls)


def test_health_goes_bad_when_a_change_waits_too_long() -> None:
    now = [1000.0]
    state = HealthState(timeout=60, clock=lambda: now[0])
    assert state.body(with_node=True)[0] == 200
    state.queued()
    now[0] += 30
    assert state.healthy()
    now[0] += 31
    assert state.body(with_node=False)[0] == 503
    state.updated()
    assert state.body(with_node=True)[0] == 200
    state.node_deleting = True
    status, body = state.body(with_node=True)
    assert status == 503 and body["nodeEligible"] is False
    assert state.body(with_node=False)[0] == 200


def test_dns_service_ip_is_not_proxied() -> None:
    store = Store()
    store.replace_services(
        [
            make_service("kube-system", "kube-dns", cluster_ips=("10.96.0.10",)),
            make_service("default", "web", cluster_ips=("10.96.0.20",)),
        ]
    )
    store.replace_slices([])
    snap = without_proxy_for(store.peek(), "10.96.0.10")
    assert not snap.services[Ref("kube-system", "kube-dns")].proxied
    assert snap.services[Ref("default", "web")].proxied
    assert without_proxy_for(store.peek(), "10.1.1.1") is not None
