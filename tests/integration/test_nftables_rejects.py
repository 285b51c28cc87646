"""A transaction nftables refuses because of one service must not stop the others (issue 10;
the iptables counterpart is test_iptables_rejects). The real NftablesProxier, nft and kernel in
a throwaway namespace:

- a service whose names pass nf_tables' 256-character limit: a model object built directly
  (validation refuses such a name from a manifest or the API, so only this path reaches the
  backend with it);
- a stale chain another program's rule still jumps to: kproxy cannot delete it, and keeps it.

tests/integration/test_nftables_e2e.py has the agent-level case with real traffic (another
program's set under a service's map name)."""

from __future__ import annotations

import pytest

from kproxy.backends.nft_netlink import NetlinkWriter
from kproxy.backends.nftables import NftablesProxier, NftCommandWriter
from kproxy.model.objects import Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Store
from tests.integration.test_nftables_netlink import in_netns, netns, nft
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

__all__ = ["netns"]

pytestmark = [pytest.mark.netns]

BAD = "b" * 300


def _svc(store: Store, ns: str, name: str, ip: str, ep: str, *, node_port: int = 0) -> None:
    """A service; with a node port it has the chain layout (chains and an endpoint map named
    after it), without one the chainless fast path (elements only)."""
    kind = "NodePort" if node_port else "ClusterIP"
    port = make_port(80, name="p80", node_port=node_port)
    store.set_service(make_service(ns, name, type=kind, cluster_ips=(ip,), ports=(port,)))
    store.set_slice(make_slice(ns, name, endpoints=[make_endpoint(ep)]))


def _proxier(netns: str) -> NftablesProxier:
    run = in_netns(netns)
    writer = NetlinkWriter(4, fallback=NftCommandWriter(4, run=run), netns=netns)
    return NftablesProxier(options=ProxyOptions(node_name="n"), writer=writer, run=run)


def test_a_refused_service_is_left_out_and_the_rest_programmed(netns: str) -> None:
    store = Store()
    _svc(store, "ns1", "a", "172.30.0.1", "10.1.0.1")
    _svc(store, "ns1", BAD, "172.30.0.2", "10.1.0.2", node_port=30002)
    _svc(store, "ns1", "c", "172.30.0.3", "10.1.0.3", node_port=30003)
    p = _proxier(netns)
    first = p.sync(*store.take(), full=True)
    table = nft(netns, "list", "table", "ip", "kube-proxy")
    assert first.full and first.services_written == 2
    assert "172.30.0.1 . tcp . 80" in table and "172.30.0.3 . tcp . 80" in table
    assert "172.30.0.2" not in table and BAD not in table
    ((ref, bad),) = p.rejected.items()
    assert ref == Ref("ns1", BAD) and "too long" in bad.error, bad.error
    # a later change to a good service lands in a partial sync, the refused one stays out
    _svc(store, "ns1", "a", "172.30.0.1", "10.1.0.9")
    result = p.sync(*store.take(), full=False)
    assert not result.full and result.services_written == 1
    assert "10.1.0.9 . 80" in nft(netns, "list", "table", "ip", "kube-proxy")
    # a periodic full sync leaves it out without probing or failing again
    assert p.sync(*store.take(), full=True).full and list(p.rejected) == [ref]
    # a second refused service arriving in a partial sync: found, left out, the rest lands
    _svc(store, "ns2", BAD, "172.30.0.4", "10.1.0.4", node_port=30004)
    _svc(store, "ns2", "d", "172.30.0.5", "10.1.0.5")
    p.sync(*store.take(), full=False)
    table = nft(netns, "list", "table", "ip", "kube-proxy")
    assert "172.30.0.5 . tcp . 80" in table and "172.30.0.4" not in table
    assert sorted(p.rejected) == [Ref("ns1", BAD), Ref("ns2", BAD)]
    # a refused service that changes into something valid is tried again and programmed
    store.delete_service(Ref("ns2", BAD))
    _svc(store, "ns1", BAD, "172.30.0.2", "10.1.0.2", node_port=30002)  # unchanged: still out
    p.sync(*store.take(), full=False)
    assert list(p.rejected) == [Ref("ns1", BAD)]
    store.delete_service(Ref("ns1", BAD))
    p.sync(*store.take(), full=False)
    assert p.rejected == {}


def test_a_stale_chain_another_rule_names_is_kept(netns: str) -> None:
    store = Store()
    _svc(store, "ns1", "a", "172.30.0.1", "10.1.0.1")
    _svc(store, "ns1", "b", "172.30.0.2", "10.1.0.2", node_port=30002)
    p = _proxier(netns)
    p.sync(*store.take(), full=True)
    table = nft(netns, "list", "table", "ip", "kube-proxy")
    chain = next(w for w in table.split() if w.startswith("service-") and "ns1/b/" in w)
    # another program's chain in the table jumps to b's chain: deleting b's chain is refused
    nft(netns, "add", "chain", "ip", "kube-proxy", "someone-else")
    nft(netns, "add", "rule", "ip", "kube-proxy", "someone-else", "jump", chain)
    store.delete_service(Ref("ns1", "b"))
    _svc(store, "ns1", "a", "172.30.0.1", "10.1.0.7")
    result = p.sync(*store.take(), full=False)
    assert result.full and p.rejected == {}
    table = nft(netns, "list", "table", "ip", "kube-proxy")
    assert "10.1.0.7 . 80" in table and "172.30.0.2" not in table  # b's elements are gone
    assert f"chain {chain} " in table  # its chain is kept while the foreign rule names it
