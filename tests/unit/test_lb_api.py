"""The LB API edge against the fake apiserver through the real kubernetes client: Service status
merge patches with resourceVersion preconditions, Lease create/replace with conflicts, and the
Lease/Service/Node watches."""

from __future__ import annotations

import threading

import pytest

from kproxy.kube.lbapi import Conflict, LBApi, parse_lb_service, parse_node_state
from kproxy.lb import election as E
from tests.support.fakeapi import FakeApiServer, RecordingSink, wait_until
from tests.support.objects import make_service_obj


@pytest.fixture
def api(fake_apiserver: FakeApiServer, fake_kubeconfig: str) -> LBApi:
    return LBApi(kubeconfig=fake_kubeconfig, master=None, namespace="kube-system")


def lb_obj(**spec: object) -> dict[str, object]:
    return make_service_obj(
        "default",
        "web",
        type="LoadBalancer",
        clusterIP="10.96.0.80",
        ports=[{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}],
        **spec,
    )


def test_status_patch_writes_ingress_and_keeps_spec(
    fake_apiserver: FakeApiServer, api: LBApi
) -> None:
    stored = fake_apiserver.upsert(lb_obj())
    rv = api.patch_ingress(
        "default",
        "web",
        ("192.168.50.200",),
        resource_version=stored["metadata"]["resourceVersion"],
    )
    svc = fake_apiserver.get("Service", "default", "web")
    assert svc is not None
    assert svc["status"]["loadBalancer"]["ingress"] == [{"ip": "192.168.50.200"}]
    assert svc["spec"]["clusterIP"] == "10.96.0.80"
    assert rv == svc["metadata"]["resourceVersion"]
    assert parse_lb_service(svc).ingress == ("192.168.50.200",)
    # a stale resourceVersion is a conflict, as the apiserver answers
    with pytest.raises(Conflict):
        api.patch_ingress(
            "default", "web", (), resource_version=stored["metadata"]["resourceVersion"]
        )
    api.patch_ingress("default", "web", (), resource_version=rv)
    cleared = fake_apiserver.get("Service", "default", "web")
    assert cleared is not None and parse_lb_service(cleared).ingress == ()
    assert fake_apiserver.writes[("PATCH", "Service", "status")] == 2


def test_status_patch_ignores_spec_changes(fake_apiserver: FakeApiServer, api: LBApi) -> None:
    fake_apiserver.upsert(lb_obj())
    code, _ = fake_apiserver.write(
        "PATCH",
        "Service",
        "default",
        "web",
        {"spec": {"clusterIP": "1.2.3.4"}, "status": {"loadBalancer": {"ingress": [{"ip": "x"}]}}},
        subresource="status",
    )
    svc = fake_apiserver.get("Service", "default", "web")
    assert code == 200 and svc is not None and svc["spec"]["clusterIP"] == "10.96.0.80"


def test_lease_create_replace_and_conflicts(fake_apiserver: FakeApiServer, api: LBApi) -> None:
    assert api.read_lease(E.ALLOCATOR_LEASE) is None
    mine = api.write_lease(E.ALLOCATOR_LEASE, E.claim(None, me="node1", duration=2, now_wall=1.0))
    assert mine.holder == "node1" and mine.resource_version
    # a second create (another agent that saw no Lease) loses
    with pytest.raises(Conflict):
        api.write_lease(E.ALLOCATOR_LEASE, E.claim(None, me="node2", duration=2, now_wall=1.0))
    renewed = api.write_lease(
        E.ALLOCATOR_LEASE, E.claim(mine, me="node1", duration=2, now_wall=2.0)
    )
    # a replace based on the older resourceVersion loses too
    with pytest.raises(Conflict):
        api.write_lease(E.ALLOCATOR_LEASE, E.claim(mine, me="node2", duration=2, now_wall=3.0))
    read = api.read_lease(E.ALLOCATOR_LEASE)
    assert read == renewed and read.holder == "node1"
    stored = fake_apiserver.get("Lease", "kube-system", E.ALLOCATOR_LEASE)
    assert stored is not None and stored["spec"]["renewTime"].startswith("1970-01-01T00:00:02")


def test_watchers_deliver_leases_services_and_nodes(
    fake_apiserver: FakeApiServer, api: LBApi
) -> None:
    sink = RecordingSink()
    sink.state["Lease"] = {}
    stop = threading.Event()
    fake_apiserver.upsert(lb_obj())
    fake_apiserver.upsert({"kind": "Node", "metadata": {"name": "node1"}})
    watchers = api.watchers(sink, stop=stop)
    for w in watchers:
        w.thread.start()
    try:
        assert wait_until(lambda: all(w.synced.is_set() for w in watchers))
        api.write_lease("kproxy-agent-node1", E.claim(None, me="node1", duration=2, now_wall=1.0))
        assert wait_until(lambda: "kube-system/kproxy-agent-node1" in sink.names("Lease"))
        assert sink.names("Service") == {"default/web"} and sink.names("Node") == {"node1"}
    finally:
        stop.set()
        for w in watchers:
            w.interrupt()


def test_node_state_from_conditions_and_labels() -> None:
    base = {"metadata": {"name": "n"}}
    assert parse_node_state(base).usable
    not_ready = {**base, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    assert not parse_node_state(not_ready).usable
    excluded = {
        "metadata": {
            "name": "n",
            "labels": {"node.kubernetes.io/exclude-from-external-load-balancers": ""},
        }
    }
    assert not parse_node_state(excluded).usable
