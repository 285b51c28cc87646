"""The whole IPVS table in one read: `/proc/net/ip_vs` parsed, for full syncs at scale.

Generic netlink cannot list the real servers of every virtual server at once: it takes one dump
request per virtual server, and at 10,000 services those round trips dominate a full resync
(tens of seconds under emulation). The kernel's own text listing, `/proc/net/ip_vs` (per network
namespace, what `ipvsadm -Ln` printed before netlink existed), holds every virtual server with
its real servers, weights and connection counts, and is produced in one pass.

It does not show the scheduler flags (sh-/mh-fallback, -port), so full syncs take the virtual
servers' own attributes from one netlink service dump and only the real servers from here (see
`merge`). fwmark services are skipped, as the netlink adapter skips them.

Line formats (net/netfilter/ipvs/ip_vs_ctl.c, ip_vs_info_seq_show):

    TCP  0A600050:0050 rr                      IPv4 service: hex address and port
    TCP  [fd00:0096:...:0041]:0050 rr persistent 60 FFFFFFFF
      -> 0AF4010D:0050      Masq    1      0          0
                                  forward weight active inactive
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import replace

from kproxy.render import ipvs as R
from kproxy.render import ipvs_diff as D

PATH = "/proc/net/ip_vs"
_FORWARD = {"Masq": "masq", "Local": "local", "Tunnel": "tunnel", "Route": "route"}


def _hostport(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return str(ipaddress.IPv6Address(host)), int(port, 16)
    host, _, port = text.partition(":")
    return socket.inet_ntoa(bytes.fromhex(host)), int(port, 16)


def parse(text: str) -> dict[R.VSKey, list[D.ObservedDest]]:
    """Virtual server -> its real servers, from the text of /proc/net/ip_vs."""
    out: dict[R.VSKey, list[D.ObservedDest]] = {}
    current: list[D.ObservedDest] | None = None
    v4_cache: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("  -> "):
            if current is None:
                continue
            words = line.split()
            if words[1] == "RemoteAddress:Port":
                continue
            hp = words[1]
            if hp[0] == "[":
                addr, port = _hostport(hp)
            else:
                hexaddr, _, hexport = hp.partition(":")
                cached = v4_cache.get(hexaddr)
                if cached is None:  # inet_ntoa: 10x cheaper than ipaddress at 100k real servers
                    cached = v4_cache[hexaddr] = socket.inet_ntoa(bytes.fromhex(hexaddr))
                addr = cached
                port = int(hexport, 16)
            current.append(
                D.ObservedDest(
                    addr,
                    port,
                    int(words[3]),
                    int(words[4]),
                    int(words[5]),
                    _FORWARD.get(words[2], words[2].lower()),
                )
            )
            continue
        words = line.split()
        if len(words) < 3 or words[0] not in ("TCP", "UDP", "SCTP"):
            current = None  # header, FWM services
            continue
        addr, port = _hostport(words[1])
        current = out.setdefault(R.VSKey(addr, words[0], port), [])
    return out


def read(path: str = PATH) -> dict[R.VSKey, list[D.ObservedDest]]:
    with open(path, encoding="ascii") as fh:
        return parse(fh.read())


def merge(
    services: Iterable[D.ObservedVS], dests: Mapping[R.VSKey, list[D.ObservedDest]]
) -> dict[R.VSKey, D.ObservedVS]:
    """The virtual servers of a netlink service dump with the real servers of a /proc read. A
    service created between the two reads shows no real servers: the diff then adds them, and
    an add that finds one existing is an edit."""
    return {vs.key: replace(vs, dests=tuple(dests.get(vs.key, ()))) for vs in services}
