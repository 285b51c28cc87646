"""The upstream servers for names outside the zone: configured, else the node's resolv.conf.

When resolv.conf only names the systemd-resolved stub (127.0.0.53) the real list in
/run/systemd/resolve/resolv.conf is used, as kubelet does. Any nameserver that is one of
kproxy's own DNS addresses is skipped: sending queries to ourselves would loop.

Its own module so that the daemon, which only computes the list and hands it to the serving
processes, does not import the forwarder, the wire codec and the resolver (~2 MB).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable

from kproxy.dns.options import parse_hostport

log = logging.getLogger("kproxy.dns.forward")

RESOLVED_STUB = "127.0.0.53"
RESOLVED_REAL = "/run/systemd/resolve/resolv.conf"


def read_nameservers(path: str) -> list[str]:
    """The `nameserver` entries of a resolv.conf file (empty when it cannot be read)."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append(parts[1].split("%")[0])
    except OSError:
        return []
    return out


def default_upstreams(
    resolv_conf: str, *, own: Iterable[str], resolved_conf: str = RESOLVED_REAL
) -> tuple[tuple[str, int], ...]:
    """Upstreams from resolv.conf, minus our own addresses (loop protection)."""
    servers = read_nameservers(resolv_conf)
    if servers and all(s == RESOLVED_STUB for s in servers) and os.path.exists(resolved_conf):
        servers = read_nameservers(resolved_conf) or servers
    own_set = {str(ipaddress.ip_address(a)) for a in own}
    result: list[tuple[str, int]] = []
    for s in servers:
        try:
            ip = str(ipaddress.ip_address(s))
        except ValueError:
            continue
        if ip in own_set:
            log.warning("dns: skipping upstream %s from %s: it is kproxy itself", ip, resolv_conf)
            continue
        result.append((ip, 53))
    return tuple(dict.fromkeys(result))


def resolve_upstreams(
    configured: Iterable[str] | None,
    *,
    resolv_conf: str,
    own: Iterable[tuple[str, int]],
) -> tuple[tuple[str, int], ...]:
    """The upstream list: configured ones (minus our own ip:port) or resolv.conf's."""
    own = tuple(own)
    if configured is None:
        return default_upstreams(resolv_conf, own=[ip for ip, _ in own])
    out = []
    for text in configured:
        hp = parse_hostport(text)
        if hp in own:
            log.warning("dns: skipping upstream %s: it is kproxy itself", text)
            continue
        out.append(hp)
    return tuple(dict.fromkeys(out))
