"""The userspace mode without a kernel: the balancer (round robin, ClientIP affinity, retries)
on a fake clock, the REDIRECT renderer, and the listeners a service port gets."""

from __future__ import annotations

from collections import Counter

import pytest

from kproxy.backends.userspace import EXTERNAL, INTERNAL, UserspaceProxier, wanted_listeners
from kproxy.backends.userspace_balance import Balancer
from kproxy.backends.userspace_proxy import ProxyEngine
from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView, service_views
from kproxy.render import userspace as R
from tests.support.builders import make_port, make_service, make_slice

EPS = ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_takes_each_endpoint_in_turn() -> None:
    b = Balancer(EPS)
    picks = [b.pick("192.168.0.1") for _ in range(9)]
    assert picks == list(EPS) * 3


def test_next_endpoint_is_what_peek_says() -> None:
    b = Balancer(EPS)
    for _ in range(5):
        expected = b.peek()
        assert b.pick("192.168.0.9") == expected


def test_no_endpoints_gives_none() -> None:
    b = Balancer(())
    assert b.pick("192.168.0.1") is None
    assert b.peek() is None


def test_update_restarts_the_turn_only_when_endpoints_change() -> None:
    b = Balancer(EPS)
    b.pick("c")
    assert not b.update(EPS)  # same set: the rotation goes on
    assert b.pick("c") == EPS[1]
    assert b.update(EPS[:2])
    assert [b.pick("c") for _ in range(3)] == [EPS[0], EPS[1], EPS[0]]


def test_affinity_pins_a_client_until_the_timeout() -> None:
    clock = FakeClock()
    b = Balancer(EPS, affinity_timeout=10, clock=clock)
    first = b.pick("192.168.0.1")
    other = b.pick("192.168.0.2")
    assert other != first
    for _ in range(5):
        clock.now += 9  # each use refreshes the timer
        assert b.pick("192.168.0.1") == first
    assert b.affinity()["192.168.0.1"][0] == first
    clock.now += 10
    assert "192.168.0.1" not in b.affinity()
    assert b.pick("192.168.0.1") == EPS[2]  # expired: the next in turn


def test_affinity_spreads_different_clients() -> None:
    b = Balancer(EPS, affinity_timeout=10800, clock=FakeClock())
    chosen = Counter(b.pick(f"192.168.0.{i}") for i in range(30))
    assert chosen == Counter(dict.fromkeys(EPS, 10))


def test_retry_skips_the_affinity_and_repins() -> None:
    b = Balancer(EPS, affinity_timeout=60, clock=FakeClock())
    first = b.pick("c")
    second = b.pick("c", retry=True)  # connecting to `first` failed
    assert second != first
    assert b.pick("c") == second


def test_removed_endpoint_drops_its_affinity_records() -> None:
    clock = FakeClock()
    b = Balancer(EPS, affinity_timeout=60, clock=clock)
    pinned = b.pick("c")
    b.update(tuple(e for e in EPS if e != pinned))
    assert "c" not in b.affinity()
    assert b.pick("c") != pinned


def test_affinity_off_forgets_records() -> None:
    b = Balancer(EPS, affinity_timeout=60, clock=FakeClock())
    b.pick("c")
    b.update(EPS, affinity_timeout=0)
    assert b.affinity() == {}
    assert [b.pick("c") for _ in range(2)] == [EPS[1], EPS[2]]


# -- the rules ---------------------------------------------------------------------------------
def _redirects() -> list[R.Redirect]:
    return [
        R.Redirect("default/web:http", "TCP", R.CLUSTER, "10.96.0.80", 80, 40001),
        R.Redirect("default/web:http", "TCP", R.EXTERNAL, "203.0.113.10", 80, 40002),
        R.Redirect("default/web:http", "TCP", R.NODEPORT, "", 30080, 40002),
        R.Redirect("default/web:dns", "UDP", R.CLUSTER, "10.96.0.80", 53, 40003),
    ]


def test_rules_redirect_each_address_to_its_proxy_port() -> None:
    text = R.render_restore(_redirects(), hooks={})
    assert (
        '-A KUBE-PORTALS-CONTAINER -d 10.96.0.80/32 -p tcp -m comment --comment "default/web:http" '
        "-m tcp --dport 80 -j REDIRECT --to-ports 40001\n"
    ) in text
    assert (
        '-A KUBE-PORTALS-HOST -d 203.0.113.10/32 -p tcp -m comment --comment "default/web:http" '
        "-m tcp --dport 80 -j REDIRECT --to-ports 40002\n"
    ) in text
    assert (
        '-A KUBE-NODEPORT-HOST -p tcp -m comment --comment "default/web:http" '
        "-m tcp --dport 30080 -j REDIRECT --to-ports 40002\n"
    ) in text
    assert (
        '-A KUBE-NODEPORT-NON-LOCAL -p tcp -m comment --comment "default/web:http" '
        "-m tcp --dport 40002 -m state --state NEW -j ACCEPT\n"
    ) in text
    assert "-m udp --dport 53 -j REDIRECT --to-ports 40003" in text
    for chain in (*R.NAT_CHAINS, *R.FILTER_CHAINS):
        assert f":{chain} - [0:0]\n" in text  # declared, so a restore flushes and refills it


def test_ipv6_address_is_a_128() -> None:
    r = R.Redirect("ns/v6", "TCP", R.CLUSTER, "fd00::10", 80, 40010)
    assert "-d fd00::10/128 -p tcp" in R.render_restore([r], hooks={})
    assert r.address == "[fd00::10]:80"


def test_hooks_are_added_only_when_missing() -> None:
    everything = R.missing_hooks({})
    assert everything[R.NAT].startswith("-I PREROUTING 1 ")
    assert "-A PREROUTING -m addrtype --dst-type LOCAL" in everything[R.NAT]  # NodePorts last
    installed = {
        table: "\n".join(h.line for h in R.HOOKS if h.table == table) for table in (R.NAT, R.FILTER)
    }
    assert R.missing_hooks(installed) == {}


def test_parse_reads_back_what_was_rendered() -> None:
    saved = "\n".join(R.rule_lines(_redirects())[R.PORTALS_CONTAINER])
    saved += "\n" + "\n".join(R.rule_lines(_redirects())[R.NODEPORT_CONTAINER])
    got = {(r.name, r.protocol, r.ip, r.port, r.proxy_port) for r in R.parse_redirects(saved)}
    assert got == {
        ("default/web:http", "TCP", "10.96.0.80", 80, 40001),
        ("default/web:http", "TCP", "203.0.113.10", 80, 40002),
        ("default/web:http", "TCP", "", 30080, 40002),
        ("default/web:dns", "UDP", "10.96.0.80", 53, 40003),
    }


def test_cleanup_removes_chains_and_hooks_only() -> None:
    saved = {
        R.NAT: "\n".join(
            [
                "*nat",
                ":PREROUTING ACCEPT [0:0]",
                ":KUBE-PORTALS-CONTAINER - [0:0]",
                ":KUBE-SERVICES - [0:0]",
                *(h.line for h in R.HOOKS if h.table == R.NAT),
                "-A PREROUTING -j KUBE-SERVICES",
            ]
        )
    }
    text = R.cleanup_restore(saved)
    assert "-X KUBE-PORTALS-CONTAINER\n" in text
    assert "KUBE-SERVICES" not in text
    assert text.count("-D ") == 4
    assert R.cleanup_restore({R.NAT: "*nat\n:PREROUTING ACCEPT [0:0]\n"}) == ""


# -- which listeners a service port gets -----------------------------------------------------------
def _views(**overrides: object) -> list[ServicePortView]:
    svc = make_service(
        "default",
        "web",
        cluster_ips=("10.96.0.80",),
        ports=(make_port(80, name="http", node_port=30080),),
        type="NodePort",
        **overrides,
    )
    return list(service_views(svc, [_slice()], family=4, node_name="here"))


def _slice() -> EndpointSlice:
    return make_slice(
        "default",
        "web",
        endpoints=[
            Endpoint("10.244.1.11", node_name="here"),
            Endpoint("10.244.2.11", node_name="elsewhere"),
        ],
        ports=[EndpointPort("http", "TCP", 8080)],
    )


@pytest.mark.parametrize(
    ("local", "external"),
    [(False, ("10.244.1.11:8080", "10.244.2.11:8080")), (True, ("10.244.1.11:8080",))],
    ids=["cluster-policy", "external-policy-local"],
)
def test_internal_and_external_listeners_follow_the_model(
    local: bool, external: tuple[str, ...]
) -> None:
    (view,) = _views(external_policy_local=local)
    wanted = {w.scope: w for w in wanted_listeners(view, ProxyOptions())}
    assert wanted[INTERNAL].portals == ((R.CLUSTER, "10.96.0.80", 80),)
    assert wanted[INTERNAL].endpoints == ("10.244.1.11:8080", "10.244.2.11:8080")
    assert wanted[EXTERNAL].portals == ((R.NODEPORT, "", 30080),)
    assert wanted[EXTERNAL].endpoints == external


def test_nodeport_addresses_become_one_rule_each() -> None:
    (view,) = _views()
    opts = ProxyOptions(nodeport_ips=("192.168.50.11", "192.168.60.11"))
    wanted = {w.scope: w for w in wanted_listeners(view, opts)}
    assert wanted[EXTERNAL].portals == (
        (R.NODEPORT, "192.168.50.11", 30080),
        (R.NODEPORT, "192.168.60.11", 30080),
    )


def test_local_policy_without_local_endpoints_drops_external_traffic() -> None:
    (view,) = _views(external_policy_local=True)
    wanted = {w.scope: w for w in wanted_listeners(view, ProxyOptions())}
    assert wanted[EXTERNAL].verdict.value == "forward"
    (elsewhere,) = service_views(view.service, [_slice()], family=4, node_name="a-third-node")
    wanted = {w.scope: w for w in wanted_listeners(elsewhere, ProxyOptions())}
    assert wanted[EXTERNAL].endpoints == () and wanted[EXTERNAL].verdict.value == "drop"
    assert wanted[INTERNAL].verdict.value == "forward"  # cluster traffic still goes anywhere
    text = R.render_restore([], hooks={}, drops=[R.Drop("default/web:http", "TCP", 40002)])
    assert (
        '-A KUBE-NODEPORT-NON-LOCAL -p tcp -m comment --comment "default/web:http has no local '
        'endpoints" -m tcp --dport 40002 -j DROP\n'
    ) in text


def test_local_policy_short_circuits_pods_and_the_node_to_cluster_endpoints() -> None:
    svc = _views(external_policy_local=True)[0].service
    (elsewhere,) = service_views(svc, [_slice()], family=4, node_name="a-third-node")
    wanted = {w.scope: w for w in wanted_listeners(elsewhere, ProxyOptions())}
    ext = wanted[EXTERNAL]
    assert ext.endpoints == ()  # no local endpoint for outside clients
    assert ext.short_circuit == ("10.244.1.11:8080", "10.244.2.11:8080")
    assert ext.open  # the pods still need the port
    proxier = UserspaceProxier(
        options=ProxyOptions(cluster_cidrs=("10.244.0.0/16",), node_ips=("192.168.50.11",)),
        engine=ProxyEngine(),
        flavour="nft",
    )
    assert proxier._in_cluster("10.244.7.7") and proxier._in_cluster("192.168.50.11")
    assert not proxier._in_cluster("192.168.50.2")


def test_render_shows_rules_and_what_each_proxy_port_does() -> None:
    from kproxy.inspect.render import render_userspace

    (view,) = _views()
    text = render_userspace({view.service.ref: (view,)}, ProxyOptions(node_name="here"))
    assert (
        "#   :40000 default/web:http tcp (internal) -> 10.244.1.11:8080, 10.244.2.11:8080" in text
    )
    assert "-d 10.96.0.80/32 -p tcp" in text and "--dport 80 -j REDIRECT --to-ports 40000" in text
    assert "--dport 30080 -j REDIRECT --to-ports 40001" in text
