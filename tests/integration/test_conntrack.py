"""Stale UDP conntrack cleanup on a real kernel: a client with a fixed source port follows the
endpoint change only after `ConntrackCleaner` applied the plan, and unrelated flows survive.

The node's DNAT rules are written by hand (a KPTEST chain hooked into nat PREROUTING and OUTPUT),
so this tests the cleanup alone, whatever the iptables backend does. The cleaner runs inside the
node namespace through `ip netns exec`, as the daemon does.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import pytest

from kproxy.backends.conntrack import FILTERED_DUMP_LIMIT
from kproxy.lab.netlab import Client, Lab, Node, Pod
from kproxy.lab.nsexec import helper_env
from kproxy.lab.servers import start_servers
from kproxy.lab.traffic import http_get, udp_query
from kproxy.model.objects import EndpointPort, Ref, Service
from kproxy.model.store import Snapshot
from kproxy.model.view import ServicePortView, build_views
from kproxy.render.conntrack import StaleFlowPlan, plan_stale_flows
from tests.support.builders import make_endpoint, make_port, make_service, make_slice
from tests.support.lab import require_netns

pytestmark = pytest.mark.netns

NODE_PORT = 30053
UDP_TARGET = 5353
TCP_TARGET = 8080


@dataclass(frozen=True)
class Family:
    """The addresses and tools of one IP family."""

    version: int
    vip: str  # the service whose endpoint moves
    other_vip: str  # another UDP service still served by the old pod
    unrelated_vip: str  # keeps a DNAT rule (and so conntrack) in the node at all times
    loopback: str

    @property
    def iptables(self) -> str:
        return "ip6tables" if self.version == 6 else "iptables"

    def ip(self, thing: Node | Pod | Client) -> str:
        address = thing.ip6 if self.version == 6 else thing.ip
        assert address is not None
        return address

    def hostport(self, ip: str, port: int) -> str:
        return f"[{ip}]:{port}" if self.version == 6 else f"{ip}:{port}"


V4 = Family(4, "10.96.7.10", "10.96.7.20", "10.96.7.99", "127.0.0.1")
V6 = Family(6, "fd00:96::7:10", "fd00:96::7:20", "fd00:96::7:99", "::1")

Views = Mapping[Ref, Sequence[ServicePortView]]

_APPLY = (
    "import pickle, sys\n"
    "from kproxy.backends.conntrack import ConntrackCleaner\n"
    "print(ConntrackCleaner().apply(pickle.load(sys.stdin.buffer)))\n"
)


# -- helpers ----------------------------------------------------------------------------------


def apply_in(lab: Lab, ns: str, plan: StaleFlowPlan) -> int:
    """Run the cleaner inside `ns` (a fresh process, like the daemon under `ip netns exec`)."""
    proc = lab.run(
        ns, [sys.executable, "-c", _APPLY], input=pickle.dumps(plan), text=False, env=helper_env()
    )
    return int(proc.stdout.decode().split()[-1])


def program(lab: Lab, fam: Family, rules: Sequence[str]) -> None:
    """Make the nat chain KPTEST (hooked into PREROUTING and OUTPUT) of the node hold `rules`.

    A DNAT rule for an unrelated address is always there: a namespace tracks connections only
    once a rule needs conntrack, and a real node always has some service rule.
    """
    ns, tool = lab.nodes[0].ns, fam.iptables
    if lab.run(ns, [tool, "-t", "nat", "-S", "KPTEST"], check=False).returncode != 0:
        lab.run(ns, [tool, "-t", "nat", "-N", "KPTEST"])
        for hook in ("PREROUTING", "OUTPUT"):
            lab.run(ns, [tool, "-t", "nat", "-A", hook, "-j", "KPTEST"])
    lab.run(ns, [tool, "-t", "nat", "-F", "KPTEST"])
    rules = [*rules, dnat(fam.unrelated_vip, "udp", 9, fam.hostport(fam.loopback, 9))]
    text = "*nat\n" + "".join(f"-A KPTEST {r}\n" for r in rules) + "COMMIT\n"
    lab.run(ns, [f"{tool}-restore", "--noflush"], input=text)


def dnat(dst: str, proto: str, dport: int, to: str) -> str:
    return f"-d {dst} -p {proto} --dport {dport} -j DNAT --to-destination {to}"


@dataclass(frozen=True)
class Entry:
    """One `conntrack -L` line: original and reply tuples, and the kernel's entry id."""

    proto: str
    orig: tuple[str, str, int, int]  # src, dst, sport, dport
    reply_src: str
    entry_id: str


def entries(lab: Lab, fam: Family) -> list[Entry]:
    argv = ["conntrack", "-L", "-f", f"ipv{fam.version}", "-o", "id"]
    found = []
    for line in lab.run(lab.nodes[0].ns, argv).stdout.splitlines():
        words = line.split()
        if not words or words[0] not in ("udp", "tcp"):
            continue
        fields: dict[str, list[str]] = {}
        for word in words:
            key, sep, value = word.partition("=")
            if sep:
                fields.setdefault(key, []).append(value)
        found.append(
            Entry(
                proto=words[0],
                orig=(
                    fields["src"][0],
                    fields["dst"][0],
                    int(fields["sport"][0]),
                    int(fields["dport"][0]),
                ),
                reply_src=fields["src"][1],
                entry_id=fields["id"][0],
            )
        )
    return found


def flow(lab: Lab, fam: Family, proto: str, dst: str, dport: int, sport: int = 0) -> Entry:
    """The node's single entry of the client's flow to dst:dport (from `sport`, if given)."""
    matches = [
        e
        for e in entries(lab, fam)
        if (e.proto, e.orig[0], e.orig[1], e.orig[3]) == (proto, fam.ip(lab.client), dst, dport)
        and sport in (0, e.orig[2])
    ]
    assert len(matches) == 1, matches
    return matches[0]


def ask(lab: Lab, dst: str, port: int, sport: int, timeout: float = 1.0) -> str | None:
    """The name of the pod that answers a UDP query from the client's fixed source port."""
    return udp_query(lab.client.ns, dst, port, src_port=sport, timeout=timeout).results[0].name


def dns_service(name: str, vip: str, *, node_port: int = 0) -> Service:
    return make_service(
        "ns1",
        name,
        type="NodePort" if node_port else "ClusterIP",
        cluster_ips=(vip,),
        ports=(
            make_port(53, name="dns", protocol="UDP", target=UDP_TARGET, node_port=node_port),
            make_port(53, name="dns-tcp", protocol="TCP", target=TCP_TARGET),
        ),
    )


def views(lab: Lab, fam: Family, *services: tuple[Service, Sequence[Pod]]) -> Views:
    """The views the daemon would build for these services and their endpoint pods."""
    node = lab.nodes[0]
    ports = (EndpointPort("dns", "UDP", UDP_TARGET), EndpointPort("dns-tcp", "TCP", TCP_TARGET))
    snap = Snapshot(
        services={svc.ref: svc for svc, _ in services},
        slices={
            svc.ref: (
                make_slice(
                    svc.namespace,
                    svc.name,
                    endpoints=[make_endpoint(fam.ip(p), node_name=node.name) for p in pods],
                    ports=ports,
                    address_type=f"IPv{fam.version}",
                ),
            )
            for svc, pods in services
        },
    )
    return build_views(snap, family=fam.version, node_name=node.name)


# -- tests ------------------------------------------------------------------------------------


@pytest.fixture(params=[V4, V6], ids=["ipv4", "ipv6"])
def fam(request: pytest.FixtureRequest) -> Family:
    family: Family = request.param
    return family


@pytest.fixture
def lab(fam: Family) -> Iterator[Lab]:
    """One node with two pods and the client, torn down after the test."""
    require_netns()
    with Lab.create(nodes=1, pods_per_node=2, ipv6=fam.version == 6, prefix="kpct") as built:
        yield built


def test_udp_client_moves_to_new_endpoint_only_after_cleanup(lab: Lab, fam: Family) -> None:
    node_ip = fam.ip(lab.nodes[0])
    old, new = lab.pods[0], lab.pods[1]
    old_ip, new_ip = fam.ip(old), fam.ip(new)
    start_servers(lab, [(old.ns, old.name), (new.ns, new.name)], udp=[UDP_TARGET], tcp=[TCP_TARGET])
    served = dns_service("dns", fam.vip, node_port=NODE_PORT)
    bystander = dns_service("other", fam.other_vip)
    to_old, to_new = fam.hostport(old_ip, UDP_TARGET), fam.hostport(new_ip, UDP_TARGET)
    tcp_rule = dnat(fam.vip, "tcp", 53, fam.hostport(old_ip, TCP_TARGET))
    bystander_rule = dnat(fam.other_vip, "udp", 53, to_old)
    program(
        lab,
        fam,
        [
            dnat(fam.vip, "udp", 53, to_old),
            tcp_rule,
            dnat(node_ip, "udp", NODE_PORT, to_old),
            bystander_rule,
        ],
    )

    assert ask(lab, fam.vip, 53, 40053) == old.name
    assert ask(lab, node_ip, NODE_PORT, 40055) == old.name
    assert ask(lab, fam.other_vip, 53, 40054) == old.name
    assert ask(lab, old_ip, UDP_TARGET, 40056) == old.name  # straight to the pod
    assert http_get(lab.client.ns, fam.vip, 53).ok  # a TCP flow to the same service IP and port
    kept = {
        "other service": flow(lab, fam, "udp", fam.other_vip, 53),
        "direct": flow(lab, fam, "udp", old_ip, UDP_TARGET),
        "tcp": flow(lab, fam, "tcp", fam.vip, 53),
    }

    # the endpoint moves: the rules now DNAT new flows to the new pod ...
    program(
        lab,
        fam,
        [
            dnat(fam.vip, "udp", 53, to_new),
            tcp_rule,
            dnat(node_ip, "udp", NODE_PORT, to_new),
            bystander_rule,
        ],
    )
    # ... but the client's existing flows are pinned to the old one by conntrack
    assert ask(lab, fam.vip, 53, 40053) == old.name
    assert ask(lab, node_ip, NODE_PORT, 40055) == old.name
    assert ask(lab, fam.vip, 53, 40057) == new.name, "a new source port takes the new rule"

    before = views(lab, fam, (served, [old]), (bystander, [old]))
    after = views(lab, fam, (served, [new]), (bystander, [old]))
    deleted = apply_in(lab, lab.nodes[0].ns, plan_stale_flows(before, after))

    assert deleted == 2, "the stale ClusterIP and nodePort flows, nothing else"
    assert ask(lab, fam.vip, 53, 40053) == new.name
    assert ask(lab, node_ip, NODE_PORT, 40055) == new.name
    assert flow(lab, fam, "udp", fam.vip, 53, 40053).reply_src == new_ip
    for what, entry in kept.items():
        assert entry in entries(lab, fam), f"{what} flow was deleted"
    assert ask(lab, fam.other_vip, 53, 40054) == old.name
    assert apply_in(lab, lab.nodes[0].ns, plan_stale_flows(before, after)) == 0, "idempotent"
    assert apply_in(lab, lab.nodes[0].ns, plan_stale_flows({}, after)) == 0, "full reconcile"


def test_flows_sent_before_endpoints_existed_are_cleared(lab: Lab, fam: Family) -> None:
    pod = lab.pods[0]
    start_servers(lab, [(pod.ns, pod.name)], udp=[UDP_TARGET])
    svc = dns_service("late", fam.vip)
    program(lab, fam, [])

    assert ask(lab, fam.vip, 53, 40060, timeout=0.3) is None  # nothing serves the VIP yet
    assert flow(lab, fam, "udp", fam.vip, 53, 40060).reply_src == fam.vip, "not DNAT'ed"

    program(lab, fam, [dnat(fam.vip, "udp", 53, fam.hostport(fam.ip(pod), UDP_TARGET))])
    assert ask(lab, fam.vip, 53, 40060, timeout=0.3) is None, "the un-NATed entry still wins"

    plan = plan_stale_flows(views(lab, fam, (svc, [])), views(lab, fam, (svc, [pod])))
    assert apply_in(lab, lab.nodes[0].ns, plan) == 1
    assert ask(lab, fam.vip, 53, 40060) == pod.name


def test_a_deleted_service_loses_its_flows(lab: Lab, fam: Family) -> None:
    pod = lab.pods[0]
    start_servers(lab, [(pod.ns, pod.name)], udp=[UDP_TARGET])
    svc = dns_service("gone", fam.vip)
    program(lab, fam, [dnat(fam.vip, "udp", 53, fam.hostport(fam.ip(pod), UDP_TARGET))])
    assert ask(lab, fam.vip, 53, 40070) == pod.name

    program(lab, fam, [])  # the service's rules are gone; its flow is still DNAT'ed
    assert ask(lab, fam.vip, 53, 40070) == pod.name

    # other services without flows go at the same time: enough rules for one unfiltered dump
    idle = [
        dns_service(f"idle{i}", fam.vip.replace("7:10", f"8:{i}").replace("7.10", f"8.{i}"))
        for i in range(1, 6)
    ]
    gone = build_views(
        Snapshot(services={}, slices={}),
        family=fam.version,
        node_name=lab.nodes[0].name,
        refs=[svc.ref, *(s.ref for s in idle)],
    )
    before = views(lab, fam, (svc, [pod]), *((s, [pod]) for s in idle))
    plan = plan_stale_flows(before, gone)
    assert len(plan.rules()) > FILTERED_DUMP_LIMIT
    assert apply_in(lab, lab.nodes[0].ns, plan) == 1
    assert ask(lab, fam.vip, 53, 40070, timeout=0.3) is None
