"""DNS server settings (`DNSOptions`) and the parsing of `ip:port` strings.

The daemon maps its flags to these: --dns-listen, --cluster-domain, --dns-ttl, --dns-upstream,
--dns-allow-cidrs, --dns-pods, --dns-service-ip, --dns-workers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from kproxy.dns.index import PODS_MODES

DNS_PORT = 53
NODE_LOCAL_ADDRESS = "169.254.20.10"
LOOPBACK_CIDRS = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True, slots=True)
class DNSOptions:
    """How and where kproxy serves DNS.

    listen:        ip:port addresses to serve on (UDP and TCP).
    upstreams:     ip[:port] servers for names outside the zone; None = the nameservers of the
                   node's resolv.conf, minus any that point back at kproxy.
    allow_cidrs:   clients that may use recursion (forwarding); others get REFUSED for outside
                   names. The daemon should pass the cluster CIDR and the node's addresses too.
    service_ip:    also answer on this address (the cluster DNS Service IP, e.g. 10.96.0.10).
    workers:       serving processes sharing the sockets (SO_REUSEPORT); 0 = threads in the
                   calling process (tests, debugging).
    create_interface: put the listen addresses on the `kproxy-dns` dummy interface (or `lo`).
    """

    listen: tuple[str, ...] = (f"{NODE_LOCAL_ADDRESS}:{DNS_PORT}",)
    zone: str = "cluster.local"
    ttl: int = 5
    upstreams: tuple[str, ...] | None = None
    allow_cidrs: tuple[str, ...] = LOOPBACK_CIDRS
    pods_mode: str = "insecure"
    service_ip: str | None = None
    workers: int = 1
    create_interface: bool = True
    resolv_conf: str = "/etc/resolv.conf"
    forward_timeout: float = 2.0
    forward_cache_size: int = 10_000
    answer_cache_size: int = 200_000
    max_udp_size: int = 1232
    tcp_idle_timeout: float = 10.0
    max_tcp_connections: int = 256

    def __post_init__(self) -> None:
        if self.pods_mode not in PODS_MODES:
            raise ValueError(f"pods_mode must be one of {PODS_MODES}, not {self.pods_mode!r}")
        if self.ttl < 0:
            raise ValueError("ttl must be >= 0")
        if self.workers < 0:
            raise ValueError("workers must be >= 0")
        if not 512 <= self.max_udp_size <= 65535:
            raise ValueError("max_udp_size must be within 512..65535")
        for hp in self.listen:
            parse_hostport(hp)
        for hp in self.upstreams or ():
            parse_hostport(hp)
        for cidr in self.allow_cidrs:
            ipaddress.ip_network(cidr, strict=False)
        if self.service_ip:
            ipaddress.ip_address(self.service_ip)

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Every (ip, port) to serve on: the listen addresses plus the service IP on port 53."""
        out = [parse_hostport(hp) for hp in self.listen]
        if self.service_ip:
            out.append((str(ipaddress.ip_address(self.service_ip)), DNS_PORT))
        return tuple(dict.fromkeys(out))


def parse_hostport(text: str, default_port: int = DNS_PORT) -> tuple[str, int]:
    """("ip", port) from "ip", "ip:port", "[v6]:port" or a bare IPv6 address."""
    s = text.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif s.count(":") == 1:
        host, _, p = s.partition(":")
        port = int(p)
    else:
        host, port = s, default_port
    ip = ipaddress.ip_address(host)
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return str(ip), port
