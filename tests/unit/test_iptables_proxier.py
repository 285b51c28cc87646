"""IptablesProxier through injected fakes (tests.support.fakes): which chains a partial sync
writes, nft chunking of big full syncs, a refused restore making the next sync full, and drift
found by reading the tables back. No root, no kernel: the restore inputs are the assertions."""

from __future__ import annotations

import pytest

from kproxy.backends.base import SyncError
from kproxy.backends.iptables import IptablesProxier
from kproxy.model.objects import Ref
from kproxy.model.options import ProxyOptions
from kproxy.render import chains as C
from tests.support.builders import make_endpoint, make_slice, numbered_store
from tests.support.fakes import FakeRestorer, SavedTables


def _proxier(flavour: str, **kw: object) -> tuple[IptablesProxier, FakeRestorer, SavedTables]:
    restorer, tables = FakeRestorer(), SavedTables()
    p = IptablesProxier(
        options=ProxyOptions(node_name="n"),
        flavour=flavour,
        run=tables,
        restorer=restorer,
        **kw,  # type: ignore[arg-type]
    )
    return p, restorer, tables


def _declared(text: str) -> set[str]:
    return {line[1:].split()[0] for line in text.splitlines() if line.startswith(":")}


def _svc(name: str) -> str:
    return C.svc_chain(f"ns1/{name}:p80", "tcp")


@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_a_partial_sync_writes_only_the_changed_services_chains(flavour: str) -> None:
    store = numbered_store(3)
    p, restorer, _ = _proxier(flavour)
    assert p.sync(*store.take(), full=True).full
    restorer.inputs.clear()
    store.set_slice(make_slice(service="s1", endpoints=[make_endpoint("10.1.0.9")]))
    result = p.sync(*store.take(), full=False)
    assert not result.full and result.services_written == 1
    (text,) = restorer.inputs
    gone = C.sep_chain("ns1/s1:p80", "tcp", "10.1.0.2:80")
    added = C.sep_chain("ns1/s1:p80", "tcp", "10.1.0.9:80")
    assert _declared(text) == {_svc("s1"), added, gone}
    assert f"-X {gone}" in text and "KUBE-SERVICES" not in text and "*filter" not in text
    assert _svc("s0") in p.programmed[Ref("ns1", "s0")].names
    # nothing changed: nothing written
    restorer.inputs.clear()
    p.sync(*store.take(), full=False)
    assert restorer.inputs == []


def test_a_deleted_service_loses_its_chains_and_its_shared_lines_in_place() -> None:
    store = numbered_store(2)
    p, restorer, _ = _proxier("nft")
    p.sync(*store.take(), full=True)
    restorer.inputs.clear()
    store.delete_service(Ref("ns1", "s0"))
    p.sync(*store.take(), full=False)
    (text,) = restorer.inputs
    assert f"-X {_svc('s0')}" in text
    assert any(ln.startswith("-D KUBE-SERVICES") and "ns1/s0" in ln for ln in text.splitlines())
    assert Ref("ns1", "s0") not in p.programmed


def test_nft_full_syncs_are_chunked_at_service_boundaries() -> None:
    store = numbered_store(10)
    p, restorer, _ = _proxier("nft", nft_chunk_chains=4)
    p.sync(*store.take(), full=True)
    assert len(restorer.inputs) > 2 and p.restores == len(restorer.inputs)
    *chunks, last = restorer.inputs
    for i in range(10):  # each service's chains (SVC + its SEP) in exactly one input
        holders = [t for t in restorer.inputs if f":{_svc(f's{i}')} " in t]
        sep = C.sep_chain(f"ns1/s{i}:p80", "tcp", f"10.1.0.{i + 1}:80")
        assert len(holders) == 1 and f":{sep} " in holders[0]
    assert all(":KUBE-SERVICES " not in t for t in chunks)
    assert ":KUBE-SERVICES " in last and f":{C.CANARY} " in last
    # legacy rewrites whole tables per input: always one
    p2, restorer2, _ = _proxier("legacy", nft_chunk_chains=4)
    p2.sync(*numbered_store(10).take(), full=True)
    assert len(restorer2.inputs) == 1


def test_a_refused_restore_makes_the_next_sync_a_reconciling_full_one() -> None:
    store = numbered_store(2)
    p, restorer, tables = _proxier("nft")
    p.sync(*store.take(), full=True)
    store.set_slice(make_slice(service="s0", endpoints=[make_endpoint("10.1.0.7")]))
    restorer.refuse = 1
    restorer.inputs.clear()
    with pytest.raises(SyncError):
        p.sync(*store.take(), full=False)
    # the probes (their own throwaway chains) found no service to blame; none of ours written
    assert not any(_svc("s0") in t or "KUBE-SERVICES" in t for t in restorer.inputs)
    tables.calls.clear()
    result = p.sync(*store.take(), full=False)  # nothing changed since, yet it is full
    assert result.full and result.services_written == 2
    assert ":KUBE-SERVICES " in restorer.inputs[-1]
    assert any("-save" in c[0] for c in tables.calls)  # reconciled: the tables were read back


def test_drift_is_found_by_reading_the_tables_back() -> None:
    store = numbered_store(2)
    p, restorer, tables = _proxier("legacy")
    p.sync(*store.take(), full=True)
    (full,) = restorer.inputs
    tables.load(full)
    assert p.inspect() is None  # the tables hold what was written
    sep = C.sep_chain("ns1/s1:p80", "tcp", "10.1.0.2:80")
    tables.tables["nat"] = "".join(
        ln + "\n" for ln in tables.tables["nat"].splitlines() if not ln.startswith(f"-A {sep} ")
    )
    found = p.inspect()
    assert found is not None and sep in found
    tables.load(full)  # intact again, but someone flushed mangle
    tables.tables["mangle"] = ""
    found = p.inspect()
    assert found is not None and "canary" in found
