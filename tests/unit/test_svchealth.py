"""healthCheckNodePort servers (kproxy.runtime.svchealth), over real sockets on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import logging
import socket
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from kproxy.model.objects import EndpointPort, Ref, Service
from kproxy.model.store import Snapshot
from kproxy.model.view import ServicePortView, build_views
from kproxy.runtime.svchealth import ServiceHealthServer
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

NODE = "n1"
Views = Mapping[Ref, Sequence[ServicePortView]]


class Flag:
    """The proxier health the daemon would pass in, switchable by the test."""

    def __init__(self) -> None:
        self.healthy = True

    def __call__(self) -> bool:
        return self.healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lb_service(name: str, hc_port: int, **overrides: Any) -> Service:
    fields: dict[str, Any] = {
        "type": "LoadBalancer",
        "cluster_ips": ("172.30.0.41",),
        "ports": (make_port(80, name="http", node_port=30080),),
        "external_policy_local": True,
        "health_check_node_port": hc_port,
    }
    fields.update(overrides)
    return make_service("ns1", name, **fields)


def views(*services: tuple[Service, Sequence[dict[str, Any]]], family: int = 4) -> Views:
    """Views of services, each with endpoints given as make_endpoint kwargs (node n1 = local)."""
    ports = [EndpointPort("http", "TCP", 8080), EndpointPort("metrics", "TCP", 9100)]
    snap = Snapshot(
        services={svc.ref: svc for svc, _ in services},
        slices={
            svc.ref: (
                make_slice(
                    svc.namespace,
                    svc.name,
                    endpoints=[make_endpoint(**e) for e in eps],
                    ports=ports,
                    address_type="IPv6" if family == 6 else "IPv4",
                ),
            )
            for svc, eps in services
        },
    )
    return build_views(snap, family=family, node_name=NODE)


def local(ip: str, **conditions: Any) -> dict[str, Any]:
    return {"address": ip, "node_name": NODE, **conditions}


def remote(ip: str) -> dict[str, Any]:
    return {"address": ip, "node_name": "n2"}


def get(port: int, path: str = "/") -> tuple[int, dict[str, Any], http.client.HTTPResponse, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        text = resp.read().decode()
        return resp.status, json.loads(text), resp, text
    finally:
        conn.close()


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def flag() -> Flag:
    return Flag()


@pytest.fixture
def server(flag: Flag) -> Iterator[ServiceHealthServer]:
    srv = ServiceHealthServer(bind_ip="127.0.0.1", proxy_healthy=flag)
    yield srv
    srv.stop()


def test_status_flips_as_local_endpoints_come_and_go(server: ServiceHealthServer) -> None:
    port = free_port()
    svc = lb_service("web", port)

    server.sync(views((svc, [local("10.244.1.11")])))
    status, body, resp, text = get(port)
    assert status == 200
    assert body == {
        "service": {"namespace": "ns1", "name": "web"},
        "localEndpoints": 1,
        "serviceProxyHealthy": True,
    }
    assert resp.getheader("Content-Type") == "application/json"
    assert resp.getheader("X-Content-Type-Options") == "nosniff"
    assert text.startswith('{\n\t"service": {\n\t\t"namespace": "ns1",'), "kube-proxy's layout"

    server.sync(views((svc, [remote("10.244.2.11")])))
    status, body, _, _ = get(port, "/any/path?x=1")
    assert (status, body["localEndpoints"]) == (503, 0)

    server.sync(views((svc, [local("10.244.1.11"), local("10.244.1.12"), remote("10.244.2.11")])))
    status, body, _, _ = get(port, "/healthz")
    assert (status, body["localEndpoints"]) == (200, 2)


def test_unhealthy_proxy_fails_every_check(server: ServiceHealthServer, flag: Flag) -> None:
    port = free_port()
    server.sync(views((lb_service("web", port), [local("10.244.1.11")])))
    flag.healthy = False
    status, body, _, _ = get(port)
    assert status == 503
    assert body["serviceProxyHealthy"] is False
    assert body["localEndpoints"] == 1
    flag.healthy = True
    assert get(port)[0] == 200


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        pytest.param(local("10.244.1.11"), 1, id="ready"),
        pytest.param(
            local("10.244.1.11", ready=False, serving=True, terminating=True), 0, id="terminating"
        ),
        pytest.param(local("10.244.1.11", ready=False, serving=False), 0, id="not-ready"),
    ],
)
def test_only_ready_local_endpoints_count(
    server: ServiceHealthServer, endpoint: dict[str, Any], expected: int
) -> None:
    """A node left with terminating endpoints must fail, so the load balancer drains it."""
    port = free_port()
    server.sync(views((lb_service("web", port), [endpoint])))
    status, body, _, _ = get(port)
    assert body["localEndpoints"] == expected
    assert status == (200 if expected else 503)


def test_endpoints_count_once_per_address_across_ports_and_families(
    server: ServiceHealthServer,
) -> None:
    port = free_port()
    svc = lb_service(
        "web",
        port,
        cluster_ips=("172.30.0.41", "fd00:96::41"),
        ports=(make_port(80, name="http", node_port=30080), make_port(9100, name="metrics")),
    )
    v4 = views((svc, [local("10.244.1.11")]))
    v6 = views((svc, [local("fd00:10:244:1::11"), local("fd00:10:244:1::12")]), family=6)
    server.sync(v4, v6)
    assert get(port)[1]["localEndpoints"] == 3


def test_services_without_a_local_health_check_get_no_port(server: ServiceHealthServer) -> None:
    cluster_policy, no_hc, local_hc = free_port(), free_port(), free_port()
    server.sync(
        {
            **views((lb_service("cluster", cluster_policy, external_policy_local=False), [])),
            **views((lb_service("nohc", no_hc, health_check_node_port=0), [])),
            **views((lb_service("local", local_hc), [])),
        }
    )
    assert server.ports == {Ref("ns1", "local"): local_hc}
    assert refused(cluster_policy)
    assert get(local_hc)[0] == 503


def test_removed_services_close_their_port(server: ServiceHealthServer) -> None:
    a_port, b_port = free_port(), free_port()
    a, b = lb_service("a", a_port), lb_service("b", b_port)
    server.sync({**views((a, [local("10.244.1.11")])), **views((b, [local("10.244.1.12")]))})
    assert get(a_port)[0] == get(b_port)[0] == 200

    server.sync(views((b, [local("10.244.1.12")])))
    assert refused(a_port)
    assert get(b_port)[0] == 200

    server.sync({})
    assert refused(b_port)
    assert server.ports == {}


def test_partial_updates_touch_only_their_services(server: ServiceHealthServer) -> None:
    a_port, b_port = free_port(), free_port()
    a, b = lb_service("a", a_port), lb_service("b", b_port)
    server.sync({**views((a, [local("10.244.1.11")])), **views((b, [local("10.244.1.12")]))})

    server.update(views((a, [])))  # a lost its endpoints; b not mentioned
    assert get(a_port)[0] == 503
    assert get(b_port)[0] == 200

    gone = build_views(Snapshot(services={}, slices={}), family=4, node_name=NODE, refs=[b.ref])
    server.update(gone)  # b deleted
    assert refused(b_port)
    assert server.ports == {a.ref: a_port}


def test_a_changed_port_moves_the_listener(server: ServiceHealthServer) -> None:
    old, new = free_port(), free_port()
    server.sync(views((lb_service("web", old), [local("10.244.1.11")])))
    server.sync(views((lb_service("web", new), [local("10.244.1.11")])))
    assert refused(old)
    assert get(new)[0] == 200


def test_a_busy_port_is_logged_not_fatal_and_retried(
    server: ServiceHealthServer, caplog: pytest.LogCaptureFixture
) -> None:
    busy, fine = free_port(), free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", busy))
    squatter.listen(1)
    a, b = lb_service("a", busy), lb_service("b", fine)
    both = {**views((a, [local("10.244.1.11")])), **views((b, [local("10.244.1.12")]))}
    with caplog.at_level(logging.ERROR, logger="kproxy.svchealth"):
        server.sync(both)
    assert any(str(busy) in r.getMessage() for r in caplog.records)
    assert server.ports == {b.ref: fine}
    assert get(fine)[0] == 200

    squatter.close()
    server.sync(both)
    assert get(busy)[0] == 200


def test_stop_closes_everything(flag: Flag) -> None:
    port = free_port()
    srv = ServiceHealthServer(bind_ip="127.0.0.1", proxy_healthy=flag)
    srv.sync(views((lb_service("web", port), [local("10.244.1.11")])))
    assert get(port)[0] == 200
    srv.stop()
    assert refused(port)
