"""The fake apiserver speaks the list/watch protocol faithfully (checked with plain HTTP)."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.support.fakeapi import (
    FakeApiServer,
    fake_apiserver_fixture,  # noqa: F401
    wait_until,
)
from tests.support.objects import make_node_obj, make_service_obj, make_slice_obj

SERVICES = "/api/v1/services"


def _conn(server: FakeApiServer, timeout: float = 5) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(server.host, server.port, timeout=timeout)


def _headers(server: FakeApiServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token}"} if server.token else {}


def get(server: FakeApiServer, path: str, **params: Any) -> tuple[int, dict[str, Any]]:
    conn = _conn(server)
    try:
        conn.request("GET", f"{path}?{urlencode(params)}", headers=_headers(server))
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture
def watch(fake_apiserver: FakeApiServer) -> Iterator[Any]:
    """watch(path, **params) -> (HTTP status, iterator of events); streams closed afterwards."""
    conns: list[http.client.HTTPConnection] = []

    def start(path: str, **params: Any) -> tuple[int, Iterator[dict[str, Any]]]:
        conn = _conn(fake_apiserver)
        conns.append(conn)
        query = urlencode({"watch": "true", **params})
        conn.request("GET", f"{path}?{query}", headers=_headers(fake_apiserver))
        resp = conn.getresponse()

        def events() -> Iterator[dict[str, Any]]:
            while line := resp.readline():
                yield json.loads(line)

        return resp.status, events()

    yield start
    for conn in conns:
        conn.close()


def _populate(server: FakeApiServer) -> None:
    server.upsert(make_service_obj("default", "web"))
    server.upsert(make_service_obj("shop", "cart", labels={"tier": "front"}))
    server.upsert(make_slice_obj("default", "web-1", "web", ["10.244.1.11"]))
    server.upsert(make_node_obj("node-a"))
    server.upsert(make_node_obj("node-b"))


def test_list_all_namespaces_and_one(fake_apiserver: FakeApiServer) -> None:
    _populate(fake_apiserver)
    status, body = get(fake_apiserver, SERVICES)
    assert status == 200
    assert body["kind"] == "ServiceList" and body["apiVersion"] == "v1"
    assert body["metadata"]["resourceVersion"] == str(fake_apiserver.resource_version)
    assert [i["metadata"]["name"] for i in body["items"]] == ["web", "cart"]

    _, body = get(fake_apiserver, "/api/v1/namespaces/shop/services")
    assert [i["metadata"]["name"] for i in body["items"]] == ["cart"]
    _, body = get(fake_apiserver, "/apis/discovery.k8s.io/v1/endpointslices")
    assert body["kind"] == "EndpointSliceList" and body["apiVersion"] == "discovery.k8s.io/v1"
    assert body["items"][0]["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
    _, body = get(fake_apiserver, "/api/v1/nodes", fieldSelector="metadata.name=node-b")
    assert [i["metadata"]["name"] for i in body["items"]] == ["node-b"]
    _, body = get(fake_apiserver, SERVICES, labelSelector="tier=front")
    assert [i["metadata"]["name"] for i in body["items"]] == ["cart"]
    assert fake_apiserver.lists[SERVICES] == 2


def test_get_one_object(fake_apiserver: FakeApiServer) -> None:
    _populate(fake_apiserver)
    status, body = get(fake_apiserver, "/api/v1/namespaces/shop/services/cart")
    assert status == 200 and body["metadata"]["name"] == "cart"
    status, body = get(fake_apiserver, "/api/v1/namespaces/shop/services/nope")
    assert status == 404 and body["kind"] == "Status" and body["code"] == 404


def test_discovery_and_auth(fake_apiserver: FakeApiServer) -> None:
    assert get(fake_apiserver, "/version")[1]["major"] == "1"
    assert "v1" in get(fake_apiserver, "/api")[1]["versions"]
    groups = get(fake_apiserver, "/apis")[1]["groups"]
    assert [g["name"] for g in groups] == ["discovery.k8s.io", "coordination.k8s.io"]
    conn = _conn(fake_apiserver)
    conn.request("GET", SERVICES)  # no token
    resp = conn.getresponse()
    assert resp.status == 401 and json.loads(resp.read())["reason"] == "Unauthorized"
    conn.close()


def test_resource_versions_increase_and_uids_persist(fake_apiserver: FakeApiServer) -> None:
    first = fake_apiserver.upsert(make_service_obj("default", "web"))
    second = fake_apiserver.upsert(make_service_obj("default", "web", type="NodePort"))
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    assert fake_apiserver.delete("Service", "default", "web")
    assert not fake_apiserver.delete("Service", "default", "web")


def test_watch_streams_events_after_the_resource_version(
    fake_apiserver: FakeApiServer, watch: Any
) -> None:
    fake_apiserver.upsert(make_service_obj("default", "old"))
    rv = fake_apiserver.resource_version
    fake_apiserver.upsert(make_service_obj("default", "web"))
    status, events = watch(SERVICES, resourceVersion=rv, timeoutSeconds=5)
    assert status == 200

    first = next(events)
    assert first["type"] == "ADDED" and first["object"]["metadata"]["name"] == "web"
    threading.Timer(0.2, fake_apiserver.delete, ("Service", "default", "web")).start()
    gone = next(events)  # blocks until the deletion
    assert gone["type"] == "DELETED" and gone["object"]["metadata"]["name"] == "web"
    assert int(gone["object"]["metadata"]["resourceVersion"]) == fake_apiserver.resource_version


def test_watch_filters_by_namespace_and_field(fake_apiserver: FakeApiServer, watch: Any) -> None:
    rv = fake_apiserver.resource_version
    _, nodes = watch("/api/v1/nodes", resourceVersion=rv, fieldSelector="metadata.name=node-b")
    _, shop = watch("/api/v1/namespaces/shop/services", resourceVersion=rv)
    _populate(fake_apiserver)
    assert next(nodes)["object"]["metadata"]["name"] == "node-b"
    assert next(shop)["object"]["metadata"]["name"] == "cart"


def test_watch_from_zero_starts_with_the_current_objects(
    fake_apiserver: FakeApiServer, watch: Any
) -> None:
    _populate(fake_apiserver)
    _, events = watch(SERVICES, resourceVersion="0", timeoutSeconds=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "web"),
        ("ADDED", "cart"),
    ]  # and the stream ends at timeoutSeconds


def test_timeout_seconds_ends_the_stream(fake_apiserver: FakeApiServer, watch: Any) -> None:
    started = time.monotonic()
    _, events = watch(SERVICES, resourceVersion=fake_apiserver.resource_version, timeoutSeconds=1)
    assert list(events) == []
    assert 0.9 < time.monotonic() - started < 3


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
def test_compaction_makes_old_versions_gone(
    fake_apiserver: FakeApiServer, watch: Any, as_http: bool
) -> None:
    fake_apiserver.expired_as_http_status = as_http
    fake_apiserver.upsert(make_service_obj("default", "web"))
    rv = fake_apiserver.resource_version
    fake_apiserver.compact()

    status, events = watch(SERVICES, resourceVersion=rv)
    if as_http:
        assert status == 410
    else:
        assert status == 200
        [error] = list(events)
        assert error["type"] == "ERROR"
        assert error["object"]["code"] == 410 and error["object"]["reason"] == "Expired"
        assert "too old resource version" in error["object"]["message"]
    _, listed = get(fake_apiserver, SERVICES)
    status, events = watch(
        SERVICES, resourceVersion=listed["metadata"]["resourceVersion"], timeoutSeconds=1
    )
    assert status == 200 and list(events) == []  # a fresh list's version is watchable


def test_open_streams_survive_compaction_without_loss(
    fake_apiserver: FakeApiServer, watch: Any
) -> None:
    _, events = watch(SERVICES, resourceVersion=fake_apiserver.resource_version)
    fake_apiserver.upsert(make_service_obj("default", "a"))
    fake_apiserver.compact()
    fake_apiserver.upsert(make_service_obj("default", "b"))
    assert [next(events)["object"]["metadata"]["name"] for _ in range(2)] == ["a", "b"]


def test_history_window(fake_apiserver: FakeApiServer, watch: Any) -> None:
    fake_apiserver.history_limit = 3
    rv = fake_apiserver.resource_version
    for i in range(4):
        fake_apiserver.upsert(make_node_obj(f"n{i}"))
    # the 4 newest events are needed from rv, only 3 are kept
    assert next(watch("/api/v1/nodes", resourceVersion=rv)[1])["type"] == "ERROR"
    names = [
        e["object"]["metadata"]["name"]
        for e in watch("/api/v1/nodes", resourceVersion=rv + 1, timeoutSeconds=1)[1]
    ]
    assert names == ["n1", "n2", "n3"]


def test_bookmarks_only_when_allowed(fake_apiserver: FakeApiServer, watch: Any) -> None:
    rv = fake_apiserver.resource_version
    _, plain = watch(SERVICES, resourceVersion=rv, timeoutSeconds=1)
    _, marked = watch(SERVICES, resourceVersion=rv, timeoutSeconds=3, allowWatchBookmarks="true")
    fake_apiserver.upsert(make_node_obj("elsewhere"))  # moves the revision, not for services
    assert wait_until(lambda: fake_apiserver.open_watches(SERVICES) == 2)
    fake_apiserver.send_bookmarks()
    bookmark = next(marked)
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["kind"] == "Service"
    assert bookmark["object"]["metadata"]["resourceVersion"] == str(fake_apiserver.resource_version)
    assert list(plain) == []


def test_paging_with_limit_and_continue(fake_apiserver: FakeApiServer) -> None:
    for i in range(5):
        fake_apiserver.upsert(make_service_obj("default", f"s{i}"))
    _, page = get(fake_apiserver, SERVICES, limit=2)
    names = [i["metadata"]["name"] for i in page["items"]]
    rv = page["metadata"]["resourceVersion"]
    fake_apiserver.upsert(make_service_obj("default", "s9"))  # not in the snapshot
    while token := page["metadata"].get("continue"):
        _, page = get(fake_apiserver, SERVICES, limit=2, **{"continue": token})
        assert page["metadata"]["resourceVersion"] == rv
        names += [i["metadata"]["name"] for i in page["items"]]
    assert names == [f"s{i}" for i in range(5)]

    _, page = get(fake_apiserver, SERVICES, limit=2)
    fake_apiserver.compact()
    status, body = get(
        fake_apiserver, SERVICES, limit=2, **{"continue": page["metadata"]["continue"]}
    )
    assert status == 410 and body["reason"] == "Expired"


def test_close_watches_ends_streams_normally(fake_apiserver: FakeApiServer, watch: Any) -> None:
    _, events = watch(SERVICES, resourceVersion=fake_apiserver.resource_version)
    assert wait_until(lambda: fake_apiserver.open_watches() == 1)
    fake_apiserver.close_watches()
    assert list(events) == []
    assert wait_until(lambda: fake_apiserver.open_watches() == 0)


def test_stop_and_start_keep_the_port(fake_apiserver: FakeApiServer, watch: Any) -> None:
    _, events = watch(SERVICES, resourceVersion=fake_apiserver.resource_version)
    assert wait_until(lambda: fake_apiserver.open_watches() == 1)
    port = fake_apiserver.port
    fake_apiserver.stop()
    with pytest.raises((http.client.HTTPException, OSError)):
        list(events)
        get(fake_apiserver, SERVICES)
    with pytest.raises(ConnectionRefusedError):
        get(fake_apiserver, SERVICES)
    fake_apiserver.upsert(make_service_obj("default", "while-down"))
    fake_apiserver.start()
    assert fake_apiserver.port == port
    assert [i["metadata"]["name"] for i in get(fake_apiserver, SERVICES)[1]["items"]] == [
        "while-down"
    ]


def test_injected_failures(fake_apiserver: FakeApiServer) -> None:
    fake_apiserver.fail_next(2, code=503)
    assert get(fake_apiserver, SERVICES)[0] == 503
    assert get(fake_apiserver, "/version")[0] == 200  # discovery is never failed
    assert get(fake_apiserver, SERVICES)[0] == 503
    assert get(fake_apiserver, SERVICES)[0] == 200


def test_kubeconfig_works_with_the_real_client(
    fake_apiserver: FakeApiServer, tmp_path: Any
) -> None:
    from kubernetes import client, config

    fake_apiserver.upsert(make_service_obj("default", "web", clusterIP="10.96.0.10"))
    cfg = client.Configuration()
    load: Any = config.load_kube_config
    load(config_file=fake_apiserver.write_kubeconfig(f"{tmp_path}/kc"), client_configuration=cfg)
    with client.ApiClient(cfg) as api:
        services = client.CoreV1Api(api).list_service_for_all_namespaces()
        slices = client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces()
    assert [s.spec and s.spec.cluster_ip for s in services.items] == ["10.96.0.10"]
    assert slices.items == []


@pytest.mark.netns
def test_serves_inside_a_network_namespace() -> None:
    name = f"kpfake-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        server = FakeApiServer(token=None, netns=name)
        server.start()
        try:
            server.upsert(make_service_obj("default", "web"))
            code = (
                "import json,sys,urllib.request;"
                f"print(len(json.load(urllib.request.urlopen('{server.url}{SERVICES}'))['items']))"
            )
            out = subprocess.run(
                ["ip", "netns", "exec", name, "python3", "-c", code],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.stdout.strip() == "1"
            with pytest.raises(OSError):  # not on the host's loopback
                get(server, SERVICES)
        finally:
            server.stop()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
