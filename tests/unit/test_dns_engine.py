"""The engine without sockets: model updates reach cached answers, recursion policy, stats."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.dns.engine import Engine, FailureLog
from kproxy.dns.forward import Forwarder, Upstreamed
from kproxy.dns.index import diff_snapshots
from kproxy.dns.options import DNSOptions
from kproxy.dns.records import RR
from kproxy.model.objects import Ref
from kproxy.model.store import Store
from tests.support.builders import make_endpoint, make_service, make_slice
from tests.unit.test_dns_index import operations


def engine(**options: object) -> Engine:
    return Engine(DNSOptions(create_interface=False, **options), udp=[], tcp=[])  # type: ignore[arg-type]


def answer(
    e: Engine, name: str, qtype: str = "A", client: str = "127.0.0.1"
) -> dns.message.Message:
    raw = e.handle(dns.message.make_query(name, qtype).to_wire(), client, udp=False)
    assert raw is not None
    return dns.message.from_wire(raw)


def addresses(msg: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in msg.answer for rd in rrset)


def test_updates_replace_cached_answers_and_keep_the_rest() -> None:
    store = Store()
    store.replace_services(
        [make_service("default", "web", cluster_ips=("10.96.0.5",)), make_service("default", "db")]
    )
    store.replace_slices([])
    e = engine()
    prev = store.peek()
    e.apply(diff_snapshots(None, prev))
    assert addresses(answer(e, "web.default.svc.cluster.local")) == ["10.96.0.5"]
    answer(e, "db.default.svc.cluster.local")
    assert answer(e, "new.default.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    cached = e.stats()["answer_cache"]

    store.set_service(make_service("default", "web", cluster_ips=("10.96.0.6",)))
    store.set_service(make_service("default", "new", cluster_ips=("10.96.0.7",)))
    cur = store.peek()
    e.apply(diff_snapshots(prev, cur))
    # untouched answers survive the update; touched ones are gone
    assert 0 < e.stats()["answer_cache"] < cached
    assert addresses(answer(e, "web.default.svc.cluster.local")) == ["10.96.0.6"]
    assert addresses(answer(e, "new.default.svc.cluster.local")) == ["10.96.0.7"]


def test_endpoint_changes_reach_headless_answers() -> None:
    store = Store()
    store.replace_services([make_service("default", "db", headless=True, cluster_ips=())])
    store.replace_slices([make_slice("default", "db", endpoints=[make_endpoint("10.1.0.1")])])
    e = engine()
    prev = store.peek()
    e.apply(diff_snapshots(None, prev))
    assert addresses(answer(e, "db.default.svc.cluster.local")) == ["10.1.0.1"]
    store.set_slice(make_slice("default", "db", endpoints=[make_endpoint("10.1.0.1", ready=False)]))
    cur = store.peek()
    e.apply(diff_snapshots(prev, cur))
    assert answer(e, "db.default.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN


PROBES = [
    "s1.a.svc.cluster.local",
    "s2.a.svc.cluster.local",
    "s3.b.svc.cluster.local",
    "h0.s1.a.svc.cluster.local",
    "10-1-0-1.s2.a.svc.cluster.local",
    "a.svc.cluster.local",
    "b.svc.cluster.local",
    "_http._tcp.s1.a.svc.cluster.local",
    "1.0.1.10.in-addr.arpa",
    "1.0.96.10.in-addr.arpa",
]


@settings(max_examples=60, deadline=None)
@given(operations(), st.sampled_from(["A", "AAAA", "SRV", "PTR", "TXT"]))
def test_cached_answers_always_match_a_fresh_engine(
    ops: list[tuple[str, object]], qtype: str
) -> None:
    store = Store()
    store.replace_services([])
    store.replace_slices([])
    e = engine(upstreams=())
    prev = store.peek()
    e.apply(diff_snapshots(None, prev))
    for kind, arg in ops:
        for name in PROBES:  # warm the cache with the current answers
            answer(e, name, qtype)
        if kind == "svc":
            store.set_service(arg)  # type: ignore[arg-type]
        elif kind == "slice":
            store.set_slice(arg)  # type: ignore[arg-type]
        elif kind == "del-svc":
            store.delete_service(Ref(*arg))  # type: ignore[misc]
        else:
            store.delete_slice(Ref(*arg))  # type: ignore[misc]
        cur = store.peek()
        e.apply(diff_snapshots(prev, cur))
        fresh = engine(upstreams=())
        fresh.apply(diff_snapshots(None, cur))
        for name in PROBES:
            got, want = answer(e, name, qtype), answer(fresh, name, qtype)
            assert got.rcode() == want.rcode(), name
            assert sorted(map(str, got.answer)) == sorted(map(str, want.answer)), name
        prev = cur


def test_recursion_is_refused_outside_the_allow_list() -> None:
    e = engine(upstreams=(), allow_cidrs=("10.244.0.0/16",))
    store = Store()
    store.replace_services([])
    store.replace_slices([])
    e.apply(diff_snapshots(None, store.peek()))
    assert answer(e, "example.com", client="192.0.2.1").rcode() == dns.rcode.REFUSED
    # cluster names need no recursion
    assert answer(e, "dns-version.cluster.local", "TXT", client="192.0.2.1").rcode() == 0
    # an allowed client without any upstream gets SERVFAIL
    assert answer(e, "example.com", client="10.244.1.5").rcode() == dns.rcode.SERVFAIL
    stats = e.stats()
    assert stats["recursion_refused"] == 1 and stats["upstream_errors"] == 1


def test_ipv4_mapped_clients_match_ipv4_cidrs() -> None:
    e = engine(upstreams=(), allow_cidrs=("10.244.0.0/16",))
    assert e.policy.allowed("::ffff:10.244.1.5")
    assert not e.policy.allowed("::ffff:10.245.1.5")
    assert not e.policy.allowed("not-an-ip")


def test_servfail_for_cluster_names_until_synced() -> None:
    store = Store()
    store.replace_services([make_service("default", "web")])
    e = engine()
    snap = store.peek()
    assert not snap.synced  # slices not listed yet
    e.apply(diff_snapshots(None, snap))
    assert answer(e, "web.default.svc.cluster.local").rcode() == dns.rcode.SERVFAIL
    store.replace_slices([])
    e.apply(diff_snapshots(snap, store.peek()))
    assert answer(e, "web.default.svc.cluster.local").rcode() == dns.rcode.NOERROR


# -- failures while answering: always SERVFAIL, never silence ------------------------------------


class ExplodingForwarder(Forwarder):
    """A forwarder with a bug: every call raises (not an UpstreamError)."""

    def query(self, qbytes: bytes, key: bytes) -> Upstreamed:
        raise RuntimeError("bug in query")

    def lookup(self, qbytes: bytes, key: bytes) -> tuple[int, list[RR]]:
        raise KeyError("bug in lookup")


def synced_engine(
    udp: list[socket.socket] | None = None, tcp: list[socket.socket] | None = None
) -> Engine:
    store = Store()
    store.replace_services(
        [
            make_service(
                "default", "ext", type="ExternalName", cluster_ips=(), external_name="example.org"
            ),
            make_service("default", "huge", headless=True, cluster_ips=()),
        ]
    )
    eps = [make_endpoint(f"10.{i // 250}.{i % 250}.1") for i in range(HUGE)]
    store.replace_slices([make_slice("default", "huge", endpoints=eps)])
    e = Engine(DNSOptions(create_interface=False), udp=udp or [], tcp=tcp or [])
    e.apply(diff_snapshots(None, store.peek()))
    return e


HUGE = 5000  # 5000 A records: ~80 kB, more than a TCP message can carry
FAILING = ["www.example.org", "ext.default.svc.cluster.local"]


@pytest.mark.parametrize("name", FAILING, ids=["forwarded", "chased"])
@pytest.mark.parametrize("edns", [False, True], ids=["plain", "edns"])
def test_a_bug_while_answering_is_servfail_with_the_question(
    name: str, edns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    e = synced_engine()
    e.forwarder = ExplodingForwarder([])
    q = dns.message.make_query(name, "A", use_edns=0 if edns else False, want_dnssec=edns)
    q.flags |= dns.flags.CD
    with caplog.at_level(logging.ERROR, logger="kproxy.dns.engine"):
        raw = e.handle(q.to_wire(), "127.0.0.1", udp=False)
    assert raw is not None
    msg = dns.message.from_wire(raw)
    assert q.is_response(msg) and msg.rcode() == dns.rcode.SERVFAIL
    assert msg.flags & dns.flags.RD and msg.flags & dns.flags.CD
    assert msg.edns == (0 if edns else -1)
    if edns:
        assert msg.ednsflags & dns.flags.DO
    failures = [r for r in caplog.records if "answered SERVFAIL" in r.getMessage()]
    assert len(failures) == 1 and name + ". A" in failures[0].getMessage()
    assert failures[0].exc_info is not None  # with the traceback
    assert e.stats()["internal_errors"] == 1


def test_repeated_failures_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    e = synced_engine()
    e.forwarder = ExplodingForwarder([])
    with caplog.at_level(logging.ERROR, logger="kproxy.dns.engine"):
        for _ in range(50):
            assert answer(e, "www.example.org").rcode() == dns.rcode.SERVFAIL
    assert len([r for r in caplog.records if "SERVFAIL" in r.getMessage()]) == 1
    assert e.stats()["internal_errors"] == 50


def test_failure_log_counts_what_it_suppressed() -> None:
    now = [0.0]
    logger = logging.getLogger("kproxy.test.failurelog")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger.addHandler(Keep())
    flog = FailureLog(logger, interval=10, clock=lambda: now[0])
    for t in (0, 1, 2, 3, 12):
        now[0] = t
        flog(logging.WARNING, "failed %s", t)
    assert seen == ["failed 0", "failed 12 (3 more like this in the last 10 s)"]


def test_an_answer_too_big_for_tcp_is_truncated_not_dropped() -> None:
    e = synced_engine()
    q = dns.message.make_query("huge.default.svc.cluster.local", "A")
    raw = e.handle(q.to_wire(), "127.0.0.1", udp=False)
    assert raw is not None and len(raw) <= 65535
    msg = dns.message.from_wire(raw)
    assert msg.flags & dns.flags.TC and 1000 < len(msg.answer[0]) < HUGE


@pytest.fixture
def serving() -> Iterator[tuple[Engine, tuple[str, int]]]:
    udp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_sock.bind(("127.0.0.1", 0))
    addr = udp_sock.getsockname()
    tcp_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp_sock.bind(addr)
    tcp_sock.listen(8)
    e = synced_engine(udp=[udp_sock], tcp=[tcp_sock])
    e.start()
    yield e, addr
    e.stop()
    udp_sock.close()
    tcp_sock.close()


@pytest.mark.parametrize("name", FAILING, ids=["forwarded", "chased"])
def test_bugs_are_servfail_over_real_udp_and_tcp(
    serving: tuple[Engine, tuple[str, int]], name: str
) -> None:
    e, (host, port) = serving
    e.forwarder = ExplodingForwarder([])
    q = dns.message.make_query(name, "A")
    for msg in (
        dns.query.udp(q, host, port=port, timeout=3),
        dns.query.tcp(q, host, port=port, timeout=3),
    ):
        assert msg.rcode() == dns.rcode.SERVFAIL and msg.question == q.question
    big = dns.query.tcp(
        dns.message.make_query("huge.default.svc.cluster.local", "A"), host, port=port, timeout=3
    )
    assert big.flags & dns.flags.TC
