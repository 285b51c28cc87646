"""The agent's inspection socket: the snapshot/settings codec, the root-only unix socket server and
its client, /configz, and listeners that retry a taken port instead of failing."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import stat
import threading
import time
from pathlib import Path
from types import MappingProxyType

import pytest

from kproxy.config import Settings
from kproxy.inspect.wanted import NoAgent, fetch, from_agent, wanted_port
from kproxy.model.codec import decode, decode_snapshot, encode, encode_snapshot
from kproxy.model.objects import EndpointPort, NodeInfo
from kproxy.model.store import Snapshot
from kproxy.runtime.inspectsock import STATE_VERSION, InspectServer, configz, state_route
from kproxy.runtime.listeners import Listeners
from tests.support.builders import make_endpoint, make_port, make_service, make_slice


def snapshot() -> Snapshot:
    web = make_service(
        "default",
        "web",
        type="NodePort",
        cluster_ips=("10.96.0.80",),
        ports=(make_port(80, name="http", target="web", node_port=30080),),
        external_ips=("198.51.100.7",),
        affinity_timeout=10800,
    )
    empty = make_service("default", "empty", cluster_ips=("10.96.0.99",))
    slices = (
        make_slice(
            "default",
            "web",
            endpoints=[
                make_endpoint("10.244.1.11", node_name="node1"),
                make_endpoint("10.244.2.11", node_name="node2", ready=False, terminating=True),
            ],
            ports=(EndpointPort("http", "TCP", 8080),),
            trigger_time=1234.5,
        ),
    )
    return Snapshot(
        services=MappingProxyType({web.ref: web, empty.ref: empty}),
        slices=MappingProxyType({web.ref: slices}),
        node=NodeInfo("node1", zone="z1", addresses=("192.168.1.10",), labels=(("a", "b"),)),
        generation=7,
    )


def test_snapshot_round_trips_compactly() -> None:
    snap = snapshot()
    text = json.dumps(encode_snapshot(snap))
    data = json.loads(text)
    # one row per object, the field names once per class
    endpoint = data["slices"][0][data["schema"]["EndpointSlice"].index("endpoints")][0]
    assert endpoint[:6] == ["10.244.1.11", True, True, False, "", "node1"]
    back = decode_snapshot(data)
    assert dict(back.services) == dict(snap.services)
    assert dict(back.slices) == dict(snap.slices)
    assert back.node == snap.node and back.generation == 7


def test_a_snapshot_from_another_version_maps_fields_by_name() -> None:
    data = json.loads(json.dumps(encode_snapshot(snapshot())))
    names = data["schema"]["Service"]
    # the writer had one field more (unknown here) and lacked `affinity_timeout`
    cut = names.index("affinity_timeout")
    data["schema"]["Service"] = [*names[:cut], *names[cut + 1 :], "from_the_future"]
    data["services"] = [[*row[:cut], *row[cut + 1 :], 42] for row in data["services"]]
    back = decode_snapshot(data)
    web = next(s for s in back.services.values() if s.name == "web")
    assert web.affinity_timeout == 0 and web.cluster_ips == ("10.96.0.80",)
    assert web.ports == snapshot().services[web.ref].ports


def test_decode_ignores_unknown_fields_and_fills_defaults() -> None:
    svc = decode(type(make_service()), {"namespace": "a", "name": "b", "from_the_future": 1})
    assert (svc.namespace, svc.name, svc.cluster_ips, svc.ports) == ("a", "b", (), ())


def test_settings_round_trip() -> None:
    settings = Settings(
        manifests="/m",
        cluster_cidr=("10.244.0.0/16",),
        proxy_mode="ipvs",
        iptables_sync_period=3600.0,
        dns_listen=("169.254.20.10:53", "10.96.0.10:53"),
    )
    assert decode(Settings, json.loads(json.dumps(encode(settings)))) == settings


def test_configz_is_kube_proxys_shape() -> None:
    doc = configz(Settings(cluster_cidr=("10.244.0.0/16",), iptables_sync_period=90.0))
    cfg = doc["kubeproxy.config.k8s.io"]
    assert isinstance(cfg, dict)
    assert cfg["kind"] == "KubeProxyConfiguration" and cfg["mode"] == "iptables"
    assert cfg["clusterCIDR"] == ["10.244.0.0/16"]
    assert cfg["iptables"]["syncPeriod"] == "1m30s"
    assert cfg["iptables"]["minSyncPeriod"] == "1s"
    assert cfg["metricsBindAddress"] == "127.0.0.1:10249"


def serve(tmp_path: Path, settings: Settings) -> InspectServer:
    server = InspectServer(
        tmp_path / "run" / "kproxy.sock",
        state_route(
            settings=settings,
            node_name="node1",
            planes=list,
            wanted=lambda: (snapshot(), 12.5),
            unbound=lambda: {"metrics 127.0.0.1:10249": "address already in use"},
        ),
    )
    server.start()
    return server


def no_flags() -> argparse.Namespace:
    from kproxy.cli import _parser

    args: argparse.Namespace = _parser().parse_args(["status"])
    return args


def test_the_socket_serves_the_wanted_state_to_root_only(tmp_path: Path) -> None:
    settings = Settings(manifests="/m", cluster_cidr=("10.244.0.0/16",), masquerade_bit=9)
    server = serve(tmp_path, settings)
    try:
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700
        doc = fetch(server.path)
        assert doc["version"] == STATE_VERSION and doc["node_name"] == "node1"
        assert doc["unbound"] == {"metrics 127.0.0.1:10249": "address already in use"}
        wanted = from_agent(no_flags(), path=server.path)
        assert wanted.settings == settings
        assert wanted.snapshot is not None
        assert dict(wanted.snapshot.services) == dict(snapshot().services)
        assert wanted.origin == f"the running agent ({server.path})"
        # a flag given on the command line overrides the agent's setting
        args = no_flags()
        args.masquerade_bit = 3
        assert from_agent(args, path=server.path).settings.masquerade_bit == 3
        # a second agent on the same path is refused, the first keeps serving
        other = InspectServer(server.path, {})
        with pytest.raises(OSError) as err:
            other.start()
        assert err.value.errno == errno.EADDRINUSE
        assert fetch(server.path)["pid"] == os.getpid()
    finally:
        server.stop()
    assert not server.path.exists()
    with pytest.raises(NoAgent, match="no running kproxy agent found"):
        fetch(server.path)


def test_a_socket_left_by_a_killed_agent_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "kproxy.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    with pytest.raises(NoAgent, match="left from a stopped one"):
        fetch(path)
    server = InspectServer(path, {"/v1/state": lambda: {"version": STATE_VERSION}})
    server.start()
    try:
        assert fetch(path) == {"version": STATE_VERSION}
    finally:
        server.stop()


def test_wanted_port_finds_the_owner_and_its_endpoints() -> None:
    snap = snapshot()
    found = wanted_port(
        snap, node_name="node1", ip="10.96.0.80", port=80, protocol="tcp", node_addresses=set()
    )
    assert found is not None and found.service == "default/web:http"
    assert found.kind == "cluster IP" and found.endpoints == ("10.244.1.11:8080",)
    nodeport = wanted_port(
        snap,
        node_name="node1",
        ip="192.168.1.10",
        port=30080,
        protocol="tcp",
        node_addresses={"192.168.1.10"},
    )
    assert nodeport is not None and nodeport.kind == "nodePort"
    assert (
        wanted_port(
            snap, node_name="node1", ip="10.96.0.80", port=81, protocol="tcp", node_addresses=set()
        )
        is None
    )


def test_a_taken_port_is_logged_once_and_bound_when_freed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    bound: list[socket.socket] = []

    def open_() -> None:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            raise
        bound.append(s)

    stop = threading.Event()
    listeners = Listeners(stop)
    caplog.set_level(logging.DEBUG, logger="kproxy")
    try:
        assert not listeners.start("metrics", f"127.0.0.1:{port}", open_, hint="kube-proxy?")
        assert listeners.unbound() == {f"metrics 127.0.0.1:{port}": "address already in use"}
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and not errors[0].exc_info
        assert errors[0].getMessage() == (
            f"cannot listen on 127.0.0.1:{port} for metrics: address already in use "
            "(kube-proxy?); proxying continues, retrying in the background"
        )
        holder.close()
        deadline = time.monotonic() + 10
        while listeners.unbound() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listeners.unbound() == {} and len(bound) == 1
        assert any("now listening on" in r.getMessage() for r in caplog.records)
    finally:
        stop.set()
        holder.close()
        for s in bound:
            s.close()
