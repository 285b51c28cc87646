"""LoadBalancerController against the fake apiserver through the real client (no namespaces):
exactly one allocator among several agents, status written once and kept across restarts, the
allocator role handed over when the leader stops, pending and freeing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kproxy.lb import election as E
from kproxy.lb.pools import Pools
from kproxy.metrics import LBMetrics
from kproxy.model.store import EMPTY_SNAPSHOT
from kproxy.runtime.lb import LoadBalancerController
from tests.support.fakeapi import FakeApiServer, wait_until
from tests.support.objects import make_service_obj

POOL = Pools.parse(["198.51.100.10-198.51.100.11"])  # on no interface here: nothing is answered


def lb_obj(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("type", "LoadBalancer")
    return make_service_obj(
        "default",
        name,
        ports=[{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}],
        **spec,
    )


def ingress(api: FakeApiServer, name: str) -> list[str]:
    svc = api.get("Service", "default", name) or {}
    lb = (svc.get("status") or {}).get("loadBalancer") or {}
    return [i["ip"] for i in lb.get("ingress") or []]


class Agents:
    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig
        self.running: dict[str, LoadBalancerController] = {}

    def start(self, node: str) -> LoadBalancerController:
        ctl = LoadBalancerController(
            pools=POOL,
            node_name=node,
            kubeconfig=self.kubeconfig,
            master=None,
            namespace="kube-system",
            lease_duration=2,
            snapshot=lambda: EMPTY_SNAPSHOT,
            metrics=LBMetrics(CollectorRegistry()),
            stop=threading.Event(),
        )
        ctl.start()
        self.running[node] = ctl
        return ctl

    def stop(self, node: str) -> None:
        self.running.pop(node).stop()

    def leaders(self) -> list[str]:
        return [n for n, c in self.running.items() if c.leader]


@pytest.fixture
def agents(fake_kubeconfig: str) -> Iterator[Agents]:
    a = Agents(fake_kubeconfig)
    yield a
    for node in list(a.running):
        a.stop(node)


def test_one_allocator_writes_status_once_and_hands_over(
    fake_apiserver: FakeApiServer, agents: Agents
) -> None:
    fake_apiserver.upsert(lb_obj("web"))
    for node in ("node1", "node2", "node3"):
        agents.start(node)
    assert wait_until(lambda: ingress(fake_apiserver, "web") == ["198.51.100.10"], timeout=15)
    assert wait_until(lambda: len(agents.leaders()) == 1, timeout=10)
    [leader] = agents.leaders()
    lease = fake_apiserver.get("Lease", "kube-system", E.ALLOCATOR_LEASE)
    assert lease is not None and lease["spec"]["holderIdentity"] == leader
    for node in ("node1", "node2", "node3"):  # every agent keeps its heartbeat Lease
        assert wait_until(
            lambda n=node: fake_apiserver.get("Lease", "kube-system", E.agent_lease_name(n)),
            timeout=10,
        )
    assert fake_apiserver.writes[("PATCH", "Service", "status")] == 1
    # every agent's report shows the address (and the same announcing node)
    assert wait_until(
        lambda: (
            len({str(c.report()["addresses"]) for c in agents.running.values()}) == 1
            and agents.running[leader].report()["addresses"]
        ),
        timeout=10,
    )

    # the leader stops cleanly: it releases the Lease, another agent takes the role
    agents.stop(leader)
    released = fake_apiserver.get("Lease", "kube-system", E.ALLOCATOR_LEASE)
    assert released is not None and not released["spec"].get("holderIdentity")
    assert wait_until(lambda: len(agents.leaders()) == 1, timeout=10)
    assert agents.leaders()[0] != leader
    # the new leader keeps the assignment: no status write
    fake_apiserver.upsert(lb_obj("other"))
    assert wait_until(lambda: ingress(fake_apiserver, "other") == ["198.51.100.11"], timeout=15)
    assert ingress(fake_apiserver, "web") == ["198.51.100.10"]
    assert fake_apiserver.writes[("PATCH", "Service", "status")] == 2


def test_restart_keeps_addresses_pending_then_freed(
    fake_apiserver: FakeApiServer, agents: Agents
) -> None:
    fake_apiserver.upsert(lb_obj("b", loadBalancerIP="198.51.100.11"))
    agents.start("node1")
    assert wait_until(lambda: ingress(fake_apiserver, "b") == ["198.51.100.11"], timeout=15)
    agents.stop("node1")
    # restarted, with an older service now competing: b keeps what its status says
    fake_apiserver.upsert(lb_obj("a"))
    fake_apiserver.upsert(lb_obj("c"))
    agents.start("node1")
    assert wait_until(lambda: ingress(fake_apiserver, "a") == ["198.51.100.10"], timeout=15)
    assert ingress(fake_apiserver, "b") == ["198.51.100.11"]
    assert wait_until(
        lambda: (
            agents.running["node1"].report()["pending"].get("default/c")
            == "no free IPv4 address left in the pools"
        ),
        timeout=10,
    )
    assert ingress(fake_apiserver, "c") == []
    # a type change frees the address (status cleared), and the pending service gets it
    fake_apiserver.upsert(
        lb_obj("a", type="ClusterIP", clusterIP="10.96.0.99")
        | {"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.10"}]}}}
    )
    assert wait_until(lambda: ingress(fake_apiserver, "a") == [], timeout=15)
    assert wait_until(lambda: ingress(fake_apiserver, "c") == ["198.51.100.10"], timeout=15)
