"""The per-port decision layer (kproxy.model.decisions): one table of kube-proxy's cases.

Every mode translates these decisions; the renderers' golden and packet-flow tests check the
translation, these check the decisions themselves (kube-proxy's topology.go and the top of each
proxier's per-service loop).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from kproxy.model.decisions import PortDecision, Verdict, node_in_source_ranges
from kproxy.model.objects import IPV4
from kproxy.model.view import service_views
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

NODE = "node-a"


def decide_for(endpoints: list[Any], **svc: Any) -> PortDecision:
    service = make_service(**svc)
    views = service_views(service, [make_slice(endpoints=endpoints)], family=IPV4, node_name=NODE)
    assert len(views) == 1
    return views[0].decision


def local(ip: str, **kw: Any) -> Any:
    return make_endpoint(ip, node_name=NODE, **kw)


def remote(ip: str, **kw: Any) -> Any:
    return make_endpoint(ip, node_name="node-b", **kw)


def ips(endpoints: tuple[Any, ...]) -> set[str]:
    return {e.ip for e in endpoints}


NODEPORT = {"type": "NodePort", "ports": (make_port(80, name="p80", node_port=30080),)}
LB = {
    "type": "LoadBalancer",
    "ports": (make_port(80, name="p80", node_port=30080),),
    "load_balancer_ips": ("198.51.100.9",),
}


def test_ready_endpoints_serve_internal_and_external_traffic() -> None:
    d = decide_for([local("10.0.0.1"), remote("10.0.0.2")], **NODEPORT)
    assert d.has_endpoints
    assert d.internal_verdict is Verdict.FORWARD and ips(d.internal) == {"10.0.0.1", "10.0.0.2"}
    assert d.external_verdict is Verdict.FORWARD and ips(d.external) == {"10.0.0.1", "10.0.0.2"}
    assert d.masquerade_external and not d.short_circuit


def test_no_endpoints_anywhere_rejects_both() -> None:
    d = decide_for([], **NODEPORT)
    assert not d.has_endpoints
    assert d.internal_verdict is d.external_verdict is Verdict.REJECT
    assert d.internal == d.external == ()
    assert not d.uses_external_chain


def test_only_unready_endpoints_reject() -> None:
    d = decide_for([remote("10.0.0.2", ready=False, serving=False)])
    assert d.internal_verdict is Verdict.REJECT


def test_terminating_serving_endpoints_are_the_fallback_only_when_none_is_ready() -> None:
    term = {"ready": False, "serving": True, "terminating": True}
    d = decide_for([remote("10.0.0.2", **term)])
    assert d.internal_verdict is Verdict.FORWARD and ips(d.internal) == {"10.0.0.2"}
    d = decide_for([remote("10.0.0.2", **term), remote("10.0.0.3")])
    assert ips(d.internal) == {"10.0.0.3"}


def test_external_policy_local_without_local_endpoints_drops_external_and_short_circuits() -> None:
    d = decide_for([remote("10.0.0.2")], external_policy_local=True, **NODEPORT)
    assert d.has_endpoints
    assert d.internal_verdict is Verdict.FORWARD  # ClusterIP traffic still goes everywhere
    assert d.external_verdict is Verdict.DROP and d.external == ()
    assert not d.masquerade_external
    assert ips(d.short_circuit) == {"10.0.0.2"}  # pods and the node reach it anyway


def test_external_policy_local_uses_local_endpoints_only() -> None:
    d = decide_for([local("10.0.0.1"), remote("10.0.0.2")], external_policy_local=True, **NODEPORT)
    assert ips(d.external) == {"10.0.0.1"}
    assert ips(d.internal) == {"10.0.0.1", "10.0.0.2"}


def test_internal_policy_local_without_local_endpoints_drops_cluster_ip_traffic() -> None:
    d = decide_for([remote("10.0.0.2")], internal_policy_local=True)
    assert d.has_endpoints
    assert d.internal_verdict is Verdict.DROP
    assert d.no_endpoints_verdict is Verdict.DROP


def test_internal_policy_local_with_external_destinations_keeps_cluster_external() -> None:
    d = decide_for([local("10.0.0.1"), remote("10.0.0.2")], internal_policy_local=True, **NODEPORT)
    assert ips(d.internal) == {"10.0.0.1"}
    assert ips(d.external) == {"10.0.0.1", "10.0.0.2"}


def test_topology_hints_filter_cluster_endpoints_for_this_zone() -> None:
    service = make_service(topology_aware=True)
    slices = [
        make_slice(
            endpoints=[
                remote("10.0.0.2", zone_hints=("z1",)),
                remote("10.0.0.3", zone_hints=("z2",)),
            ]
        )
    ]
    (view,) = service_views(service, slices, family=IPV4, node_name=NODE, node_zone="z1")
    assert ips(view.decision.internal) == {"10.0.0.2"}
    assert ips(view.decision.all_reachable) == {"10.0.0.2"}


@pytest.mark.parametrize(
    ("svc", "want"),
    [
        ({**LB, "external_policy_local": True, "health_check_node_port": 32000}, 32000),
        ({**LB, "health_check_node_port": 32000}, 0),  # eTP Cluster: no health check
        ({**NODEPORT, "external_policy_local": True, "health_check_node_port": 32000}, 0),
    ],
)
def test_health_check_node_port_only_for_local_load_balancers(svc: Any, want: int) -> None:
    assert decide_for([local("10.0.0.1")], **svc).health_check_node_port == want


def test_firewall_needs_load_balancer_ips_and_source_ranges() -> None:
    assert decide_for(
        [local("10.0.0.1")], load_balancer_source_ranges=("10.0.0.0/8",), **LB
    ).firewall
    assert not decide_for([local("10.0.0.1")], **LB).firewall
    assert not decide_for(
        [local("10.0.0.1")], load_balancer_source_ranges=("10.0.0.0/8",), **NODEPORT
    ).firewall


def test_affinity_timeout_is_carried() -> None:
    assert decide_for([local("10.0.0.1")], affinity_timeout=10800).affinity_timeout == 10800


def test_node_in_source_ranges_matches_by_family() -> None:
    node = [ipaddress.ip_address("192.168.50.11"), ipaddress.ip_address("fd00::11")]
    assert node_in_source_ranges(["192.168.50.0/24"], node)
    assert node_in_source_ranges(["fd00::/64"], node)
    assert not node_in_source_ranges(["10.0.0.0/8", "fd01::/64"], node)
