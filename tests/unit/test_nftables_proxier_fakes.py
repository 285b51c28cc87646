"""NftablesProxier through injected fakes (tests.support.fakes.FakeNftTable and FakeRestorer):
a partial sync sends only the changed services' ops; a failed write is followed by a
reconciling full sync; a refused service is found, left out and retried once it changes; drift
found by the generation check leads to a full sync that reads the table back; an affinity
timeout change recreates the sets in the right order. No root, no kernel: the ops and the
`nft -f` inputs are the assertions."""

from __future__ import annotations

import pytest

from kproxy.backends.base import SyncError
from kproxy.backends.nftables import NftablesProxier
from kproxy.model.options import ProxyOptions
from tests.support.builders import make_endpoint, make_service, make_slice, numbered_store
from tests.support.fakes import FakeNftTable, FakeRestorer


def _proxier() -> tuple[NftablesProxier, FakeNftTable, FakeRestorer]:
    table = FakeNftTable()
    restorer = FakeRestorer(on_commit=table.load)
    p = NftablesProxier(
        options=ProxyOptions(node_name="n"), writer=table, run=table, restorer=restorer
    )
    return p, table, restorer


def _read_backs(table: FakeNftTable) -> int:
    return sum("-j" in argv for argv in table.calls)


def _touched(ops: list[object]) -> set[str]:
    """The services (ns1/sN) the ops name, through chain, set or element names and comments."""
    out = set()
    for op in ops:
        e = getattr(op, "element", None)
        text = " ".join([getattr(op, "name", ""), e.set if e else "", e.comment if e else ""])
        text += " " + " ".join(e.key) if e else ""
        for i in range(10):
            if f"ns1/s{i}/" in text or f"ns1/s{i}:" in text or f"172.30.0.{i + 1}" in text:
                out.add(f"s{i}")
    return out


def test_a_partial_sync_sends_only_the_changed_services_ops() -> None:
    store = numbered_store(3)
    p, table, restorer = _proxier()
    first = p.sync(*store.take(), full=True)
    assert first.full and len(restorer.inputs) == 1 and not table.applied
    # plain ClusterIP services: the chainless fast path (cluster-endpoints-N elements)
    assert "172.30.0.3 . tcp . 80 . 0 : 10.1.0.3 . 80" in restorer.inputs[0]
    store.set_slice(make_slice(service="s1", endpoints=[make_endpoint("10.1.0.9")]))
    result = p.sync(*store.take(), full=False)
    assert not result.full and result.services_written == 1 and len(restorer.inputs) == 1
    ((ops),) = table.applied
    assert _touched(ops) == {"s1"}
    kinds = {op.kind for op in ops}
    assert kinds == {"add-element", "delete-element"}  # an endpoint change: elements only
    # nothing changed: no write at all
    assert p.sync(*store.take(), full=False).services_written == 0 and len(table.applied) == 1
    # a deleted service: its elements go, nothing else
    store.delete_service(make_service(name="s2").ref)
    p.sync(*store.take(), full=False)
    ops = table.applied[-1]
    assert _touched(ops) == {"s2"} and {op.kind for op in ops} == {"delete-element"}


def test_a_deleted_chain_layout_service_loses_its_chains() -> None:
    store = numbered_store(3, affinity_timeout=60)  # affinity keeps kube-proxy's chain layout
    p, table, _restorer = _proxier()
    p.sync(*store.take(), full=True)
    assert any("ns1/s2/" in c for c in table.chains)
    store.delete_service(make_service(name="s2").ref)
    p.sync(*store.take(), full=False)
    ops = table.applied[-1]
    assert _touched(ops) == {"s2"} and "delete-chain" in {op.kind for op in ops}
    assert not any("ns1/s2/" in c for c in table.chains)


def test_a_failed_write_is_followed_by_a_reconciling_full_sync() -> None:
    store = numbered_store(2)
    p, table, restorer = _proxier()
    p.sync(*store.take(), full=True)
    reads = _read_backs(table)
    table.refuse = 1
    store.set_slice(make_slice(service="s0", endpoints=[make_endpoint("10.1.0.7")]))
    # the refused partial write is followed by a full sync at once, which reads the table back
    result = p.sync(*store.take(), full=False)
    assert result.full and len(restorer.inputs) == 2 and "10.1.0.7 . 80" in restorer.inputs[1]
    assert _read_backs(table) == reads + 1 and p.rejected == {}
    # a full sync refused with no service to blame (the retry refused too): the error stands,
    # and the next sync is full again
    restorer.refuse = 2
    with pytest.raises(SyncError):
        p.sync(*store.take(), full=True)
    assert p.rejected == {}
    assert p.sync(*store.take(), full=False).full


def test_a_refused_service_is_found_left_out_and_retried_when_it_changes() -> None:
    store = numbered_store(6)
    p, table, restorer = _proxier()
    table.refuse_text = restorer.refuse_text = "10.1.0.4"  # s3's endpoint: refused everywhere
    first = p.sync(*store.take(), full=True)
    assert first.full and first.services_written == 5
    assert [str(ref) for ref in p.rejected] == ["ns1/s3"]
    assert "10.1.0.4" not in restorer.inputs[-1] and "10.1.0.6 . 80" in restorer.inputs[-1]
    checks = sum("--check" in argv for argv in table.calls)
    assert checks <= 8  # control, then halves (6 services: at most 2 * log2(6) + 1)
    # later syncs neither write nor probe it again while it is unchanged
    store.set_slice(make_slice(service="s1", endpoints=[make_endpoint("10.1.0.8")]))
    assert not p.sync(*store.take(), full=False).full
    assert _touched(table.applied[-1]) == {"s1"}
    p.sync(*store.take(), full=True)
    assert sum("--check" in argv for argv in table.calls) == checks
    assert [str(ref) for ref in p.rejected] == ["ns1/s3"]
    # once it changes (to something accepted) it is programmed
    store.set_slice(make_slice(service="s3", endpoints=[make_endpoint("10.1.0.14")]))
    assert not p.sync(*store.take(), full=False).full
    assert p.rejected == {} and _touched(table.applied[-1]) == {"s3"}


def test_drift_leads_to_a_full_sync_that_reads_the_table_back() -> None:
    store = numbered_store(2)
    p, table, _restorer = _proxier()
    p.sync(*store.take(), full=True)
    assert p.drift() is None
    table.foreign_commit()  # someone else's commit elsewhere: same object count, no drift
    assert p.drift() is None
    table.foreign_commit(chain="intruder")
    assert "holds" in (p.drift() or "")
    reads = _read_backs(table)
    # the runner asks for a full sync after drift; it reads the table back
    assert p.sync(*store.take(), full=True).full
    assert _read_backs(table) == reads + 1
    table.exists = False
    table.generation += 1
    assert "gone" in (p.drift() or "")


def test_an_affinity_timeout_change_recreates_the_sets_around_emptied_chains() -> None:
    store = numbered_store(1, affinity_timeout=600)
    p, table, restorer = _proxier()
    p.sync(*store.take(), full=True)
    assert set(table.sets.values()) >= {600}
    store.set_service(make_service(name="s0", cluster_ips=("172.30.0.1",), affinity_timeout=60))
    result = p.sync(*store.take(), full=False)
    assert not result.full
    ops = table.applied[-1]
    order = [(op.kind, op.name or getattr(op.setdef, "name", "")) for op in ops]
    aff = next(n for k, n in order if k == "delete-set")
    assert aff.startswith("affinity-")
    first = {k: order.index((k, n)) for k, n in order if n == aff}
    chains = [i for i, (k, n) in enumerate(order) if k == "flush-chain"]
    rules = [i for i, (k, _) in enumerate(order) if k == "add-rule"]
    # every chain emptied before the set goes; the set back before any rule names it
    assert max(chains) < first["delete-set"] < first["add-set"] < min(rules)
    assert {t for n, t in table.sets.items() if n.startswith("affinity-")} == {60}
    # the same change arriving in a full sync (e.g. while kproxy was down)
    store.set_service(make_service(name="s0", cluster_ips=("172.30.0.1",), affinity_timeout=30))
    p.sync(*store.take(), full=True)
    text = restorer.inputs[-1]
    at = text.index(f"delete set ip kube-proxy {aff}\n")
    assert text.index("flush chain ip kube-proxy service-") < at
    assert at < text.index(f"add set ip kube-proxy {aff} ", at) < text.index("add rule", at)
    assert {t for n, t in table.sets.items() if n.startswith("affinity-")} == {30}
    # an unchanged timeout in a full sync keeps the set (and the clients' affinity)
    p.sync(*store.take(), full=True)
    assert "delete set" not in restorer.inputs[-1]


def _external(table: FakeNftTable) -> str:
    return table.elements.get(("service-ips", "5.6.7.8 . tcp . 80"), "")


@pytest.mark.parametrize("first", ["s0", "s1"])
def test_two_services_claiming_one_external_ip_port_hand_over_in_partial_syncs(
    first: str,
) -> None:
    """s0 and s1 both claim 5.6.7.8:80 (any user can set externalIPs). The kernel holds the
    element of the first in name order, as a full sync writes it; the second's arrival sends
    nothing for the key (the fake, like the kernel, refuses an existing key), and the first's
    deletion hands the key over to the other in the same partial sync."""
    store = numbered_store(0)
    p, table, restorer = _proxier()

    def add(name: str, i: int) -> None:
        store.set_service(
            make_service(name=name, cluster_ips=(f"172.30.0.{i + 1}",), external_ips=("5.6.7.8",))
        )
        store.set_slice(make_slice(service=name, endpoints=[make_endpoint(f"10.1.0.{i + 1}")]))

    second = "s1" if first == "s0" else "s0"
    add(first, int(first[1]))
    assert p.sync(*store.take(), full=True).full
    add(second, int(second[1]))
    result = p.sync(*store.take(), full=False)
    assert not result.full and result.services_written == 1
    assert '"ns1/s0:p80"' in _external(table)  # the first in name order
    kept = dict(table.elements)
    p.sync(*store.take(), full=True)  # a full sync agrees
    assert table.elements == kept and len(restorer.inputs) == 2
    store.delete_service(make_service(name="s0").ref)
    result = p.sync(*store.take(), full=False)
    assert not result.full and len(restorer.inputs) == 2  # no full sync needed
    assert '"ns1/s1:p80"' in _external(table)
    kept = dict(table.elements)
    p.sync(*store.take(), full=True)
    assert table.elements == kept
