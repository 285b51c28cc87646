"""Full syncs over kproxy's nf_tables netlink codec (kproxy.backends.nft_netlink.FullSync)
against the same full syncs through `nft -f`: two proxiers, the netlink one and one whose
writer is the nft command (the text path), sync the same store into two throwaway namespaces,
and `nft list ruleset` must read the same after every step: from empty, then over the table
they left (stale chains and sets deleted, a redefined affinity set, endpoint counts moved
between fast-path maps), for a varied set of services in both families and with several
options. The netlink proxier must not run `nft -f` at all. And a batch the kernel refuses over
netlink changes nothing and is retried through `nft -f` (whose refusal drives the search for
the refused service, tests/integration/test_nftables_rejects.py)."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.backends.nft_netlink import NetlinkWriter
from kproxy.backends.nftables import NftablesProxier, NftCommandWriter
from kproxy.model.objects import EndpointPort, EndpointSlice, Ref, Service
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Store
from tests.support.builders import make_endpoint, make_port, make_service, make_slice
from tests.support.lab import require_netns
from tests.unit.test_render_nftables import NODE, V4, V6, ipv6_objects, overall_objects

pytestmark = [pytest.mark.netns]

Pairs = list[tuple[Service, list[EndpointSlice]]]


@pytest.fixture
def two_netns() -> Iterator[tuple[str, str]]:
    require_netns()
    names = (f"kpfa{secrets.token_hex(3)}", f"kpfb{secrets.token_hex(3)}")
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
    yield names
    for name in names:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Recorder:
    """`run` for a proxier in namespace `ns`, remembering each command."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: Any) -> Any:
        self.calls.append(list(argv))
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], **kw)

    @property
    def nft_f(self) -> int:
        return sum(1 for argv in self.calls if "-f" in argv)


def ruleset(ns: str) -> str:
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=True,
    )
    return res.stdout


def fast(ns: str, name: str, vip: str, n: int, *, family: int = 4) -> tuple[Service, list[Any]]:
    """A fast-path ClusterIP service with `n` endpoints."""
    svc = make_service(ns, name, cluster_ips=(vip,))
    if family == 6:
        eps = [make_endpoint(f"fd00:20::{i + 1:x}") for i in range(n)]
        return svc, [make_slice(ns, name, endpoints=eps, address_type="IPv6")]
    base = sum(map(ord, name)) % 200
    eps = [make_endpoint(f"10.{base}.{i // 256}.{i % 256 + 1}") for i in range(n)]
    return svc, [make_slice(ns, name, endpoints=eps)]


def v4_services() -> Pairs:
    """kube-proxy's overall shapes (NodePort, LB with eTP Local, two source ranges, an external
    IP and a health check, ClientIP affinity, a UDP service without endpoints (reject), fast
    path with 1-3 endpoints) and fast-path services with 1, 5 and 10 endpoints."""
    extra = [
        fast("ns8", "one", "172.30.1.1", 1),
        fast("ns8", "five", "172.30.1.5", 5),
        fast("ns8", "ten", "172.30.1.10", 10),
    ]
    lb = make_service(
        "ns9",
        "lb",
        type="LoadBalancer",
        cluster_ips=("172.30.2.1",),
        ports=(make_port(443, name="https", node_port=31443),),
        load_balancer_ips=("198.51.100.7",),
        load_balancer_source_ranges=("203.0.113.0/24",),
    )
    https = [EndpointPort(name="https", port=8443, protocol="TCP")]
    lb_slice = make_slice("ns9", "lb", endpoints=[make_endpoint("10.9.0.1")], ports=https)
    return [*overall_objects(), *extra, (lb, [lb_slice])]


def v6_services() -> Pairs:
    return [*ipv6_objects(), fast("ns8", "three", "fd00:30::99", 3, family=6)]


CASES: dict[str, tuple[Any, ProxyOptions]] = {
    "ipv4": (v4_services, V4),
    "ipv6": (v6_services, V6),
    "masquerade-all-nodeport-ips": (
        v4_services,
        ProxyOptions(node_name=NODE, masquerade_all=True, nodeport_ips=("192.168.0.2",)),
    ),
    "two-cluster-cidrs": (
        v4_services,
        ProxyOptions(node_name=NODE, cluster_cidrs=("10.0.0.0/16", "10.2.0.0/16")),
    ),
}


def store_of(pairs: Pairs) -> Store:
    store = Store()
    store.replace_services([svc for svc, _ in pairs])
    store.replace_slices([sl for _, slices in pairs for sl in slices])
    return store


def proxiers(
    options: ProxyOptions, nl_ns: str, text_ns: str
) -> tuple[NftablesProxier, Recorder, NftablesProxier, Recorder]:
    nl_run, text_run = Recorder(nl_ns), Recorder(text_ns)
    fam = options.family
    writer = NetlinkWriter(fam, fallback=NftCommandWriter(fam, run=nl_run), netns=nl_ns)
    netlink = NftablesProxier(options=options, writer=writer, run=nl_run)
    text = NftablesProxier(
        options=options, writer=NftCommandWriter(fam, run=text_run), run=text_run
    )
    return netlink, nl_run, text, text_run


def changed(pairs: Pairs) -> Pairs:
    """The next state: the LB service gone (its chains and endpoint map stale), the affinity
    timeout changed (its sets recreated), the 10-endpoint service down to 5 and the 1-endpoint
    one up to 3 (the fast-path maps of 1 and 10 endpoints stale), a NodePort service added."""
    out: Pairs = []
    for svc, slices in pairs:
        if svc.name == "lb":
            continue
        if svc.name == "svc3":
            svc = make_service("ns3", "svc3", cluster_ips=("172.30.0.43",), affinity_timeout=600)
        if svc.name == "ten":
            svc, slices = fast("ns8", "ten", "172.30.1.10", 5)
        if svc.name == "one":
            svc, slices = fast("ns8", "one", "172.30.1.1", 3)
        out.append((svc, slices))
    np = make_service(
        "ns10", "np", type="NodePort", ports=(make_port(80, name="p80", node_port=30080),)
    )
    out.append((np, [make_slice("ns10", "np", endpoints=[make_endpoint("10.10.0.1")])]))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_netlink_full_sync_lists_like_nft_f(two_netns: tuple[str, str], case: str) -> None:
    make, options = CASES[case]
    nl_ns, text_ns = two_netns
    netlink, nl_run, text, text_run = proxiers(options, nl_ns, text_ns)
    pairs = make()
    store = store_of(pairs)
    snap, changes = store.take()
    a = netlink.sync(snap, changes, full=True)
    b = text.sync(snap, changes, full=True)
    assert a.full and a.services_written == b.services_written > 0
    first = ruleset(nl_ns)
    assert first == ruleset(text_ns)
    assert "kube-proxy" in first and "cluster-endpoints-" in first
    assert netlink.programmed == text.programmed
    assert nl_run.nft_f == 0 and text_run.nft_f == 1
    assert netlink.netlink_full_failures == 0

    if options.family == 4:  # a full sync over the table the first one left
        later = store_of(changed(pairs))
        snap, changes = later.take()
        netlink.sync(snap, changes, full=True)
        text.sync(snap, changes, full=True)
        second = ruleset(nl_ns)
        assert second == ruleset(text_ns)
        assert second != first
        assert "lb/tcp/https" in first and "198.51.100.7" in first
        assert "lb/tcp/https" not in second and "cluster-endpoints-10 " not in second
        assert "timeout 10m" in second
        assert nl_run.nft_f == 0

    # fresh proxiers (a restart) read the tables back and sync over them: still the same
    netlink, nl_run, text, _ = proxiers(options, nl_ns, text_ns)
    snap, changes = (later if options.family == 4 else store).take()
    netlink.sync(snap, changes, full=True)
    text.sync(snap, changes, full=True)
    assert ruleset(nl_ns) == ruleset(text_ns)
    assert nl_run.nft_f == 0 and netlink.netlink_full_failures == 0


def test_a_batch_the_kernel_refuses_is_retried_through_nft(two_netns: tuple[str, str]) -> None:
    """Another program's rule jumps to a service chain kproxy no longer wants: the kernel
    refuses deleting it, so the netlink batch fails whole (the table is untouched); the same
    sync through `nft -f` fails too, and the recovery keeps the stale chain (the text path's
    behaviour, now reached from a netlink full sync)."""
    nl_ns, text_ns = two_netns
    netlink, nl_run, _, _ = proxiers(V4, nl_ns, text_ns)
    pairs = v4_services()
    store = store_of(pairs)
    netlink.sync(*store.take(), full=True)
    (lb_chain,) = [
        c
        for b in netlink.programmed.values()
        for c, _ in b.chains
        if c.startswith("service-") and "lb/tcp" in c
    ]
    # another program's chain in the table jumps to it
    subprocess.run(
        ["ip", "netns", "exec", nl_ns, "nft", "-f", "-"],
        input=f"add chain ip kube-proxy holder\nadd rule ip kube-proxy holder jump {lb_chain}\n",
        text=True,
        check=True,
    )
    store.delete_service(Ref("ns9", "lb"))
    snap, changes = store.take()
    before = nl_run.nft_f
    result = netlink.sync(snap, changes, full=True)
    assert result.full
    assert netlink.netlink_full_failures >= 1
    assert nl_run.nft_f > before  # the retry went through nft
    table = ruleset(nl_ns)
    assert lb_chain in table  # kept: something still jumps to it
    assert "172.30.2.1" not in table  # the service itself is gone


def test_a_large_batch(two_netns: tuple[str, str]) -> None:
    """2,000 fast-path services x 10 endpoints and 200 NodePort services: a batch of ~1.5 MB in
    one `sendmsg` (the kernel takes a batch whole; the socket's send buffer grows to fit), the
    same table as `nft -f` of the same services."""
    pairs: Pairs = [
        fast("big", f"f{i}", f"172.31.{i // 250}.{i % 250 + 1}", 10) for i in range(2000)
    ]
    for i in range(200):
        svc = make_service(
            "big",
            f"np{i}",
            type="NodePort",
            cluster_ips=(f"172.29.0.{i + 1}",),
            ports=(make_port(80, name="p80", node_port=30000 + i),),
        )
        eps = [make_endpoint(f"10.77.{i}.{j + 1}") for j in range(3)]
        pairs.append((svc, [make_slice("big", f"np{i}", endpoints=eps)]))
    nl_ns, text_ns = two_netns
    netlink, nl_run, text, _ = proxiers(V4, nl_ns, text_ns)
    snap, changes = store_of(pairs).take()
    assert netlink.sync(snap, changes, full=True).services_written == 2200
    text.sync(snap, changes, full=True)
    assert nl_run.nft_f == 0 and netlink.netlink_full_failures == 0
    assert ruleset(nl_ns) == ruleset(text_ns)
