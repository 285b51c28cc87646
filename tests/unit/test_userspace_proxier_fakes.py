"""UserspaceProxier through injected fakes (tests.support.fakes.FakeRestorer and SavedTables)
and a real, unstarted ProxyEngine: listeners bind real sockets on ephemeral ports (no root), the
restore inputs and the tables they leave are the assertions. A partial sync touches only the
changed service (an endpoint change rewrites no rule), a deleted service loses its listener
and rules, a refused restore is written again by the next sync, and drift is found by reading
the tables back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kproxy.backends.base import SyncError
from kproxy.backends.userspace import UserspaceProxier
from kproxy.backends.userspace_proxy import ProxyEngine
from kproxy.model.options import ProxyOptions
from tests.support.builders import make_endpoint, make_service, make_slice, numbered_store
from tests.support.fakes import FakeRestorer, SavedTables


@pytest.fixture
def proxier() -> Iterator[tuple[UserspaceProxier, FakeRestorer, SavedTables]]:
    tables = SavedTables()
    restorer = FakeRestorer(on_commit=tables.load)
    p = UserspaceProxier(
        options=ProxyOptions(node_name="n"),
        engine=ProxyEngine(),
        flavour="nft",
        run=tables,
        restorer=restorer,
    )
    yield p, restorer, tables
    for ref in list(p._by_service):
        p._sync_service(ref, ())  # closes the listeners


def _listeners(p: UserspaceProxier) -> dict[str, dict[str, object]]:
    return {d["service"]: d for d in p.describe()}


def test_partial_syncs_touch_only_the_changed_service(
    proxier: tuple[UserspaceProxier, FakeRestorer, SavedTables],
) -> None:
    p, restorer, _tables = proxier
    store = numbered_store(3)
    first = p.sync(*store.take(), full=True)
    assert first.full and first.services_written == 3 and len(restorer.inputs) == 1
    listening = _listeners(p)
    assert {n: d["listening"] for n, d in listening.items()} == {
        "ns1/s0:p80": True,
        "ns1/s1:p80": True,
        "ns1/s2:p80": True,
    }
    for i in range(3):
        port = listening[f"ns1/s{i}:p80"]["proxy_port"]
        assert f"-d 172.30.0.{i + 1}/32" in restorer.inputs[0] and f"{port}" in restorer.inputs[0]
    # an endpoint change: the balancer follows, no rule is rewritten
    store.set_slice(make_slice(service="s1", endpoints=[make_endpoint("10.1.0.9")]))
    result = p.sync(*store.take(), full=False)
    assert not result.full and result.services_written == 1 and len(restorer.inputs) == 1
    now = _listeners(p)
    assert now["ns1/s1:p80"]["endpoints"] == ["10.1.0.9:80"]
    assert now["ns1/s0:p80"]["proxy_port"] == listening["ns1/s0:p80"]["proxy_port"]
    # a deleted service: its listener goes and the rules are written again without it
    store.delete_service(make_service(name="s2").ref)
    p.sync(*store.take(), full=False)
    assert "ns1/s2:p80" not in _listeners(p) and len(restorer.inputs) == 2
    assert "172.30.0.3" not in restorer.inputs[-1] and "172.30.0.1" in restorer.inputs[-1]


def test_a_refused_restore_is_written_again_by_the_next_sync(
    proxier: tuple[UserspaceProxier, FakeRestorer, SavedTables],
) -> None:
    p, restorer, _tables = proxier
    store = numbered_store(2)
    restorer.refuse = 1
    with pytest.raises(SyncError):
        p.sync(*store.take(), full=True)
    assert restorer.inputs == []
    result = p.sync(*store.take(), full=False)  # nothing changed, but nothing was applied
    assert len(restorer.inputs) == 1 and "172.30.0.2" in restorer.inputs[0]
    assert result.services_written == 0


def test_drift_is_found_by_reading_the_tables_back(
    proxier: tuple[UserspaceProxier, FakeRestorer, SavedTables],
) -> None:
    p, _restorer, tables = proxier
    p.sync(*numbered_store(2).take(), full=True)
    assert p.drift() is None
    nat = tables.tables["nat"]
    tables.tables["nat"] = "".join(
        line + "\n" for line in nat.splitlines() if "172.30.0.2" not in line
    )
    assert "missing" in (p.drift() or "")
    tables.tables["nat"] = nat
    assert p.drift() is None
