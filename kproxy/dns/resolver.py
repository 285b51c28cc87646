"""The resolver: (question, index) -> answer, without sockets (sans-I/O, as h11 does for HTTP).

Rules, in order:
1. Zone transfers (AXFR/IXFR) and classes other than IN are REFUSED.
2. Names outside the cluster zone are for the upstream (`forward=True`), except PTR questions
   for addresses the index knows (cluster and endpoint IPs). Other reverse names are forwarded
   too, as CoreDNS's default `fallthrough in-addr.arpa ip6.arpa` does.
3. Before the first complete sync of the model, cluster names get SERVFAIL (with the zone SOA,
   as CoreDNS): a client must not cache an NXDOMAIN for a service that simply is not listed
   yet.
4. A name in the index answers with its records of the asked type, or NODATA (NOERROR, empty
   answer, the zone SOA in authority) when it has none; a CNAME is followed inside the zone, and
   an out-of-zone target is left to the server (`chase`), which asks the upstream.
5. Pod names `a-b-c-d.<ns>.pod.<zone>` are synthesised (pods mode "insecure"), anything else
   NXDOMAIN with the SOA. There are no wildcards.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from kproxy.dns.index import PODS_INSECURE, DnsIndex, Node
from kproxy.dns.records import (
    AAAA,
    ANY,
    AXFR,
    CLASS_IN,
    CNAME,
    IXFR,
    NOERROR,
    NS,
    NXDOMAIN,
    PTR,
    REFUSED,
    RR,
    SERVFAIL,
    SRV,
    A,
    is_subdomain,
    wire_labels,
)

_MAX_CHAIN = 8
_ARPA = b"\x04arpa\x00"


@dataclass(frozen=True, slots=True)
class Question:
    """A parsed question: the name in lower-case wire form, its type and class."""

    name: bytes
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True, slots=True)
class Answer:
    """The resolver's verdict.

    forward: the question is not ours; ask the upstream (subject to the recursion ACL).
    chase:   the answer ends in a CNAME to this out-of-zone name; the server appends the
             upstream's records for it (when the client may recurse).
    cacheable: the answer depends only on the index (not on time or the client).
    """

    rcode: int = NOERROR
    authoritative: bool = True
    answer: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()
    forward: bool = False
    chase: bytes | None = None
    cacheable: bool = True


FORWARD = Answer(authoritative=False, forward=True, cacheable=False)
REFUSE = Answer(rcode=REFUSED, authoritative=False)


def _pod_address(label: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a pod label names (CoreDNS: 3 dashes and no "--" is IPv4, else IPv6)."""
    try:
        text = label.decode("ascii")
    except UnicodeDecodeError:
        return None
    if text.count("-") == 3 and "--" not in text:
        text = text.replace("-", ".")
    else:
        text = text.replace("-", ":")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _records(node: Node, qtype: int) -> tuple[RR, ...]:
    return node.rrs if qtype == ANY else node.get(qtype)


def _negative(
    index: DnsIndex, rcode: int, answer: tuple[RR, ...] = (), *, cacheable: bool = True
) -> Answer:
    return Answer(rcode=rcode, answer=answer, authority=(index.soa,), cacheable=cacheable)


def _pod(index: DnsIndex, q: Question, rel: tuple[bytes, ...]) -> Answer | None:
    """Answer for a name below pod.<zone> (rel: labels left of the zone), None if not a pod."""
    if len(rel) < 2 or rel[-1] != b"pod":
        return None
    if index.pods_mode != PODS_INSECURE:
        return _negative(index, NXDOMAIN)
    if len(rel) == 2:  # <ns>.pod.<zone>: exists (any namespace may hold pods)
        return _negative(index, NOERROR)
    if len(rel) != 3:
        return _negative(index, NXDOMAIN)
    ip = _pod_address(rel[0])
    if ip is None:
        return _negative(index, NXDOMAIN)
    rtype = A if ip.version == 4 else AAAA
    if q.qtype not in (rtype, ANY):
        return _negative(index, NOERROR)
    return Answer(answer=(RR(q.name, rtype, index.ttl, ip.packed),))


def resolve(q: Question, index: DnsIndex) -> Answer:
    """Answer `q` from `index` (see the module docstring for the rules)."""
    if q.qclass != CLASS_IN or q.qtype in (AXFR, IXFR):
        return REFUSE
    if not is_subdomain(q.name, index.zone):
        if q.qtype == PTR and q.name.endswith(_ARPA) and index.synced:
            node = index.lookup(q.name)
            ptrs = node.get(PTR) if node is not None else ()
            if ptrs:
                return Answer(answer=ptrs)
        return FORWARD
    if not index.synced:
        # as CoreDNS before its first sync: SERVFAIL, authoritative, with the zone SOA
        return _negative(index, SERVFAIL, cacheable=False)

    return _follow(q, index)


def _follow(q: Question, index: DnsIndex) -> Answer:
    """Look the name up, following CNAMEs inside the zone.

    An answer that went through an in-zone CNAME depends on more than one name, so it is not
    cacheable per name (the answer cache is invalidated by name).
    """
    answer: list[RR] = []
    name = q.name
    for hop in range(_MAX_CHAIN):
        chained = hop > 0
        node = index.lookup(name)
        if node is None:
            rel = wire_labels(name[: len(name) - len(index.zone)] + b"\x00")
            pod = _pod(index, Question(name, q.qtype, q.qclass), rel)
            if pod is None:
                return _negative(index, NXDOMAIN, tuple(answer), cacheable=not chained)
            if not chained:
                return pod
            return Answer(
                rcode=pod.rcode,
                answer=(*answer, *pod.answer),
                authority=pod.authority,
                cacheable=False,
            )
        cname = node.get(CNAME)
        if cname and q.qtype not in (CNAME, ANY):
            answer.extend(cname)
            target = cname[0].rdata
            if not is_subdomain(target, index.zone):
                return Answer(answer=tuple(answer), chase=target, cacheable=not chained)
            name = target
            continue
        rrs = _records(node, q.qtype)
        if not rrs:
            return _negative(index, NOERROR, tuple(answer), cacheable=not chained)
        answer.extend(rrs)
        extra = node.extra if q.qtype in (SRV, NS, ANY) else ()
        return Answer(answer=tuple(answer), additional=extra, cacheable=not chained)
    # a CNAME loop inside the zone (ExternalName services pointing at each other)
    return _negative(index, SERVFAIL, tuple(answer), cacheable=False)
