"""Wire behaviour of answers: encoding, case and id echo, EDNS, truncation, malformed input.

Queries go through `Engine.handle` (the complete path, no sockets) and `fast_reply` (the UDP
fast path); replies are decoded with dnspython and dnslib, both independent of kproxy's encoder.
"""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dnslib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.dns.engine import Engine
from kproxy.dns.index import diff_snapshots
from kproxy.dns.options import DNSOptions
from kproxy.dns.wire import fast_reply, opt_record, parse_message
from kproxy.model.objects import EndpointPort
from tests.support.builders import make_endpoint, make_port, make_service, make_slice
from tests.unit.test_dns_index import snapshot

BIG = 200


def make_engine(**options: object) -> Engine:
    opts = DNSOptions(create_interface=False, upstreams=(), **options)  # type: ignore[arg-type]
    engine = Engine(opts, udp=[], tcp=[])
    services = [
        make_service(
            "default",
            "web",
            cluster_ips=("10.96.0.5", "fd00::5"),
            ports=(make_port(80, name="http"),),
        ),
        make_service(
            "default", "big", headless=True, cluster_ips=(), ports=(make_port(80, name="http"),)
        ),
        make_service(
            "default", "ext", type="ExternalName", cluster_ips=(), external_name="example.com"
        ),
    ]
    endpoints = [
        make_endpoint(f"10.2.{i // 250}.{i % 250 + 1}", hostname=f"big-{i}") for i in range(BIG)
    ]
    slices = [
        make_slice("default", "big", endpoints=endpoints, ports=[EndpointPort("http", "TCP", 80)])
    ]
    engine.apply(diff_snapshots(None, snapshot(services, slices)))
    return engine


ENGINE = make_engine()


def query(
    name: str,
    qtype: str = "A",
    *,
    edns: int | None = None,
    want_dnssec: bool = False,
    rd: bool = True,
) -> bytes:
    msg = dns.message.make_query(
        name,
        qtype,
        use_edns=0 if edns is not None or want_dnssec else False,
        payload=edns or 1232,
        want_dnssec=want_dnssec,
    )
    if not rd:
        msg.flags &= ~dns.flags.RD
    return msg.to_wire()


def ask(
    data: bytes, *, udp: bool = True, client: str = "127.0.0.1", engine: Engine = ENGINE
) -> dns.message.Message:
    resp = engine.handle(data, client, udp=udp)
    assert resp is not None
    return dns.message.from_wire(resp)


@pytest.mark.parametrize(
    ("name", "qtype", "expect"),
    [
        ("web.default.svc.cluster.local", "A", ["10.96.0.5"]),
        ("web.default.svc.cluster.local", "AAAA", ["fd00::5"]),
        (
            "_http._tcp.web.default.svc.cluster.local",
            "SRV",
            ["0 100 80 web.default.svc.cluster.local."],
        ),
        ("5.0.96.10.in-addr.arpa", "PTR", ["web.default.svc.cluster.local."]),
        ("big-7.big.default.svc.cluster.local", "A", ["10.2.0.8"]),
        ("dns-version.cluster.local", "TXT", ['"1.1.0"']),
        ("ext.default.svc.cluster.local", "CNAME", ["example.com."]),
    ],
)
def test_answers_decode_with_dnspython_and_dnslib(name: str, qtype: str, expect: list[str]) -> None:
    data = query(name, qtype)
    raw = ENGINE.handle(data, "127.0.0.1", udp=False)
    assert raw is not None
    msg = dns.message.from_wire(raw)
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    got = [rd.to_text() for rrset in msg.answer for rd in rrset]
    assert got == expect
    parsed = dnslib.DNSRecord.parse(raw)
    assert [str(rr.rdata).strip() for rr in parsed.rr] == [e.strip() for e in expect]


def test_srv_glue_is_compressed_and_decodes() -> None:
    msg = ask(query("_http._tcp.big.default.svc.cluster.local", "SRV"), udp=False)
    srvs = msg.answer[0]
    glue = {rrset.name for rrset in msg.additional}
    assert len(srvs) == BIG
    assert {rd.target for rd in srvs} == glue
    raw = ENGINE.handle(query("_http._tcp.big.default.svc.cluster.local", "SRV"), "c", udp=False)
    assert raw is not None
    assert len(dnslib.DNSRecord.parse(raw).ar) == BIG


def test_negative_answers_carry_the_soa() -> None:
    nx = ask(query("nope.default.svc.cluster.local"))
    assert nx.rcode() == dns.rcode.NXDOMAIN and not nx.answer
    assert nx.authority[0].rdtype == dns.rdatatype.SOA
    nodata = ask(query("default.svc.cluster.local"))
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA


@pytest.mark.parametrize("name", ["WEB.Default.SVC.Cluster.Local", "wEb.dEfAuLt.svc.cluster.local"])
def test_question_case_is_echoed_byte_for_byte(name: str) -> None:
    data = query(name)
    for udp in (True, False):
        resp = ENGINE.handle(data, "127.0.0.1", udp=udp)
        assert resp is not None
        end = 12 + len(dns.name.from_text(name).to_wire())
        assert resp[12:end] == data[12:end]
        msg = dns.message.from_wire(resp)
        assert msg.answer[0].name.to_text(omit_final_dot=True) == name  # the owner points there


@pytest.mark.parametrize("rd", [True, False])
def test_id_and_rd_are_echoed(rd: bool) -> None:
    data = query("web.default.svc.cluster.local", rd=rd)
    msg = ask(data)
    assert msg.id == dns.message.from_wire(data).id
    assert bool(msg.flags & dns.flags.RD) == rd
    assert msg.flags & dns.flags.QR


def test_edns_is_echoed_with_our_payload_size_and_do_bit() -> None:
    msg = ask(query("web.default.svc.cluster.local", edns=4096))
    assert msg.edns == 0 and msg.payload == 1232
    assert not msg.ednsflags & dns.flags.DO
    signed = ask(query("web.default.svc.cluster.local", want_dnssec=True))
    assert signed.ednsflags & dns.flags.DO
    plain = ask(query("web.default.svc.cluster.local"))
    assert plain.edns == -1


def test_unknown_edns_version_gets_badvers() -> None:
    msg = dns.message.make_query("web.default.svc.cluster.local", "A", use_edns=1)
    resp = ask(msg.to_wire())
    assert resp.rcode() == dns.rcode.BADVERS


def test_large_answer_truncates_to_whole_records_without_edns() -> None:
    data = query("big.default.svc.cluster.local")
    raw = ENGINE.handle(data, "127.0.0.1", udp=True)
    assert raw is not None and len(raw) <= 512
    msg = dns.message.from_wire(raw)
    assert msg.flags & dns.flags.TC
    kept = len(msg.answer[0])
    assert 0 < kept < BIG
    # as many as fit: one more record (16 bytes with a compressed owner) would not
    assert len(raw) + 16 > 512


def test_large_answer_honours_edns_size_and_is_complete_over_tcp() -> None:
    raw = ENGINE.handle(query("big.default.svc.cluster.local", edns=1232), "c", udp=True)
    assert raw is not None and 512 < len(raw) <= 1232
    msg = dns.message.from_wire(raw)
    assert msg.flags & dns.flags.TC and msg.edns == 0
    full = ask(query("big.default.svc.cluster.local"), udp=False)
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == BIG


def test_dropping_only_additional_records_does_not_set_tc() -> None:
    engine = make_engine(max_udp_size=65535)
    data = query("_http._tcp.big.default.svc.cluster.local", "SRV")
    full = engine.handle(data, "c", udp=False)
    assert full is not None
    answers_end = max(r.end for r in parse_message(full).records if r.section == 0)
    # room for every SRV record and a few glue records, plus our OPT record
    limit = answers_end + 11 + 50
    edns = query("_http._tcp.big.default.svc.cluster.local", "SRV", edns=limit)
    raw = engine.handle(edns, "c", udp=True)
    assert raw is not None and len(raw) <= limit
    msg = dns.message.from_wire(raw)
    assert len(msg.answer[0]) == BIG and 0 < len(msg.additional) < BIG
    assert not msg.flags & dns.flags.TC


def header(
    qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


@pytest.mark.parametrize(
    "data",
    [
        header() + b"\x03web",  # question cut short
        header(qd=2) + b"\x00\x00\x01\x00\x01",  # two questions, only one present
        header(qd=0),
        header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",  # label type 01
        header() + b"\xc0\x0c\x00\x01\x00\x01",  # pointer loop to itself
        header() + b"\xc0\x12\x00\x01\x00\x01\x03web\x00",  # forward pointer
    ],
)
def test_malformed_queries_get_formerr(data: bytes) -> None:
    resp = ENGINE.handle(data, "127.0.0.1", udp=True)
    assert resp is not None
    msg = dnslib.DNSRecord.parse(resp)
    assert msg.header.id == 0x1234 and msg.header.rcode == 1 and msg.header.qr == 1


@pytest.mark.parametrize(
    "data",
    [b"", b"\x12", header()[:11], header(flags=0x8100) + b"\x00\x00\x01\x00\x01"],
    ids=["empty", "one-byte", "short-header", "a-response"],
)
def test_unanswerable_packets_get_silence(data: bytes) -> None:
    assert ENGINE.handle(data, "127.0.0.1", udp=True) is None


def test_other_opcodes_get_notimp() -> None:
    resp = ENGINE.handle(header(flags=0x1000) + b"\x00\x00\x01\x00\x01", "c", udp=True)  # STATUS
    assert resp is not None and resp[3] & 0xF == 4


def test_query_with_extra_records_is_answered() -> None:
    q = dnslib.DNSRecord.question("web.default.svc.cluster.local", "A")
    q.add_ar(dnslib.RR("x.example", dnslib.QTYPE.TXT, rdata=dnslib.TXT("hello")))
    msg = ask(q.pack())
    assert [rd.to_text() for rd in msg.answer[0]] == ["10.96.0.5"]


# -- the fast path ------------------------------------------------------------------------------

OPT = opt_record(1232)
OPT_DO = opt_record(1232, dnssec_ok=True)


def test_fast_path_matches_the_full_path_once_cached() -> None:
    engine = make_engine()
    cache = engine._state[1]
    for name, qtype, edns in [
        ("web.default.svc.cluster.local", "A", None),
        ("web.default.svc.cluster.local", "AAAA", 1232),
        ("nope.default.svc.cluster.local", "A", None),
        ("_http._tcp.web.default.svc.cluster.local", "SRV", 4096),
        ("5.0.96.10.in-addr.arpa", "PTR", None),
    ]:
        data = query(name, qtype, edns=edns)
        assert fast_reply(data, cache, OPT, OPT_DO, 1232) is None  # cold
        slow = engine.handle(data, "127.0.0.1", udp=True)
        assert fast_reply(data, cache, OPT, OPT_DO, 1232) == slow


def test_fast_path_declines_what_it_must_not_answer() -> None:
    engine = make_engine()
    cache = engine._state[1]
    big = query("big.default.svc.cluster.local")
    engine.handle(big, "c", udp=False)
    assert fast_reply(big, cache, OPT, OPT_DO, 1232) is None  # needs truncation
    ext = query("ext.default.svc.cluster.local")
    engine.handle(ext, "c", udp=False)
    assert fast_reply(ext, cache, OPT, OPT_DO, 1232) is None  # needs the upstream
    upper = query("WEB.default.svc.cluster.local")
    engine.handle(upper, "c", udp=True)
    assert fast_reply(upper, cache, OPT, OPT_DO, 1232) is None  # cache keys are lower-case


# -- fuzzing --------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    for udp in (True, False):
        resp = ENGINE.handle(data, "127.0.0.1", udp=udp)
        if resp is not None:
            assert resp[:2] == data[:2] and resp[2] & 0x80
            dnslib.DNSRecord.parse(resp)
    fast_reply(data, ENGINE._state[1], OPT, OPT_DO, 1232)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(min_size=0, max_size=70), min_size=0, max_size=8),
    st.integers(0, 65535),
    st.sampled_from([1, 3, 255, 12345]),
    st.booleans(),
)
def test_malformed_names_never_raise(
    labels: list[bytes], qtype: int, qclass: int, edns: bool
) -> None:
    name = b"".join(bytes((len(lb) & 0xFF,)) + lb for lb in labels) + b"\x00"
    data = header() + name + struct.pack("!HH", qtype, qclass)
    if edns:
        data = data[:10] + b"\x00\x01" + data[12:] + OPT
    resp = ENGINE.handle(data, "127.0.0.1", udp=True)
    assert resp is not None
    assert resp[:2] == data[:2]
    fast_reply(data, ENGINE._state[1], OPT, OPT_DO, 1232)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"web", b"WEB", b"default", b"svc", b"cluster", b"local", b"pod", b"x"]),
        max_size=7,
    ),
    st.sampled_from([1, 28, 33, 12, 16, 255]),
)
def test_fast_and_full_paths_agree(labels: list[bytes], qtype: int) -> None:
    name = b"".join(bytes((len(lb),)) + lb for lb in labels) + b"\x00"
    data = header() + name + struct.pack("!HH", qtype, 1)
    engine = ENGINE
    slow = engine.handle(data, "127.0.0.1", udp=True)
    fast = fast_reply(data, engine._state[1], OPT, OPT_DO, 1232)
    if fast is not None:
        assert fast == slow
