"""ViewTracker: previous and current views per changed service; only kept ones remembered."""

from __future__ import annotations

from kproxy.model.objects import EndpointPort, Ref
from kproxy.model.store import Store
from kproxy.model.tracker import Views, ViewTracker
from kproxy.runtime.followups import views_kept, views_may_be_kept
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

UDP_PORT = (make_port(53, name="dns", protocol="UDP"),)
DNS_PORTS = (EndpointPort("dns", "UDP", 53),)


def _addresses(views: Views) -> list[str]:
    return [e.ip for v in views for e in v.endpoints]


def test_previous_and_current_of_the_changed_services() -> None:
    store = Store()
    store.set_service(make_service(name="dns", ports=UDP_PORT))
    store.set_slice(
        make_slice(service="dns", endpoints=[make_endpoint("10.1.0.1")], ports=DNS_PORTS)
    )
    tracker = ViewTracker(family=4, node_name="n1")
    first = tracker.advance(store.take()[0], None)
    ref = Ref("ns1", "dns")
    assert first.previous == {ref: ()}
    assert _addresses(first.current[ref]) == ["10.1.0.1"]

    store.set_slice(
        make_slice(service="dns", endpoints=[make_endpoint("10.1.0.2")], ports=DNS_PORTS)
    )
    snapshot, changes = store.take()
    step = tracker.advance(snapshot, changes.services)
    assert _addresses(step.previous[ref]) == ["10.1.0.1"]
    assert _addresses(step.current[ref]) == ["10.1.0.2"]

    store.delete_service(ref)
    snapshot, changes = store.take()
    gone = tracker.advance(snapshot, changes.services)
    assert _addresses(gone.previous[ref]) == ["10.1.0.2"] and gone.current == {ref: ()}
    assert ref not in tracker.known


def test_a_full_advance_reports_deleted_services_and_forget_reports_no_previous() -> None:
    store = Store()
    store.set_service(make_service(name="a", ports=UDP_PORT))
    tracker = ViewTracker(family=4, node_name="n1")
    tracker.advance(store.take()[0], None)
    store.delete_service(Ref("ns1", "a"))
    store.set_service(make_service(name="b", ports=UDP_PORT))
    full = tracker.advance(store.take()[0], None)
    assert set(full.current) == {Ref("ns1", "a"), Ref("ns1", "b")}
    assert full.current[Ref("ns1", "a")] == ()
    assert tracker.advance(store.peek(), None, forget=True).previous == {}


def test_only_views_later_work_reads_are_kept() -> None:
    store = Store()
    store.set_service(make_service(name="web"))  # TCP, cluster policies: nothing to keep
    store.set_service(make_service(name="dns", ports=UDP_PORT))
    tracker = ViewTracker(family=4, node_name="n1", keep=views_kept)
    step = tracker.advance(store.take()[0], None)
    assert set(step.current) == {Ref("ns1", "web"), Ref("ns1", "dns")}
    assert set(tracker.known) == {Ref("ns1", "dns")}
    # the TCP service's next change has no remembered previous state
    store.set_slice(make_slice(service="web", endpoints=[make_endpoint("10.1.0.9")]))
    snapshot, changes = store.take()
    assert tracker.advance(snapshot, changes.services).previous == {Ref("ns1", "web"): ()}


def test_services_whose_views_no_later_work_reads_are_not_built() -> None:
    """With `relevant`, a TCP service with cluster policies is left out of an advance (nothing
    would keep or compare its views), while a remembered service that stops being relevant is
    still reported: its previous views against its current ones (the UDP port went away)."""
    store = Store()
    store.set_service(make_service(name="web"))
    store.set_service(make_service(name="dns", ports=UDP_PORT))
    store.set_service(make_service(name="local", internal_policy_local=True))
    tracker = ViewTracker(family=4, node_name="n1", keep=views_kept, relevant=views_may_be_kept)
    step = tracker.advance(store.take()[0], None)
    assert set(step.current) == {Ref("ns1", "dns"), Ref("ns1", "local")}
    assert set(tracker.known) == {Ref("ns1", "dns"), Ref("ns1", "local")}
    store.set_slice(make_slice(service="web", endpoints=[make_endpoint("10.1.0.9")]))
    store.set_service(make_service(name="dns"))  # now TCP: its old UDP port must be reported
    snapshot, changes = store.take()
    step = tracker.advance(snapshot, changes.services)
    assert set(step.previous) == set(step.current) == {Ref("ns1", "dns")}
    assert [v.protocol for v in step.previous[Ref("ns1", "dns")]] == ["UDP"]
    assert [v.protocol for v in step.current[Ref("ns1", "dns")]] == ["TCP"]
    assert set(tracker.known) == {Ref("ns1", "local")}
    # and the views the two trackers keep are the same
    plain = ViewTracker(family=4, node_name="n1", keep=views_kept)
    plain.advance(snapshot, None)
    assert plain.known == tracker.known
