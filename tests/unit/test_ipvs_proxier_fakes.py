"""IPVSProxier through in-memory collaborators (tests.support.fakes): partial syncs touch only
the changed services' virtual servers, a removed endpoint with connections drains (weight 0)
before it is deleted, a failed apply makes the next sync full, and the drift check sees outside
changes of virtual and real servers (within the documented bound on the netlink path). No root,
no ip_vs module; the VM tier (tests/vm) checks the same proxier against a real kernel."""

from __future__ import annotations

import pytest

from kproxy.backends.base import SyncError
from kproxy.backends.ipvs import IPVSProxier
from kproxy.backends.ipvs_census import Rotation
from kproxy.model.options import ProxyOptions
from kproxy.render import ipvs as R
from kproxy.render import ipvs_diff as D
from tests.support.builders import make_endpoint, make_service, make_slice, numbered_store
from tests.support.fakes import FakeDevice, FakeIPSets, FakeIPVS, FakeRules


def _proxier(
    *, netlink_census: bool = False, rotation: Rotation | None = None
) -> tuple[IPVSProxier, FakeIPVS, FakeDevice, FakeRules]:
    """`netlink_census`: the drift check counts over (fake) netlink with a rotating slice of
    real server dumps, as for IPv6; otherwise it gets the sockopt census of every service."""
    ipvs, device, rules = FakeIPVS(), FakeDevice(), FakeRules()
    p = IPVSProxier(
        options=ProxyOptions(node_name="n"),
        ipvs=ipvs,  # type: ignore[arg-type]
        device=device,
        ipsets=FakeIPSets(),  # type: ignore[arg-type]
        rules=rules,  # type: ignore[arg-type]
        sysctls=lambda family: None,
        interfaces=device.interfaces,
        read_dests=ipvs.proc,
        census=(lambda family: None) if netlink_census else ipvs.census,
        rotation=rotation,
    )
    return p, ipvs, device, rules


def _vip(i: int) -> R.VSKey:
    return R.VSKey(f"172.30.0.{i + 1}", "TCP", 80)


def _dests(ipvs: FakeIPVS, i: int) -> set[str]:
    return {d.address for d in ipvs.dests(_vip(i))}


def test_full_then_partial_touches_only_the_changed_service() -> None:
    store = numbered_store(3)
    p, ipvs, device, rules = _proxier()
    first = p.sync(*store.take(), full=True)
    assert first.full and set(ipvs.table) == {_vip(0), _vip(1), _vip(2)}
    assert {"172.30.0.1", "172.30.0.2", "172.30.0.3"} <= device.bound and rules.applied == 1
    ipvs.applied.clear()
    store.set_slice(make_slice(service="s1", endpoints=[make_endpoint("10.1.0.9")]))
    result = p.sync(*store.take(), full=False)
    assert not result.full and result.services_written == 1 and rules.applied == 1
    touched = {getattr(op, "key", None) for batch in ipvs.applied for op in batch}
    assert touched == {_vip(1)}
    assert _dests(ipvs, 1) == {"10.1.0.9"}
    # a deleted service: its virtual server and its address go
    store.delete_service(make_service(name="s2").ref)
    p.sync(*store.take(), full=False)
    assert _vip(2) not in ipvs.table and "172.30.0.3" not in device.bound


def test_a_removed_endpoint_with_connections_drains_before_it_is_deleted() -> None:
    store = numbered_store(1)
    store.set_slice(
        make_slice(service="s0", endpoints=[make_endpoint("10.1.0.1"), make_endpoint("10.1.0.2")])
    )
    p, ipvs, _, _ = _proxier()
    p.sync(*store.take(), full=True)
    gone = "10.1.0.2"
    ipvs.connections(_vip(0), gone, active=3)
    store.set_slice(make_slice(service="s0", endpoints=[make_endpoint("10.1.0.1")]))
    p.sync(*store.take(), full=False)
    drained = ipvs.dest(_vip(0), gone)
    assert drained is not None and drained.weight == 0  # drains: no new connections
    assert not ipvs.ops(D.DelDest)
    p.sync(*store.take(), full=False)  # still busy: stays
    assert gone in _dests(ipvs, 0)
    ipvs.connections(_vip(0), gone, active=0)
    p.sync(*store.take(), full=False)  # idle now: the next sync deletes it
    assert _dests(ipvs, 0) == {"10.1.0.1"}
    assert [op.address for op in ipvs.ops(D.DelDest)] == [gone]  # type: ignore[union-attr]


def test_a_failed_apply_makes_the_next_sync_full() -> None:
    store = numbered_store(2)
    p, ipvs, _, rules = _proxier()
    p.sync(*store.take(), full=True)
    store.set_slice(make_slice(service="s0", endpoints=[make_endpoint("10.1.0.7")]))
    ipvs.refuse = 1
    with pytest.raises(SyncError):
        p.sync(*store.take(), full=False)
    again = p.sync(*store.take(), full=False)  # nothing new changed, yet it reconciles all
    assert again.full and rules.applied == 2
    assert _dests(ipvs, 0) == {"10.1.0.7"} and _dests(ipvs, 1) == {"10.1.0.2"}


# -- the drift check --------------------------------------------------------------------------
def _outside_delete_dest(ipvs: FakeIPVS, key: R.VSKey) -> str:
    """`ipvsadm -d` of one of `key`'s real servers; returns its address."""
    gone = ipvs.table[key].dests[0]
    ipvs.apply([D.DelDest(key, gone.address, gone.port)])
    return gone.address


def _outside_add_dest(ipvs: FakeIPVS, key: R.VSKey, address: str) -> None:
    ipvs.apply([D.AddDest(key, R.Dest(address, 8080))])


def test_census_drift_sees_an_outside_real_server_delete_at_the_next_check() -> None:
    store = numbered_store(50)
    p, ipvs, _, _ = _proxier()
    assert p.drift() is None  # nothing synced yet: the first sync is full anyway
    p.sync(*store.take(), full=True)
    store.set_slice(make_slice(service="s3", endpoints=[make_endpoint("10.1.0.99")]))
    p.sync(*store.take(), full=False)  # partial syncs keep the record in step
    assert p.drift() is None and p.drift() is None
    ipvs.applied.clear()
    gone = _outside_delete_dest(ipvs, _vip(42))
    found = p.drift()
    assert found is not None and "50 IPv4 virtual servers with 49 real servers" in found
    result = p.sync(*store.take(), full=False)  # the drift made it full: the server is back
    assert result.full and gone in _dests(ipvs, 42)
    assert p.drift() is None


def test_census_drift_sees_a_real_server_moved_between_services() -> None:
    """Same totals, different virtual servers: the fingerprint differs."""
    store = numbered_store(5)
    p, ipvs, _, _ = _proxier()
    p.sync(*store.take(), full=True)
    _outside_delete_dest(ipvs, _vip(1))
    _outside_add_dest(ipvs, _vip(2), "10.9.9.9")
    found = p.drift()
    assert found is not None and "not the same ones" in found
    p.sync(*store.take(), full=False)
    assert _dests(ipvs, 1) == {"10.1.0.2"} and _dests(ipvs, 2) == {"10.1.0.3"}


def test_census_drift_sees_virtual_servers_deleted_or_added_from_outside() -> None:
    store = numbered_store(3)
    p, ipvs, _, _ = _proxier()
    p.sync(*store.take(), full=True)
    ipvs.apply([D.DelVS(_vip(0))])
    found = p.drift()
    assert found is not None and "2 IPv4 virtual servers" in found
    p.sync(*store.take(), full=False)
    assert _vip(0) in ipvs.table and p.drift() is None
    foreign = R.VSKey("192.0.2.1", "TCP", 9999)
    ipvs.apply([D.AddVS(R.VirtualServer(foreign))])
    assert p.drift() is not None
    p.sync(*store.take(), full=False)  # the full sync leaves it alone and records it
    assert foreign in ipvs.table and p.drift() is None


def test_netlink_drift_counts_services_every_check_and_dests_in_a_rotating_slice() -> None:
    n, periods = 40, 4
    store = numbered_store(n)
    p, ipvs, _, _ = _proxier(netlink_census=True, rotation=Rotation(periods=periods, minimum=1))
    p.sync(*store.take(), full=True)
    ipvs.apply([D.DelVS(_vip(7))])  # a virtual server: seen at the next check
    assert "39 IPv4 virtual servers" in (p.drift() or "")
    p.sync(*store.take(), full=False)
    assert p.drift() is None
    # a real server: seen within `periods` checks (10 of the 40 services counted per check)
    for victim in (0, 13, 39):
        _outside_delete_dest(ipvs, _vip(victim))
        found = [p.drift() for _ in range(periods)]
        hits = [f for f in found if f]
        assert len(hits) == 1, found  # the first hit makes the next sync full
        assert f"{_vip(victim).address}:80/TCP has 0 real servers, kproxy wrote 1" in hits[0]
        p.sync(*store.take(), full=False)
        assert _dests(ipvs, victim) == {f"10.1.0.{victim + 1}"}
        assert [p.drift() for _ in range(periods)] == [None] * periods


def test_an_ipset_entry_or_a_vip_lost_from_outside_is_drift_and_the_full_sync_restores_it() -> None:
    store = numbered_store(3)
    p, _, device, _ = _proxier()
    ipsets = p.ipsets
    assert isinstance(ipsets, FakeIPSets)
    p.sync(*store.take(), full=True)
    assert p.drift() is None
    entry = next(iter(ipsets.contents[R.CLUSTER_IP_SET]))
    ipsets.lost.add((R.CLUSTER_IP_SET, entry))  # ipset del from outside
    found = p.drift()
    assert found is not None and R.CLUSTER_IP_SET in found, found
    assert p.sync(*store.take(), full=False).full
    assert entry in ipsets.contents[R.CLUSTER_IP_SET] and p.drift() is None
    device.bound.discard("172.30.0.2")  # ip addr del from outside
    found = p.drift()
    assert found is not None and "kube-ipvs0 holds 2 IPv4 addresses, kproxy bound 3" in found
    assert p.sync(*store.take(), full=False).full
    assert "172.30.0.2" in device.bound and p.drift() is None
