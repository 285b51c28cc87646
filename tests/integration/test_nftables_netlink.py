"""The nf_tables netlink codec against the real kernel and the real nft: applying a partial
sync's ops over netlink must leave exactly the table `nft -f` leaves for the same services
(compared as `nft list table` prints them), for every statement kind the renderer produces, in
both families; deltas (endpoint change, service removal) keep the two in step; and the
table-existence probe sees a deleted table (the tamper check)."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from kproxy.backends.nft_netlink import NetlinkWriter
from kproxy.backends.nftables import NftCommandWriter
from kproxy.model.objects import Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView, service_views
from kproxy.render.nftables import (
    CLUSTER_ENDPOINTS,
    Renderer,
    ServiceBlock,
    apply_counts,
    delta_ops,
    element_counts,
    full_text,
    new_count_maps,
)
from tests.support.builders import make_endpoint, make_service, make_slice
from tests.support.lab import require_netns
from tests.unit.test_render_nftables import NODE, V4, V6, ipv6, overall

pytestmark = [pytest.mark.netns]


@pytest.fixture
def netns() -> Iterator[str]:
    require_netns()
    name = f"kpnft{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def in_netns(ns: str) -> Callable[..., Any]:
    def run(argv: list[str], **kw: Any) -> Any:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)

    return run


def one_range(views: Mapping[Ref, tuple[ServicePortView, ...]]) -> dict[Ref, Any]:
    """The same services with a single source range (which the codec encodes itself)."""
    return {
        r: tuple(v._replace(source_ranges=v.source_ranges[:1]) for v in vs)
        for r, vs in views.items()
    }


CASES = {
    "ipv4": (lambda: one_range(overall()), V4, 0),
    "ipv4-two-source-ranges": (overall, V4, 0),  # an anonymous interval set
    "ipv6": (ipv6, V6, 0),
}


def blocks_of(views: Mapping[Ref, Any], options: ProxyOptions) -> dict[Ref, ServiceBlock]:
    r = Renderer(options)
    return {ref: r.render_service(v) for ref, v in views.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_netlink_ops_leave_what_nft_leaves(netns: str, case: str) -> None:
    make, options, fallbacks = CASES[case]
    fw = "ip6" if options.family == 6 else "ip"
    renderer = Renderer(options)
    blocks = blocks_of(make(), options)
    nft(netns, "-f", "-", stdin=full_text(renderer, blocks.values()))
    want = nft(netns, "list", "table", fw, "kube-proxy")
    nft(netns, "delete", "table", fw, "kube-proxy")

    nft(netns, "-f", "-", stdin=full_text(renderer, []))  # the empty table of a first sync
    writer = NetlinkWriter(
        options.family,
        fallback=NftCommandWriter(options.family, run=in_netns(netns)),
        netns=netns,
    )
    ops, _ = delta_ops({}, blocks, {})
    writer.apply(ops)
    assert nft(netns, "list", "table", fw, "kube-proxy") == want
    assert writer.fallbacks == fallbacks


def normalized(ns: str, fw: str = "ip") -> dict[tuple[str, str], Any]:
    """The table as `nft -j` lists it, without handles and creation order: chains with their
    rules (the rules of `cluster-endpoints` as a set, their order does not matter), sets and
    maps with their declarations and sorted elements."""
    out: dict[tuple[str, str], Any] = {}
    for item in json.loads(nft(ns, "-j", "list", "table", fw, "kube-proxy"))["nftables"]:
        kind, body = next(iter(item.items()))
        if kind in ("set", "map"):
            body = {k: v for k, v in body.items() if k != "handle"}
            body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))
            out[(kind, body["name"])] = body
        elif kind == "chain":
            out.setdefault(("chain", body["name"]), [])
        elif kind == "rule":
            out.setdefault(("chain", body["chain"]), []).append(
                json.dumps(body["expr"], sort_keys=True)
            )
    for key, rules in out.items():
        if key == ("chain", CLUSTER_ENDPOINTS):
            out[key] = sorted(rules)
    return out


def fast_service(name: str, vip: str, *addresses: str) -> tuple[Ref, tuple[ServicePortView, ...]]:
    svc = make_service("ns7", name, cluster_ips=(vip,))
    sl = make_slice("ns7", name, endpoints=[make_endpoint(a) for a in addresses])
    return svc.ref, service_views(svc, [sl], family=4, node_name=NODE)


def test_netlink_deltas_track_nft(netns: str) -> None:
    """One transaction that removes a chain-layout and a fast-path service, trims another's
    endpoints, moves a fast-path service from cluster-endpoints-3 to -2 and adds two (one
    needing a new cluster-endpoints-4): netlink and a fresh nft load agree."""
    renderer = Renderer(V4)
    views = one_range(overall())
    before = blocks_of(views, V4)
    nft(netns, "-f", "-", stdin=full_text(renderer, before.values()))
    by_name = {ref.name: ref for ref in views}
    after = dict(before)
    for gone in ("svc1", "svc3"):
        after[by_name[gone]] = ServiceBlock()
    changed = by_name["svc2"]
    after[changed] = renderer.render_service(
        tuple(
            v._replace(
                endpoints=v.endpoints[:1],
                decision=v.decision._replace(
                    cluster=v.decision.cluster[:1],
                    all_reachable=v.decision.all_reachable[:1],
                ),
            )
            for v in views[changed]
        )
    )
    moved = by_name["svc5"]
    after[moved] = renderer.render_service(
        tuple(
            v._replace(decision=v.decision._replace(internal=v.decision.internal[:2]))
            for v in views[moved]
        )
    )
    for ref, vs in (
        fast_service("svc7", "172.30.0.47", "10.180.1.1", "10.180.1.2", "10.180.1.3"),
        fast_service("svc8", "172.30.0.48", "10.180.1.4", "10.180.1.5", "10.180.1.6", "10.180.1.7"),
    ):
        after[ref] = renderer.render_service(vs)
    writer = NetlinkWriter(4, fallback=NftCommandWriter(4, run=in_netns(netns)), netns=netns)
    counts = element_counts(before.items())
    delta = {ref: b for ref, b in after.items() if b != before.get(ref)}
    ops, changes = delta_ops(before, delta, counts, count_maps={1, 2, 3})
    assert new_count_maps(ops) == {4}
    apply_counts(counts, changes)
    writer.apply(ops)
    got = normalized(netns)
    assert writer.fallbacks == 0
    assert counts == element_counts(after.items())
    assert got[("map", "cluster-endpoints-4")]["elem"]

    nft(netns, "delete", "table", "ip", "kube-proxy")
    nft(netns, "-f", "-", stdin=full_text(renderer, (b for b in after.values() if not b.empty)))
    want = normalized(netns)
    assert set(got) - set(want) == set()  # every count is still in use here
    assert got == want


def test_table_probe_sees_a_deleted_table(netns: str) -> None:
    writer = NetlinkWriter(4, fallback=NftCommandWriter(4, run=in_netns(netns)), netns=netns)
    assert not writer.table_exists()
    nft(netns, "-f", "-", stdin=full_text(Renderer(V4), []))
    assert writer.table_exists()
    nft(netns, "delete", "table", "ip", "kube-proxy")
    assert not writer.table_exists()


def test_proxier_drift_check(netns: str) -> None:
    """After a sync: no drift; another table's commit is not drift; a chain added to
    kube-proxy's table or the table's deletion is, and the next full sync repairs it."""
    from kproxy.backends.nftables import NftablesProxier
    from kproxy.model.store import Store
    from tests.support.builders import make_endpoint, make_service, make_slice

    store = Store()
    store.set_service(make_service())
    store.set_slice(make_slice(endpoints=[make_endpoint("10.180.0.1")]))
    run = in_netns(netns)
    writer = NetlinkWriter(4, fallback=NftCommandWriter(4, run=run), netns=netns)
    proxier = NftablesProxier(options=V4, writer=writer, run=run)
    snapshot, changes = store.take()
    proxier.sync(snapshot, changes, full=True)
    assert proxier.drift() is None
    nft(netns, "add", "table", "ip", "someone-else")
    assert proxier.drift() is None
    nft(netns, "add", "chain", "ip", "kube-proxy", "intruder")
    assert proxier.drift() is not None
    # a full sync rewrites kproxy's objects (the intruder is not kproxy's to delete) and
    # remembers the new count
    proxier.sync(snapshot, changes, full=True)
    assert proxier.drift() is None
    nft(netns, "delete", "table", "ip", "kube-proxy")
    assert "gone" in (proxier.drift() or "")
    proxier.sync(snapshot, changes, full=True)
    assert proxier.drift() is None
    assert "172.30.0.41" in nft(netns, "list", "table", "ip", "kube-proxy")


def test_proxier_fast_path_maps_follow_the_endpoint_counts(netns: str) -> None:
    """Partial syncs create the map of a new endpoint count on first use and leave the map of
    a count no longer used (empty, its rule in place) to the next full sync, which deletes it;
    a full sync over a live table re-creates the maps in use."""
    from kproxy.backends.nftables import NftablesProxier
    from kproxy.model.store import Store

    def maps() -> dict[str, int]:
        t = normalized(netns)
        return {k[1]: len(v["elem"]) for k, v in t.items() if k[1].startswith("cluster-endpoints-")}

    store = Store()
    store.set_service(make_service())
    addresses = ["10.180.0.1", "10.180.0.2", "10.180.0.3"]
    store.set_slice(make_slice(endpoints=[make_endpoint(a) for a in addresses]))
    run = in_netns(netns)
    writer = NetlinkWriter(4, fallback=NftCommandWriter(4, run=run), netns=netns)
    proxier = NftablesProxier(options=V4, writer=writer, run=run)
    snapshot, changes = store.take()
    proxier.sync(snapshot, changes, full=True)
    assert maps() == {"cluster-endpoints-3": 3}
    store.set_slice(make_slice(endpoints=[make_endpoint(a) for a in addresses[:2]]))
    snapshot, changes = store.take()
    proxier.sync(snapshot, changes, full=False)
    assert maps() == {"cluster-endpoints-3": 0, "cluster-endpoints-2": 2}
    assert len(normalized(netns)[("chain", CLUSTER_ENDPOINTS)]) == 2
    proxier.sync(snapshot, changes, full=True)
    assert maps() == {"cluster-endpoints-2": 2}
    assert len(normalized(netns)[("chain", CLUSTER_ENDPOINTS)]) == 1
    assert writer.fallbacks == 0
