"""Runtime pieces without the kernel: health and the DNS-IP exclusion (the sync loop:
test_runner)."""

from __future__ import annotations

from kproxy.model.objects import Ref
from kproxy.model.store import Store, without_proxy_for
from kproxy.runtime.health import HealthState
from tests.support.builders import make_service


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
