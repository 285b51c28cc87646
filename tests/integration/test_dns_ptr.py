"""Reverse lookups (PTR) from two DNS worker processes, with a real client, after a full build
and after each of a sequence of incremental endpoint changes.

Every endpoint address and cluster IP ever used is asked after every step: present ones must
be answered by kproxy itself with the documented names (docs/dns.md: a cluster IP gives the
service name; an endpoint address its `<hostname>.<svc>.<ns>.svc.<zone>` for every service,
headless or not, that has a name for it), never forwarded; gone ones are reverse names kproxy
does not know, which go to the upstream (as CoreDNS's `fallthrough in-addr.arpa ip6.arpa`):
the stub upstream here says NXDOMAIN, as a real one does for private addresses.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from types import MappingProxyType

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import dnslib
import pytest

from kproxy.dns import DNSOptions, DNSService
from kproxy.model.objects import Endpoint, EndpointSlice, Ref, Service
from kproxy.model.store import Snapshot
from tests.integration.test_dns_server import free_port, loopback
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

ZONE = "cluster.local"
ASKS = 3  # each question several times from fresh source ports: both workers get some


class NxUpstream:
    """An upstream that answers NXDOMAIN to everything and remembers what it was asked."""

    def __init__(self) -> None:
        self.host = loopback()
        self.port = free_port(self.host)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.host, self.port))
        self.seen: set[str] = set()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            q = dnslib.DNSRecord.parse(data)
            self.seen.add(str(q.q.qname).lower())
            reply = q.reply()
            reply.header.rcode = 3
            reply.add_auth(
                dnslib.RR("arpa.", dnslib.QTYPE.SOA, rdata=dnslib.SOA("a.", "b.", (1, 1, 1, 1, 60)))
            )
            self.sock.sendto(reply.pack(), addr)


@pytest.fixture
def served() -> Iterator[tuple[DNSService, NxUpstream]]:
    upstream = NxUpstream()
    host = loopback()
    svc = DNSService(
        options=DNSOptions(
            listen=(f"{host}:{free_port(host)}",),
            create_interface=False,
            upstreams=(f"{upstream.host}:{upstream.port}",),
            workers=2,
            allow_cidrs=("127.0.0.0/8",),
        )
    )
    svc.start()
    yield svc, upstream
    svc.stop()
    upstream.sock.close()


def ep(address: str, hostname: str = "", ready: bool = True) -> Endpoint:
    return make_endpoint(address, hostname=hostname, ready=ready)


def v4(name: str, service: str, *endpoints: Endpoint) -> EndpointSlice:
    return make_slice("default", service, name=name, endpoints=endpoints)


def v6(name: str, service: str, *endpoints: Endpoint) -> EndpointSlice:
    return make_slice("default", service, name=name, endpoints=endpoints, address_type="IPv6")


def snapshot(services: list[Service], slices: list[EndpointSlice], generation: int) -> Snapshot:
    groups: dict[Ref, list[EndpointSlice]] = {}
    for sl in slices:
        groups.setdefault(sl.service_ref, []).append(sl)
    return Snapshot(
        services=MappingProxyType({s.ref: s for s in services}),
        slices=MappingProxyType({k: tuple(v) for k, v in groups.items()}),
        generation=generation,
    )


def expected_ptrs(services: list[Service], slices: list[EndpointSlice]) -> dict[str, set[str]]:
    """address -> PTR names, from the rules in docs/dns.md (independent of kproxy's index)."""
    cluster: dict[str, set[str]] = {}
    for s in services:
        for ip in s.cluster_ips:
            cluster.setdefault(ip, set()).add(f"{s.name}.{s.namespace}.svc.{ZONE}.")
    endpoints: dict[str, set[str]] = {}
    by_name = {s.name: s for s in services}
    for sl in slices:
        svc = by_name.get(sl.service_name)
        if svc is None:
            continue
        for e in sl.endpoints:
            if not (e.ready or svc.publish_not_ready):
                continue
            host = e.hostname or e.address.replace(".", "-").replace(":", "-")
            endpoints.setdefault(e.address, set()).add(f"{host}.{svc.name}.default.svc.{ZONE}.")
    return {**endpoints, **cluster}  # a cluster IP wins over an endpoint with its address


def ptr(svc: DNSService, address: str, *, upper: bool = False) -> dns.message.Message:
    rname = dns.reversename.from_address(address).to_text()
    q = dns.message.make_query(rname.upper() if upper else rname, "PTR")
    host, port = svc.addresses[0]
    return dns.query.udp(q, host, port=port, timeout=3)


WEB = make_service(
    "default", "web", cluster_ips=("10.96.1.1", "fd00:96::1"), ports=(make_port(80),)
)
API = make_service("default", "api", cluster_ips=("10.96.1.2",), ports=(make_port(80),))
API2 = make_service("default", "api2", cluster_ips=("10.96.1.3",), ports=(make_port(80),))
DB = make_service("default", "db", headless=True, cluster_ips=(), ports=(make_port(5432),))
PEERS = make_service("default", "peers", headless=True, cluster_ips=(), ports=(make_port(7000),))

STEPS: list[tuple[str, list[Service], list[EndpointSlice]]] = [
    (
        "full build",
        [WEB, API, DB, PEERS],
        [
            v4("web-a", "web", ep("10.1.1.1"), ep("10.1.1.2")),
            v4("web-b", "web", ep("10.1.2.1")),
            v6("web-6", "web", ep("fd00:1::1"), ep("fd00:1::2")),
            v4("api-a", "api", ep("10.3.0.1"), ep("10.3.0.2", ready=False)),
            v4("db-a", "db", ep("10.2.0.1", "db-0"), ep("10.2.0.2", "db-1")),
            v4("db-b", "db", ep("10.2.0.3", "db-2")),
            v6("db-6", "db", ep("fd00:2::1", "db-0"), ep("fd00:2::2")),
            v4("peers-a", "peers", ep("10.1.1.1", "p-0")),  # also a web endpoint
        ],
    ),
    (
        "remove and add in one slice",
        [WEB, API, DB, PEERS],
        [
            v4("web-a", "web", ep("10.1.1.1"), ep("10.1.1.3")),
            v4("web-b", "web", ep("10.1.2.1")),
            v6("web-6", "web", ep("fd00:1::1"), ep("fd00:1::2")),
            v4("api-a", "api", ep("10.3.0.1"), ep("10.3.0.2", ready=False)),
            v4("db-a", "db", ep("10.2.0.1", "db-0"), ep("10.2.0.2", "db-1")),
            v4("db-b", "db", ep("10.2.0.3", "db-2")),
            v6("db-6", "db", ep("fd00:2::1", "db-0"), ep("fd00:2::2")),
            v4("peers-a", "peers", ep("10.1.1.1", "p-0")),
        ],
    ),
    (
        "move between slices, IPv6 churn, a pod recreated",
        [WEB, API, DB, PEERS],
        [
            v4("web-a", "web", ep("10.1.1.1"), ep("10.1.1.3"), ep("10.1.2.1")),
            v4("web-b", "web"),
            v6("web-6", "web", ep("fd00:1::1"), ep("fd00:1::3")),
            v4("api-a", "api", ep("10.3.0.1"), ep("10.3.0.2", ready=False)),
            v4(
                "db-a", "db", ep("10.2.0.1", "db-0"), ep("10.2.0.2", "db-1"), ep("10.2.0.4", "db-2")
            ),
            v6("db-6", "db", ep("fd00:2::1", "db-0"), ep("fd00:2::3")),
            v4("peers-a", "peers", ep("10.1.1.1", "p-0"), ep("10.2.0.1", "p-1")),
        ],
    ),
    (
        "slices and a service deleted, readiness flips, a new service",
        [WEB, API2, DB, PEERS],
        [
            v4("web-a", "web", ep("10.1.1.1", ready=False), ep("10.1.1.3"), ep("10.1.2.1")),
            v6("web-6", "web", ep("fd00:1::1"), ep("fd00:1::3")),
            v4("api2-a", "api2", ep("10.3.0.1"), ep("10.3.0.2")),
            v4(
                "db-a", "db", ep("10.2.0.1", "db-0"), ep("10.2.0.2", "db-1"), ep("10.2.0.4", "db-2")
            ),
            v4("peers-a", "peers", ep("10.1.1.1", "p-0"), ep("10.2.0.1", "p-1")),
        ],
    ),
    (
        "a headless service deleted, removed addresses come back elsewhere",
        [WEB, API2, DB],
        [
            v4("web-a", "web", ep("10.1.1.1"), ep("10.1.1.3"), ep("10.1.2.1")),
            v4("web-c", "web", ep("10.1.1.2"), ep("10.2.0.3")),
            v6("web-6", "web", ep("fd00:1::1"), ep("fd00:1::3"), ep("fd00:2::2")),
            v4("api2-a", "api2", ep("10.3.0.1"), ep("10.3.0.2")),
            v4("db-a", "db", ep("10.2.0.1", "db-0"), ep("10.2.0.2", "db-1")),
            v6("db-6", "db", ep("fd00:2::1", "db-0")),
        ],
    ),
]

EVERY_ADDRESS = sorted(
    {ip for _, services, _ in STEPS for s in services for ip in s.cluster_ips}
    | {e.address for _, _, slices in STEPS for sl in slices for e in sl.endpoints},
    key=lambda a: (":" in a, ipaddress.ip_address(a).packed),
)


def test_ptr_for_every_endpoint_and_cluster_ip_through_incremental_changes(
    served: tuple[DNSService, NxUpstream],
) -> None:
    svc, upstream = served
    for generation, (step, services, slices) in enumerate(STEPS, start=1):
        if generation == 3:
            # one worker dies: its replacement builds from the full model while the other
            # goes on applying deltas; both must answer alike from here on
            killed = svc.worker_pids[0]
            os.kill(killed, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (svc.ready or len(set(svc.worker_pids)) < 2):
                time.sleep(0.05)
            deadline = time.monotonic() + 10
            while not svc.ready and time.monotonic() < deadline:
                time.sleep(0.05)
            assert svc.ready and killed not in svc.worker_pids, "the killed worker was not replaced"
        svc.update(snapshot(services, slices, generation))
        assert svc.flush(10), f"{step}: the workers did not take the change"
        want = expected_ptrs(services, slices)
        for address in EVERY_ADDRESS:
            rname = dns.reversename.from_address(address).to_text().lower()
            for ask in range(ASKS):
                upstream.seen.discard(rname)
                msg = ptr(svc, address, upper=ask == 0)  # names match case-insensitively
                got = {rd.to_text() for rrset in msg.answer for rd in rrset}
                if address in want:
                    assert (msg.rcode(), got) == (dns.rcode.NOERROR, want[address]), (
                        f"{step}: PTR {address}"
                    )
                    assert rname not in upstream.seen, f"{step}: PTR {address} was forwarded"
                else:
                    assert (msg.rcode(), got) == (dns.rcode.NXDOMAIN, set()), (
                        f"{step}: PTR {address} (gone) answered {got}"
                    )
                    assert rname in upstream.seen, f"{step}: PTR {address} was not forwarded"
    assert len(svc.worker_pids) == 2
    assert svc.ready
    deadline = time.monotonic() + 5  # workers report their counters every second
    while time.monotonic() < deadline and not all(w.stats.get("queries", 0) for w in svc._workers):
        time.sleep(0.1)
    assert all(w.stats.get("queries", 0) > 0 for w in svc._workers), "one worker got nothing"
