"""Upstream DNS servers for forwarding tests, written with dnspython, not with kproxy's wire code.

A `FixtureUpstream` is a real UDP and TCP server on its own loopback address. Its replies are
built with dnspython's message, rrset and renderer builders, so they look like what BIND, Unbound,
CoreDNS or systemd-resolved send (EDNS echoed, names compressed), and kproxy's parser is tested
against an implementation it shares nothing with. Behaviours:

- `answer`: a normal server. Echoes the client's EDNS (the OPT record in the additional section),
  compresses every name (owners, CNAME/NS/MX/SOA targets), adds authority NS records and glue.
  With `opt_first=True` the OPT record comes before the glue (legal; RFC 6891 only says there is
  one). Names: `www.example.org` CNAME `web.example.org` + 2 A; `outside.example.org` A/AAAA
  (the ExternalName target); `big.example.org` 100 A records; `nx.example.org` NXDOMAIN + SOA;
  `mail.example.org` MX.
- `truncate`: over UDP every reply has TC=1 and no records (EDNS still echoed); TCP gets the
  full `answer` reply.
- `garbage`: random bytes of random length, over UDP and TCP.
- `lying`: a reply whose header, id and question match but whose counts promise records that
  are not there (a parser must refuse it, not crash or wait).
- `silent`: reads queries and never answers.

`seen` records (transport, lower-case qname) per query received.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.renderer
import dns.rrset

TTL = 300
BIG = 100


def _loopback() -> str:
    return f"127.{random.randrange(10, 250)}.{random.randrange(0, 255)}.{random.randrange(1, 254)}"


def _rrset(name: str, rdtype: str, *texts: str, ttl: int = TTL) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(name, ttl, "IN", rdtype, list(texts))


def zone_answer(qname: dns.name.Name, rdtype: int) -> tuple[int, list, list, list]:  # type: ignore[type-arg]
    """(rcode, answer, authority, additional) rrsets for a question."""
    name = qname.to_text().lower().rstrip(".")
    answer: list[dns.rrset.RRset] = []
    auth = [_rrset("example.org.", "NS", "ns1.example.org.", "ns2.example.org.")]
    glue = [
        _rrset("ns1.example.org.", "A", "192.0.2.53"),
        _rrset("ns2.example.org.", "A", "192.0.2.54"),
    ]
    A, AAAA = dns.rdatatype.A, dns.rdatatype.AAAA
    if name == "www.example.org":
        answer.append(_rrset(qname.to_text(), "CNAME", "web.example.org."))
        if rdtype == A:
            answer.append(_rrset("web.example.org.", "A", "192.0.2.10", "192.0.2.11"))
    elif name == "outside.example.org":
        if rdtype == A:
            answer.append(_rrset(qname.to_text(), "A", "192.0.2.1"))
        elif rdtype == AAAA:
            answer.append(_rrset(qname.to_text(), "AAAA", "2001:db8::1"))
    elif name == "big.example.org" and rdtype == A:
        answer.append(_rrset(qname.to_text(), "A", *(f"192.0.2.{i}" for i in range(BIG))))
    elif name == "mail.example.org" and rdtype == dns.rdatatype.MX:
        answer.append(_rrset(qname.to_text(), "MX", "10 mx1.example.org.", "20 mx2.example.org."))
    elif name.startswith("nx."):
        soa = "ns1.example.org. hostmaster.example.org. 1 7200 1800 86400 60"
        return dns.rcode.NXDOMAIN, [], [_rrset("example.org.", "SOA", soa)], []
    return dns.rcode.NOERROR, answer, auth, glue


def render_reply(
    query: dns.message.Message, *, opt_first: bool = False, truncate: bool = False
) -> bytes:
    """The `answer` reply to `query` in wire form, rendered by dnspython (names compressed).

    The client's EDNS is echoed (OPT last, or before the glue with `opt_first`); `truncate`
    gives TC=1 and no records.
    """
    q = query.question[0]
    rcode, answer, auth, glue = zone_answer(q.name, q.rdtype)
    flags = dns.flags.QR | dns.flags.RD | dns.flags.RA
    if truncate:
        answer, auth, glue = [], [], []
        flags |= dns.flags.TC
    r = dns.renderer.Renderer(query.id, flags | rcode, 65535)
    r.add_question(q.name, q.rdtype, q.rdclass)
    for rrset in answer:
        r.add_rrset(dns.renderer.ANSWER, rrset)
    for rrset in auth:
        r.add_rrset(dns.renderer.AUTHORITY, rrset)
    edns = query.edns >= 0
    if edns and opt_first:
        r.add_edns(0, 0, 1232)
    for rrset in glue:
        r.add_rrset(dns.renderer.ADDITIONAL, rrset)
    if edns and not opt_first:
        r.add_edns(0, 0, 1232)
    r.write_header()
    return r.get_wire()


class FixtureUpstream:
    def __init__(self, behaviour: str = "answer", *, opt_first: bool = False) -> None:
        assert behaviour in ("answer", "truncate", "garbage", "lying", "silent"), behaviour
        self.behaviour = behaviour
        self.opt_first = opt_first
        self.seen: list[tuple[str, str]] = []
        self._rnd = random.Random(7)
        self.host = _loopback()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((self.host, 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((self.host, self.port))
        self.tcp.listen(16)
        self._stop = threading.Event()
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self.udp.close()
        self.tcp.close()

    # -- replies -------------------------------------------------------------------------------
    def reply(self, data: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None
        q = query.question[0]
        self.seen.append((transport, q.name.to_text().lower().rstrip(".")))
        if self.behaviour == "silent":
            return None
        if self.behaviour == "garbage":
            return bytes(self._rnd.randrange(256) for _ in range(self._rnd.randrange(1, 200)))
        if self.behaviour == "lying":
            # id, flags and question right; 3 answers promised, half a record present
            head = struct.pack("!HHHHHH", query.id, 0x8180, 1, 3, 0, 0)
            return head + data[12 : 12 + len(q.name.to_wire()) + 4] + b"\xc0\x0c\x00\x01\x00"
        return render_reply(
            query,
            opt_first=self.opt_first,
            truncate=self.behaviour == "truncate" and transport == "udp",
        )

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.udp.recvfrom(65535)
            except OSError:
                return
            resp = self.reply(data, "udp")
            if resp is not None:
                with contextlib.suppress(OSError):
                    self.udp.sendto(resp, addr)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while True:
                    head = _recv_exact(conn, 2)
                    data = _recv_exact(conn, struct.unpack("!H", head)[0])
                    resp = self.reply(data, "tcp")
                    if resp is None:
                        if self.behaviour == "silent":
                            self._stop.wait(10)
                        return
                    conn.sendall(struct.pack("!H", len(resp)) + resp)
            except (OSError, ValueError):
                return


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf
