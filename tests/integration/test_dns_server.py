"""kproxy's DNS server with real clients (dnspython, dig) over UDP and TCP on loopback.

Each test gets its own 127.x.y.z address and high port; the serving engine runs in a worker
process as in production (a few tests also run it in-process). A stub upstream (dnslib on
another loopback address) stands in for the node's resolvers.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dnslib
import pytest

from kproxy.dns import DNSOptions, DNSService
from kproxy.model.objects import EndpointPort, EndpointSlice, Ref, Service
from kproxy.model.store import Snapshot
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

HEADLESS_SIZE = 200
DIG = "dig"


def loopback() -> str:
    return f"127.{random.randrange(10, 250)}.{random.randrange(0, 255)}.{random.randrange(1, 254)}"


def free_port(host: str) -> int:
    for _ in range(50):
        port = random.randrange(20000, 60000)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((host, port))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                t.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def cluster(*extra: Service, extra_slices: tuple[EndpointSlice, ...] = ()) -> Snapshot:
    services = [
        make_service(
            "default",
            "web",
            cluster_ips=("10.96.0.5", "fd00::5"),
            ports=(make_port(80, name="http"),),
        ),
        make_service(
            "default", "db", headless=True, cluster_ips=(), ports=(make_port(5432, name="pg"),)
        ),
        make_service("default", "big", headless=True, cluster_ips=()),
        make_service(
            "default",
            "ext",
            type="ExternalName",
            cluster_ips=(),
            external_name="outside.example.org",
        ),
        *extra,
    ]
    slices = [
        make_slice(
            "default",
            "db",
            endpoints=[make_endpoint(f"10.1.0.{i + 1}", hostname=f"db-{i}") for i in range(3)],
            ports=[EndpointPort("pg", "TCP", 5432)],
        ),
        make_slice(
            "default",
            "big",
            endpoints=[
                make_endpoint(f"10.2.{i // 250}.{i % 250 + 1}") for i in range(HEADLESS_SIZE)
            ],
        ),
        *extra_slices,
    ]
    groups: dict[Ref, list[EndpointSlice]] = {}
    for sl in slices:
        groups.setdefault(sl.service_ref, []).append(sl)
    return Snapshot(
        services=MappingProxyType({s.ref: s for s in services}),
        slices=MappingProxyType({k: tuple(v) for k, v in groups.items()}),
        generation=1,
    )


class StubUpstream:
    """A tiny upstream: A 192.0.2.1 for every name, NXDOMAIN for nx.*, 100 A records for big.*."""

    def __init__(self, port: int | None = None) -> None:
        self.host = loopback()
        self.port = port or free_port(self.host)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((self.host, self.port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((self.host, self.port))
        self.tcp.listen(16)
        self.seen: list[tuple[str, str]] = []  # (transport, qname)
        self._stop = False
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def answer(self, data: bytes, transport: str) -> bytes:
        q = dnslib.DNSRecord.parse(data)
        name = str(q.q.qname).rstrip(".")
        self.seen.append((transport, name.lower()))
        reply = q.reply()
        if name.startswith("nx."):
            reply.header.rcode = 3
        elif name.startswith("big."):
            for i in range(100):
                reply.add_answer(
                    dnslib.RR(q.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(f"192.0.2.{i}"), ttl=30)
                )
        elif q.q.qtype == dnslib.QTYPE.A:
            reply.add_answer(
                dnslib.RR(q.q.qname, dnslib.QTYPE.A, rdata=dnslib.A("192.0.2.1"), ttl=30)
            )
        raw = reply.pack()
        if transport == "udp" and len(raw) > 512:
            reply = q.reply()
            reply.header.tc = 1
            raw = reply.pack()
        return raw

    def _serve_udp(self) -> None:
        while not self._stop:
            try:
                data, addr = self.udp.recvfrom(4096)
                self.udp.sendto(self.answer(data, "udp"), addr)
            except OSError:
                return

    def _serve_tcp(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                try:
                    (n,) = struct.unpack("!H", conn.recv(2))
                    resp = self.answer(conn.recv(n), "tcp")
                    conn.sendall(struct.pack("!H", len(resp)) + resp)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.udp.close()
        self.tcp.close()


@pytest.fixture
def upstream() -> Iterator[StubUpstream]:
    stub = StubUpstream()
    yield stub
    stub.close()


Start = Callable[..., DNSService]


@pytest.fixture
def start_dns() -> Iterator[Start]:
    services: list[DNSService] = []

    def start(snapshot: Snapshot | None = None, **overrides: object) -> DNSService:
        host = loopback()
        fields: dict[str, object] = {
            "listen": (f"{host}:{free_port(host)}",),
            "create_interface": False,
            "upstreams": (),
            "workers": 1,
            "allow_cidrs": ("127.0.0.0/8",),
        }
        fields.update(overrides)
        svc = DNSService(options=DNSOptions(**fields))  # type: ignore[arg-type]
        svc.start()
        services.append(svc)
        svc.update(snapshot or cluster())
        assert svc.flush(10), "DNS did not take the snapshot"
        return svc

    yield start
    for svc in services:
        svc.stop()


def udp(
    svc: DNSService, name: str, qtype: str = "A", *, edns: bool = True, source: str | None = None
) -> dns.message.Message:
    q = dns.message.make_query(name, qtype, use_edns=0 if edns else False)
    host, port = target(svc)
    return dns.query.udp(q, host, port=port, timeout=3, source=source, ignore_trailing=False)


def tcp(svc: DNSService, name: str, qtype: str = "A") -> dns.message.Message:
    q = dns.message.make_query(name, qtype)
    host, port = target(svc)
    return dns.query.tcp(q, host, port=port, timeout=3)


def target(svc: DNSService) -> tuple[str, int]:
    return svc.addresses[0]


def dig(svc: DNSService, *args: str) -> str:
    host, port = target(svc)
    out = subprocess.run(
        [DIG, f"@{host}", "-p", str(port), "+time=2", "+tries=1", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout


def rdata(msg: dns.message.Message, rdtype: int | None = None) -> list[str]:
    return sorted(
        rd.to_text()
        for rrset in msg.answer
        if rdtype is None or rrset.rdtype == rdtype
        for rd in rrset
    )


RECORDS = [
    ("web.default.svc.cluster.local", "A", ["10.96.0.5"]),
    ("web.default.svc.cluster.local", "AAAA", ["fd00::5"]),
    ("db.default.svc.cluster.local", "A", ["10.1.0.1", "10.1.0.2", "10.1.0.3"]),
    ("db-1.db.default.svc.cluster.local", "A", ["10.1.0.2"]),
    (
        "_http._tcp.web.default.svc.cluster.local",
        "SRV",
        ["0 100 80 web.default.svc.cluster.local."],
    ),
    (
        "_pg._tcp.db.default.svc.cluster.local",
        "SRV",
        [f"0 33 5432 db-{i}.db.default.svc.cluster.local." for i in range(3)],
    ),
    ("5.0.96.10.in-addr.arpa", "PTR", ["web.default.svc.cluster.local."]),
    ("5." + "0." * 29 + "d.f.ip6.arpa", "PTR", ["web.default.svc.cluster.local."]),
    ("2.0.1.10.in-addr.arpa", "PTR", ["db-1.db.default.svc.cluster.local."]),
    ("ext.default.svc.cluster.local", "CNAME", ["outside.example.org."]),
    ("10-244-1-7.default.pod.cluster.local", "A", ["10.244.1.7"]),
    ("dns-version.cluster.local", "TXT", ['"1.1.0"']),
    ("cluster.local", "NS", ["ns.dns.cluster.local."]),
]


@pytest.mark.parametrize(
    ("name", "qtype", "expect"), RECORDS, ids=[f"{n}/{t}" for n, t, _ in RECORDS]
)
def test_every_record_kind_over_udp_and_tcp(
    start_dns: Start, name: str, qtype: str, expect: list[str]
) -> None:
    svc = start_dns()
    rdtype = dns.rdatatype.from_text(qtype)
    for msg in (udp(svc, name, qtype), udp(svc, name, qtype, edns=False), tcp(svc, name, qtype)):
        assert msg.rcode() == dns.rcode.NOERROR
        assert msg.flags & dns.flags.AA
        assert rdata(msg, rdtype) == expect


def test_soa_at_the_apex_and_glue_for_ns(start_dns: Start) -> None:
    svc = start_dns()
    soa = udp(svc, "cluster.local", "SOA")
    assert soa.answer[0][0].mname.to_text() == "ns.dns.cluster.local."
    ns = udp(svc, "cluster.local", "NS")
    assert [rd.to_text() for rrset in ns.additional for rd in rrset if rrset.rdtype == 1] == [
        target(svc)[0]
    ]


def test_dig_over_udp_and_tcp(start_dns: Start) -> None:
    svc = start_dns()
    assert dig(svc, "web.default.svc.cluster.local", "+short").split() == ["10.96.0.5"]
    assert dig(svc, "web.default.svc.cluster.local", "+tcp", "+short").split() == ["10.96.0.5"]
    srv = dig(svc, "_pg._tcp.db.default.svc.cluster.local", "SRV", "+short").splitlines()
    assert len(srv) == 3


def test_nxdomain_versus_nodata(start_dns: Start) -> None:
    svc = start_dns()
    nx = udp(svc, "missing.default.svc.cluster.local")
    assert nx.rcode() == dns.rcode.NXDOMAIN and not nx.answer
    assert nx.authority[0].rdtype == dns.rdatatype.SOA
    assert nx.authority[0].ttl == 5
    for name, qtype in [
        ("web.default.svc.cluster.local", "MX"),
        ("default.svc.cluster.local", "A"),
    ]:
        nodata = udp(svc, name, qtype)
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
        assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    out = dig(svc, "missing.default.svc.cluster.local")
    assert "status: NXDOMAIN" in out and "SOA" in out
    out = dig(svc, "web.default.svc.cluster.local", "MX")
    assert "status: NOERROR" in out and "ANSWER: 0" in out


def test_question_case_is_echoed(start_dns: Start) -> None:
    svc = start_dns()
    out = dig(svc, "WeB.DeFaUlT.svc.cluster.local", "+noall", "+answer")
    assert out.split()[0] == "WeB.DeFaUlT.svc.cluster.local."
    tcp_out = dig(svc, "WeB.DeFaUlT.svc.cluster.local", "+tcp", "+noall", "+answer")
    assert tcp_out.split()[0] == "WeB.DeFaUlT.svc.cluster.local."


def test_headless_service_with_200_endpoints(start_dns: Start) -> None:
    svc = start_dns()
    name = "big.default.svc.cluster.local"
    host, port = target(svc)
    # UDP without EDNS: truncated to whole records within 512 bytes, TC set
    q = dns.message.make_query(name, "A", use_edns=False)
    raw = _udp_raw(q.to_wire(), host, port)
    msg = dns.message.from_wire(raw)
    assert len(raw) <= 512 and msg.flags & dns.flags.TC
    assert 0 < len(msg.answer[0]) < HEADLESS_SIZE
    out = dig(svc, name, "+noedns", "+ignore")
    assert " tc " in out.split("flags:")[1].split(";")[0] + " "
    # TCP: complete
    full = tcp(svc, name)
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == HEADLESS_SIZE
    assert len(dig(svc, name, "+tcp", "+short").split()) == HEADLESS_SIZE
    # dig retries over TCP by itself after TC
    assert len(dig(svc, name, "+noedns", "+short").split()) == HEADLESS_SIZE


def _udp_raw(data: bytes, host: str, port: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(data, (host, port))
        return s.recv(65535)


def test_forwarding_to_the_upstream_with_cache_and_tcp_retry(
    start_dns: Start, upstream: StubUpstream
) -> None:
    svc = start_dns(upstreams=(upstream.address,))
    first = udp(svc, "www.example.org")
    assert rdata(first) == ["192.0.2.1"] and not first.flags & dns.flags.AA
    again = udp(svc, "WWW.example.org")
    assert rdata(again) == ["192.0.2.1"]
    assert upstream.seen.count(("udp", "www.example.org")) == 1  # the second came from the cache
    assert udp(svc, "nx.example.org").rcode() == dns.rcode.NXDOMAIN
    # the upstream truncates: kproxy retries over TCP and serves the full answer over TCP
    big = tcp(svc, "big.example.org")
    assert len(big.answer[0]) == 100
    assert ("tcp", "big.example.org") in upstream.seen
    small = udp(svc, "big.example.org", edns=False)
    assert small.flags & dns.flags.TC


def test_external_name_follows_the_cname_through_the_upstream(
    start_dns: Start, upstream: StubUpstream
) -> None:
    svc = start_dns(upstreams=(upstream.address,))
    msg = udp(svc, "ext.default.svc.cluster.local")
    kinds = [rrset.rdtype for rrset in msg.answer]
    assert kinds == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert rdata(msg, dns.rdatatype.A) == ["192.0.2.1"]


def test_recursion_only_for_allowed_clients(start_dns: Start, upstream: StubUpstream) -> None:
    allowed = loopback()
    svc = start_dns(upstreams=(upstream.address,), allow_cidrs=(f"{allowed}/32",))
    assert rdata(udp(svc, "www.example.org", source=allowed)) == ["192.0.2.1"]
    other = loopback()
    refused = udp(svc, "www.example.org", source=other)
    assert refused.rcode() == dns.rcode.REFUSED
    # cluster names are answered for everyone
    assert rdata(udp(svc, "web.default.svc.cluster.local", source=other)) == ["10.96.0.5"]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="binds port 53")


@needs_root
def test_loop_protection_skips_our_own_address_in_resolv_conf(
    start_dns: Start, tmp_path: Path
) -> None:
    stub = StubUpstream(port=53)
    try:
        host = loopback()
        conf = tmp_path / "resolv.conf"
        # the node's resolv.conf names kproxy itself first (as after pointing the node at it)
        conf.write_text(f"nameserver {host}\nnameserver {stub.host}\n")
        svc = start_dns(listen=(f"{host}:53",), upstreams=None, resolv_conf=str(conf))
        t0 = time.monotonic()
        assert rdata(udp(svc, "www.example.org")) == ["192.0.2.1"]
        assert time.monotonic() - t0 < 1.0
        assert stub.seen == [("udp", "www.example.org")]
        assert svc.stats().get("upstream_errors", 0) == 0
    finally:
        stub.close()


def test_update_propagates_within_a_second(start_dns: Start) -> None:
    svc = start_dns()
    assert rdata(udp(svc, "web.default.svc.cluster.local")) == ["10.96.0.5"]
    moved = make_service(
        "default", "web", cluster_ips=("10.96.0.99",), ports=(make_port(80, name="http"),)
    )
    snap = cluster()
    services = dict(snap.services)
    services[moved.ref] = moved
    new = replace(snap, services=MappingProxyType(services), generation=2)
    t0 = time.monotonic()
    svc.update(new)
    while True:
        got = rdata(udp(svc, "web.default.svc.cluster.local"))
        if got == ["10.96.0.99"]:
            break
        assert time.monotonic() - t0 < 1.0, "update did not reach DNS within 1 s"
        time.sleep(0.01)
    assert time.monotonic() - t0 < 1.0


def test_random_bytes_leave_the_server_answering(start_dns: Start) -> None:
    svc = start_dns()
    pids = svc.worker_pids
    host, port = target(svc)
    rnd = random.Random(4)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(2000):
            n = rnd.randrange(0, 300)
            junk = bytes(rnd.randrange(256) for _ in range(n))
            if i % 3 == 0 and n > 12:
                # a plausible header with a random body reaches the deeper parsers
                junk = struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, rnd.randrange(3)) + junk[12:]
            s.sendto(junk, (host, port))
    with socket.create_connection((host, port), timeout=3) as c:
        c.sendall(b"\x00\x05hello")  # garbage over TCP: FORMERR or a closed connection
        c.settimeout(1)
        with contextlib.suppress(OSError):
            c.recv(100)
    time.sleep(0.2)
    assert rdata(udp(svc, "web.default.svc.cluster.local")) == ["10.96.0.5"]
    assert rdata(tcp(svc, "web.default.svc.cluster.local")) == ["10.96.0.5"]
    assert svc.worker_pids == pids  # no crash, no restart


def test_a_killed_worker_is_restarted_with_the_model(start_dns: Start) -> None:
    svc = start_dns()
    (pid,) = svc.worker_pids
    os.kill(pid, signal.SIGKILL)
    # Queries sent meanwhile wait in the socket for the replacement, which serves only once
    # its index is complete: late right answers, never a SERVFAIL. (A query the dying worker
    # had already read is lost, as with any crash: the client retries, as resolvers do.)
    q = dns.message.make_query("web.default.svc.cluster.local", "A")
    host, port = target(svc)
    deadline = time.monotonic() + 10
    while True:
        try:
            msg = dns.query.udp(q, host, port=port, timeout=1)
            break
        except dns.exception.Timeout:
            assert time.monotonic() < deadline, "no answer after the worker was killed"
    assert msg.rcode() == dns.rcode.NOERROR and rdata(msg) == ["10.96.0.5"]
    assert svc.worker_pids and svc.worker_pids[0] != pid
    deadline = time.monotonic() + 5
    while not svc.ready and time.monotonic() < deadline:
        time.sleep(0.02)
    assert svc.ready


def test_several_workers_and_in_process_mode_answer_alike(start_dns: Start) -> None:
    many = start_dns(workers=2)
    inproc = start_dns(workers=0)
    assert len(many.worker_pids) == 2
    for svc in (many, inproc):
        assert svc.ready
        for _ in range(20):
            assert rdata(udp(svc, "db.default.svc.cluster.local")) == [
                "10.1.0.1",
                "10.1.0.2",
                "10.1.0.3",
            ]
        deadline = time.monotonic() + 5  # workers report their counters every second
        while svc.stats().get("queries", 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert svc.stats()["queries"] >= 20


def test_servfail_until_the_model_is_synced(start_dns: Start) -> None:
    svc = start_dns(replace(cluster(), synced=False))
    assert not svc.ready
    for msg in (
        udp(svc, "web.default.svc.cluster.local"),
        tcp(svc, "nope.default.svc.cluster.local"),
    ):
        assert msg.rcode() == dns.rcode.SERVFAIL
        # like CoreDNS before its first sync: authoritative, with the zone SOA
        assert msg.flags & dns.flags.AA and not msg.answer
        assert [r.rdtype for r in msg.authority] == [dns.rdatatype.SOA]
        assert msg.authority[0].name.to_text() == "cluster.local."
    out = dig(svc, "web.default.svc.cluster.local")
    assert "status: SERVFAIL" in out and "AUTHORITY: 1" in out
    svc.update(cluster())
    assert svc.flush(5) and svc.ready
    assert rdata(udp(svc, "web.default.svc.cluster.local")) == ["10.96.0.5"]


@needs_root
def test_listen_on_the_dns_service_ip_too(start_dns: Start) -> None:
    extra = loopback()
    svc = start_dns(service_ip=extra)
    # the service IP is served on port 53: the same answers there
    assert (extra, 53) in svc.addresses
    q = dns.message.make_query("web.default.svc.cluster.local", "A")
    msg = dns.query.udp(q, extra, port=53, timeout=3)
    assert rdata(msg) == ["10.96.0.5"]


# -- CoreDNS's own test cases (plugin/kubernetes/handler_test.go), asked with real clients ---------


def coredns_objects() -> Snapshot:
    """The objects CoreDNS's handler tests use, as far as these cases need them."""
    services = [
        make_service(
            "testns", "svc1", cluster_ips=("10.0.0.1",), ports=(make_port(80, name="http"),)
        ),
        make_service(
            "testns", "svc6", cluster_ips=("1234:abcd::1",), ports=(make_port(80, name="http"),)
        ),
        make_service(
            "testns",
            "svc-dual-stack",
            cluster_ips=("10.0.0.3", "10::3"),
            ports=(make_port(80, name="http"),),
        ),
        make_service(
            "testns",
            "svc-two-ports",
            cluster_ips=("10.0.0.4",),
            ports=(make_port(80, name="http"), make_port(443, name="https")),
        ),
        make_service("testns", "svc-no-ports", cluster_ips=("10.0.0.5",), ports=()),
        make_service(
            "testns", "hdls1", headless=True, cluster_ips=(), ports=(make_port(80, name="http"),)
        ),
    ]
    slices = [
        make_slice(
            "testns",
            "hdls1",
            endpoints=[
                make_endpoint("172.0.0.2"),
                make_endpoint("172.0.0.3"),
                make_endpoint("172.0.0.4", hostname="dup-name"),
            ],
            ports=[EndpointPort("http", "TCP", 80)],
        )
    ]
    return Snapshot(
        services=MappingProxyType({s.ref: s for s in services}),
        slices=MappingProxyType({slices[0].service_ref: tuple(slices)}),
        generation=1,
    )


T = ".testns.svc.cluster.local."
BARE_SRV = [
    ("svc1", ["0 100 80 svc1" + T], ["10.0.0.1"]),
    ("svc6", ["0 100 80 svc6" + T], ["1234:abcd::1"]),
    ("svc-dual-stack", ["0 50 80 svc-dual-stack" + T], ["10.0.0.3", "10::3"]),
    ("svc-two-ports", ["0 50 443 svc-two-ports" + T, "0 50 80 svc-two-ports" + T], ["10.0.0.4"]),
    (
        "hdls1",
        [
            "0 33 80 172-0-0-2.hdls1" + T,
            "0 33 80 172-0-0-3.hdls1" + T,
            "0 33 80 dup-name.hdls1" + T,
        ],
        ["172.0.0.2", "172.0.0.3", "172.0.0.4"],
    ),
]


@pytest.mark.parametrize(("service", "srv", "glue"), BARE_SRV, ids=[c[0] for c in BARE_SRV])
def test_srv_at_the_bare_service_name_like_coredns(
    start_dns: Start, service: str, srv: list[str], glue: list[str]
) -> None:
    svc = start_dns(coredns_objects())
    name = service + T
    for msg in (udp(svc, name, "SRV"), udp(svc, name, "SRV", edns=False), tcp(svc, name, "SRV")):
        assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
        assert rdata(msg, dns.rdatatype.SRV) == srv
        assert all(r.ttl == 5 for r in msg.answer)
        assert sorted(rd.to_text() for r in msg.additional for rd in r) == sorted(glue)
    out = dig(svc, name, "SRV", "+noall", "+answer", "+additional")
    lines = [line.split() for line in out.splitlines() if line and not line.startswith(";")]
    assert sorted(" ".join(f[4:]) for f in lines if f[3] == "SRV") == srv
    assert sorted(f[4] for f in lines if f[3] in ("A", "AAAA")) == sorted(glue)
    # the addresses are still there for A/AAAA, without SRV
    assert all(r.rdtype != dns.rdatatype.SRV for r in udp(svc, name, "A").answer)


def test_coredns_negative_and_version_cases(start_dns: Start) -> None:
    svc = start_dns(coredns_objects())
    # a service without ports has no SRV: NODATA with the SOA
    nodata = udp(svc, "svc-no-ports" + T, "SRV")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    # TXT where only addresses exist: NODATA, SOA TTL 5 (CoreDNS's case)
    txt = udp(svc, "svc1" + T, "TXT")
    assert txt.rcode() == dns.rcode.NOERROR and not txt.answer
    assert txt.authority[0].ttl == 5
    # dns-version: TTL 28800 like CoreDNS
    version = udp(svc, "dns-version.cluster.local", "TXT")
    assert rdata(version) == ['"1.1.0"'] and version.answer[0].ttl == 28800
    out = dig(svc, "dns-version.cluster.local", "TXT", "+noall", "+answer")
    assert out.split()[1] == "28800"


def test_a_query_of_unusual_shape_is_answered_by_the_worker(start_dns: Start) -> None:
    """A query the fast parser leaves to dnslib (here an extra record beside EDNS's OPT in the
    additional section) is answered by a worker process like any other: the worker runs
    without `site`, so dnslib must still be importable there."""
    svc = start_dns()
    q = dns.message.make_query("web.default.svc.cluster.local", "A", use_edns=0)
    q.additional.append(dns.rrset.from_text("extra.example.", 60, "IN", "A", "192.0.2.1"))
    host, port = target(svc)
    reply = dns.message.from_wire(_udp_raw(q.to_wire(), host, port))
    assert reply.rcode() == dns.rcode.NOERROR
    assert rdata(reply, dns.rdatatype.A) == ["10.96.0.5"]
