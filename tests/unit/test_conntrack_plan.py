"""Stale UDP flow planning: which conntrack flows a sync must delete (kproxy.render.conntrack)."""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from kproxy.model.objects import EndpointPort, Ref, Service
from kproxy.model.store import Snapshot
from kproxy.model.view import ServicePortView, build_views
from kproxy.render.conntrack import Flow, FrontendRule, NodePortRule, plan_stale_flows
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

VIP = "172.30.0.10"
EXT_IP = "203.0.113.7"
LB_IP = "198.51.100.9"
NODE_IP = "192.168.50.11"
OLD, NEW, OTHER = "10.244.1.11", "10.244.1.12", "10.244.1.13"
DNS_PORT = EndpointPort("dns", "UDP", 5353)

Views = Mapping[Ref, Sequence[ServicePortView]]


def dns_service(**overrides: Any) -> Service:
    fields: dict[str, Any] = {
        "cluster_ips": (VIP,),
        "ports": (make_port(53, name="dns", protocol="UDP", target=5353),),
    }
    fields.update(overrides)
    return make_service("kube-system", "dns", **fields)


def views(
    service: Service | None,
    *endpoints: str | dict[str, Any],
    ports: tuple[EndpointPort, ...] = (DNS_PORT,),
    family: int = 4,
) -> Views:
    """build_views of one service (None: deleted) backed by one slice of `endpoints`."""
    if service is None:
        snap = Snapshot(services={}, slices={})
        return build_views(snap, family=family, node_name="n1", refs=[Ref("kube-system", "dns")])
    eps = [
        make_endpoint(e, node_name="n1")
        if isinstance(e, str)
        else make_endpoint(**{"node_name": "n1", **e})
        for e in endpoints
    ]
    sl = make_slice(
        service.namespace,
        service.name,
        endpoints=eps,
        ports=ports,
        address_type="IPv6" if family == 6 else "IPv4",
    )
    snap = Snapshot(services={service.ref: service}, slices={service.ref: (sl,)})
    return build_views(snap, family=family, node_name="n1")


def udp(
    dst: str, dport: int, reply_src: str, reply_sport: int = 5353, *, proto: str = "UDP"
) -> Flow:
    family = 6 if ":" in dst else 4
    return Flow(family, proto, dst, dport, reply_src, reply_sport)


def stale(plan: Any, flow: Flow) -> bool:
    return plan.match(flow) is not None


# -- endpoint changes -----------------------------------------------------------------------------


def test_removed_endpoint_flows_are_stale_and_survivors_kept() -> None:
    svc = dns_service()
    plan = plan_stale_flows(views(svc, OLD, NEW), views(svc, NEW))

    assert stale(plan, udp(VIP, 53, OLD))
    assert not stale(plan, udp(VIP, 53, NEW))
    assert not stale(plan, udp(VIP, 53, OLD, proto="TCP")), "only UDP flows are touched"
    assert not stale(plan, udp(VIP, 54, OLD)), "another port of the same IP is not this service"
    assert not stale(plan, udp("172.30.0.99", 53, OLD)), "another service IP"


def test_added_endpoints_need_no_cleanup() -> None:
    svc = dns_service()
    assert plan_stale_flows(views(svc, OLD), views(svc, OLD, NEW)).empty


def test_unchanged_views_need_no_cleanup() -> None:
    svc = dns_service(external_ips=(EXT_IP,))
    same = views(svc, OLD, NEW)
    assert plan_stale_flows(same, same).empty


def test_tcp_services_are_never_planned() -> None:
    svc = make_service("ns1", "web", cluster_ips=(VIP,), ports=(make_port(80, node_port=30080),))
    tcp = (EndpointPort("p80", "TCP", 80),)
    before = views(svc, OLD, NEW, ports=tcp)
    after = views(svc, NEW, ports=tcp)
    assert plan_stale_flows(before, after).empty
    assert plan_stale_flows(before, views(None)).empty


def test_every_service_address_and_the_node_port_are_cleaned() -> None:
    svc = dns_service(
        type="LoadBalancer",
        external_ips=(EXT_IP,),
        load_balancer_ips=(LB_IP,),
        ports=(make_port(53, name="dns", protocol="UDP", target=5353, node_port=30053),),
    )
    plan = plan_stale_flows(views(svc, OLD, NEW), views(svc, NEW))

    for address in (VIP, EXT_IP, LB_IP):
        assert stale(plan, udp(address, 53, OLD)), address
        assert not stale(plan, udp(address, 53, NEW)), address
    assert stale(plan, udp(NODE_IP, 30053, OLD)), "nodePort flows on any node address"
    assert stale(plan, udp("127.0.0.1", 30053, OLD))
    assert not stale(plan, udp(NODE_IP, 30053, NEW))
    assert not stale(plan, udp(NODE_IP, 30054, OLD))


def test_nodeport_ips_narrow_the_node_port_match() -> None:
    svc = dns_service(
        type="NodePort",
        ports=(make_port(53, name="dns", protocol="UDP", target=5353, node_port=30053),),
    )
    plan = plan_stale_flows(views(svc, OLD, NEW), views(svc, NEW), nodeport_ips=[NODE_IP])
    assert stale(plan, udp(NODE_IP, 30053, OLD))
    assert not stale(plan, udp("10.0.0.99", 30053, OLD)), "not a nodePort address"


def test_a_changed_target_port_on_the_same_pod_moves_its_flows() -> None:
    svc = dns_service()
    before = views(svc, OLD, ports=(EndpointPort("dns", "UDP", 5353),))
    after = views(svc, OLD, ports=(EndpointPort("dns", "UDP", 5454),))
    plan = plan_stale_flows(before, after)
    assert stale(plan, udp(VIP, 53, OLD, 5353))
    assert not stale(plan, udp(VIP, 53, OLD, 5454))


@pytest.mark.parametrize(
    ("condition", "planned"),
    [
        pytest.param({"ready": False, "serving": True, "terminating": True}, False, id="serving"),
        pytest.param(
            {"ready": False, "serving": False, "terminating": True}, True, id="not-serving"
        ),
        pytest.param({"ready": False, "serving": False}, True, id="not-ready"),
    ],
)
def test_terminating_endpoints_keep_flows_while_serving(
    condition: dict[str, Any], planned: bool
) -> None:
    svc = dns_service()
    plan = plan_stale_flows(views(svc, OLD, NEW), views(svc, {"address": OLD, **condition}, NEW))
    assert stale(plan, udp(VIP, 53, OLD)) is planned
    assert not stale(plan, udp(VIP, 53, NEW))


def test_traffic_policies_do_not_cut_flows_to_serving_endpoints() -> None:
    """A policy change alters the rules, not which endpoints are alive (as kube-proxy)."""
    before = dns_service()
    after = dns_service(internal_policy_local=True)
    remote = {"address": OTHER, "node_name": "n2"}
    plan = plan_stale_flows(views(before, OLD, remote), views(after, OLD, remote))
    assert not stale(plan, udp(VIP, 53, OTHER))


# -- services without endpoints, new and deleted services -----------------------------------------


def test_endpoints_appearing_clear_flows_that_were_never_dnated() -> None:
    """Packets sent while nothing served the VIP leave entries with the VIP as reply source."""
    svc = dns_service()
    plan = plan_stale_flows(views(svc), views(svc, NEW))
    assert stale(plan, udp(VIP, 53, VIP, 53))
    assert not stale(plan, udp(VIP, 53, NEW))


def test_losing_every_endpoint_plans_nothing_until_endpoints_return() -> None:
    svc = dns_service()
    assert plan_stale_flows(views(svc, OLD), views(svc)).empty
    plan = plan_stale_flows(views(svc), views(svc, NEW))
    assert stale(plan, udp(VIP, 53, OLD)), "the old flows go once there is somewhere to go"


def test_a_new_service_clears_flows_to_its_address() -> None:
    plan = plan_stale_flows(views(None), views(dns_service(), NEW))
    assert stale(plan, udp(VIP, 53, VIP, 53))
    assert not stale(plan, udp(VIP, 53, NEW))


def test_first_sync_reconciles_every_udp_service() -> None:
    svc = dns_service(
        ports=(make_port(53, name="dns", protocol="UDP", target=5353, node_port=30053),)
    )
    plan = plan_stale_flows({}, views(svc, NEW))
    assert stale(plan, udp(VIP, 53, OLD))
    assert stale(plan, udp(NODE_IP, 30053, OLD))
    assert not stale(plan, udp(VIP, 53, NEW))


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(None, id="service-deleted"),
        pytest.param(
            dns_service(ports=(make_port(53, name="dns", protocol="TCP", target=5353),)),
            id="protocol-changed",
        ),
        pytest.param(dns_service(cluster_ips=("172.30.0.11",)), id="cluster-ip-changed"),
    ],
)
def test_gone_frontends_lose_every_flow(after: Service | None) -> None:
    before = dns_service(
        external_ips=(EXT_IP,),
        ports=(make_port(53, name="dns", protocol="UDP", target=5353, node_port=30053),),
    )
    tcp_or_udp = (DNS_PORT, EndpointPort("dns", "TCP", 5353))
    plan = plan_stale_flows(views(before, NEW), views(after, NEW, ports=tcp_or_udp))
    for address in (VIP, EXT_IP):
        assert stale(plan, udp(address, 53, NEW)), address
    assert stale(plan, udp(NODE_IP, 30053, NEW))
    assert not stale(plan, udp(VIP, 53, NEW, proto="TCP"))


def test_a_service_without_endpoints_deleted_still_loses_its_flows() -> None:
    plan = plan_stale_flows(views(dns_service()), views(None))
    assert stale(plan, udp(VIP, 53, OLD))


# -- families and plumbing ------------------------------------------------------------------------


def test_ipv6_plans_and_merging_families() -> None:
    vip6 = "fd00:96::a"
    svc = dns_service(cluster_ips=(VIP, vip6))
    old6, new6 = "fd00:10:244:1::11", "fd00:10:244:1::12"
    plan4 = plan_stale_flows(views(svc, OLD, NEW), views(svc, NEW))
    plan6 = plan_stale_flows(views(svc, old6, new6, family=6), views(svc, new6, family=6))
    plan = plan4.merged(plan6)

    assert plan.families == (4, 6)
    assert stale(plan, udp(vip6, 53, old6))
    assert not stale(plan, udp(vip6, 53, new6))
    assert stale(plan, udp(VIP, 53, OLD))
    assert {r.family for r in plan.rules(6)} == {6}


def test_rules_name_their_services_and_plans_pickle() -> None:
    svc = dns_service(
        ports=(make_port(53, name="dns", protocol="UDP", target=5353, node_port=30053),)
    )
    plan = plan_stale_flows(views(svc, OLD, NEW), views(svc, NEW))
    kinds = {type(r) for r in plan.rules()}
    assert kinds == {FrontendRule, NodePortRule}
    assert all(r.services == ("kube-system/dns:dns",) for r in plan.rules())

    copy = pickle.loads(pickle.dumps(plan))
    assert copy == plan
    assert stale(copy, udp(VIP, 53, OLD)) and not stale(copy, udp(VIP, 53, NEW))
