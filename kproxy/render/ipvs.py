"""Service views -> the desired IPVS state of one IP family: virtual servers, the addresses to
bind on kube-ipvs0 and the contents of kproxy's ipsets.

Pure and standard-library only; kproxy.render.ipvs_rules holds the companion iptables rules and
kproxy.render.ipvs_diff the diff against the kernel. The shape follows kube-proxy's IPVS mode
(pkg/proxy/ipvs):

- **Virtual servers.** One per ClusterIP, externalIP and LoadBalancer IP x port x protocol, and one
  per node address x nodePort. Scheduler from the service's `kproxy.io/ipvs-scheduler` annotation
  (when it names a scheduler kproxy knows) else the default; `mh` gets the mh-port flag as in
  kube-proxy. sessionAffinity ClientIP is IPVS persistence with the affinity timeout. Real servers
  are endpoints in masquerade (NAT) forwarding with weight 1: the internal endpoints
  (internalTrafficPolicy) for the ClusterIP, the external ones (externalTrafficPolicy) for the
  others.
- **kube-ipvs0.** ClusterIPs always, externalIPs and LoadBalancer IPs unless they are node
  addresses, are bound on the dummy interface so the kernel accepts them as local.
- **ipsets.** The per-service facts the companion rules need live in ipsets (kube-proxy's names;
  IPv6 sets are named KUBE-6-*), so the iptables rules are a fixed text whose size does not depend
  on the number of services.

Where kproxy differs from kube-proxy on purpose:

- **No endpoints.** A service without any usable endpoint is REJECTed for new connections (ipset
  KUBE-NO-ENDPOINTS, matched in filter KUBE-IPVS-FILTER), as in iptables mode. (IPVS alone answers
  an empty virtual server with ICMP port-unreachable too; the explicit rule also shows in
  `iptables -S`.) With internalTrafficPolicy Local and no local endpoint, ClusterIP traffic is
  DROPped (KUBE-NO-LOCAL-ENDPOINTS), as iptables mode does; kube-proxy's IPVS mode silently used
  all endpoints instead. With externalTrafficPolicy Local and no local endpoint, the external
  virtual servers keep the cluster-wide endpoints (kube-proxy's choice, so pods and the node itself
  still reach the service) and new traffic from outside the cluster is DROPped
  (KUBE-EXTERNAL-NO-LOCAL): kube-proxy forwarded it unmasqueraded to a remote pod whose reply could
  never come back.
- A loadBalancerSourceRanges entry of 0.0.0.0/0 (or ::/0) means "no filtering" (ipset cannot hold
  a /0 network).
- A virtual server two services both want (same address, protocol and port) goes to the first in
  namespace/name order; the clash is reported in `DesiredIPVS.conflicts`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kproxy.model.decisions import Verdict, node_in_source_ranges
from kproxy.model.endpoints import EndpointInfo
from kproxy.model.objects import IPV6, Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView

DUMMY_DEVICE = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh")

# IPVS service flags (include/uapi/linux/ip_vs.h)
FLAG_PERSISTENT = 0x0001
FLAG_HASHED = 0x0002  # set by the kernel on every service; ignored when comparing
FLAG_ONEPACKET = 0x0004
FLAG_SCHED1 = 0x0008  # sh-fallback / mh-fallback
FLAG_SCHED2 = 0x0010  # sh-port / mh-port
COMPARED_FLAGS = ~FLAG_HASHED & 0xFFFFFFFF

# kinds of virtual server (what the address is)
CLUSTER_IP = "cluster-ip"
EXTERNAL_IP = "external-ip"
LOAD_BALANCER = "load-balancer"
NODE_PORT = "node-port"

# -- ipsets ------------------------------------------------------------------------------------
LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP_SET = "KUBE-CLUSTER-IP"
EXTERNAL_IP_SET = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LB_SET = "KUBE-LOAD-BALANCER"
LB_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LB_FW = "KUBE-LOAD-BALANCER-FW"
LB_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LB_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"
# kproxy's own: the no-endpoint verdicts
NO_ENDPOINTS = "KUBE-NO-ENDPOINTS"
NO_LOCAL_ENDPOINTS = "KUBE-NO-LOCAL-ENDPOINTS"
EXTERNAL_NO_LOCAL = "KUBE-EXTERNAL-NO-LOCAL"


@dataclass(frozen=True, slots=True)
class SetSpec:
    """One ipset kproxy owns: its base (IPv4) name, ipset type and the comment its rules carry."""

    base: str
    type: str
    comment: str

    def name(self, family: int) -> str:
        """The set's name in `family`: kube-proxy's KUBE-6- prefix for IPv6, 31 characters max."""
        if family == IPV6 and self.base.startswith("KUBE-"):
            return ("KUBE-6-" + self.base[5:])[:31]
        return self.base

    def create_args(self, family: int) -> str:
        """The `ipset create NAME` arguments after the name."""
        if self.type.startswith("bitmap:port"):
            return f"{self.type} range 0-65535"
        inet = "inet6" if family == IPV6 else "inet"
        return f"{self.type} family {inet} hashsize 1024 maxelem 1048576"


SETS: tuple[SetSpec, ...] = (
    SetSpec(
        LOOP_BACK,
        "hash:ip,port,ip",
        "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
    ),
    SetSpec(
        CLUSTER_IP_SET,
        "hash:ip,port",
        "Kubernetes service cluster ip + port for masquerade purpose",
    ),
    SetSpec(
        EXTERNAL_IP_SET,
        "hash:ip,port",
        "Kubernetes service external ip + port for masquerade and filter purpose",
    ),
    SetSpec(
        EXTERNAL_IP_LOCAL,
        "hash:ip,port",
        "Kubernetes service external ip + port with externalTrafficPolicy=local",
    ),
    SetSpec(LB_SET, "hash:ip,port", "Kubernetes service lb portal"),
    SetSpec(
        LB_FW,
        "hash:ip,port",
        "Kubernetes service load balancer ip + port for load balancer with sourceRange",
    ),
    SetSpec(
        LB_LOCAL,
        "hash:ip,port",
        "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    ),
    SetSpec(
        LB_SOURCE_IP,
        "hash:ip,port,ip",
        "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
    ),
    SetSpec(
        LB_SOURCE_CIDR,
        "hash:ip,port,net",
        "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
    ),
    SetSpec(NODE_PORT_TCP, "bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    SetSpec(
        NODE_PORT_LOCAL_TCP,
        "bitmap:port",
        "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
    ),
    SetSpec(NODE_PORT_UDP, "bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    SetSpec(
        NODE_PORT_LOCAL_UDP,
        "bitmap:port",
        "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
    ),
    SetSpec(
        NODE_PORT_SCTP,
        "hash:ip,port",
        "Kubernetes nodeport SCTP port for masquerade purpose with type hash:ip,port",
    ),
    SetSpec(
        NODE_PORT_LOCAL_SCTP,
        "hash:ip,port",
        "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type hash:ip,port",
    ),
    SetSpec(HEALTH_CHECK_NODE_PORT, "bitmap:port", "Kubernetes health check node port"),
    SetSpec(IPVS_IPS, "hash:ip", "Addresses on the ipvs interface"),
    SetSpec(NO_ENDPOINTS, "hash:ip,port", "service has no endpoints"),
    SetSpec(
        NO_LOCAL_ENDPOINTS,
        "hash:ip,port",
        "internalTrafficPolicy Local service has no local endpoints",
    ),
    SetSpec(
        EXTERNAL_NO_LOCAL,
        "hash:ip,port",
        "externalTrafficPolicy Local service has no local endpoints",
    ),
)
SET_SPECS: Mapping[str, SetSpec] = {s.base: s for s in SETS}
# sets whose ip,proto:port entries name virtual servers kproxy owns
OWNING_SETS = (CLUSTER_IP_SET, EXTERNAL_IP_SET, EXTERNAL_IP_LOCAL, LB_SET)
NODE_PORT_SETS = {"TCP": NODE_PORT_TCP, "UDP": NODE_PORT_UDP}
NODE_PORT_LOCAL_SETS = {"TCP": NODE_PORT_LOCAL_TCP, "UDP": NODE_PORT_LOCAL_UDP}


def set_names(family: int) -> tuple[str, ...]:
    return tuple(s.name(family) for s in SETS)


# -- virtual servers ---------------------------------------------------------------------------
class VSKey(NamedTuple):
    """The identity of a virtual server: address, protocol (TCP/UDP/SCTP) and port.

    (VSKey, Dest and the observed real servers are named tuples: a table of 10,000 services x
    10 endpoints holds 100,000 of them, and a tuple is built several times faster than a frozen
    dataclass.)
    """

    address: str
    protocol: str
    port: int

    @property
    def family(self) -> int:
        return IPV6 if ":" in self.address else 4

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.protocol} {host}:{self.port}"


class Dest(NamedTuple):
    """A real server of a virtual server (masquerade forwarding)."""

    address: str
    port: int
    weight: int = 1

    @property
    def hostport(self) -> str:
        return (
            f"[{self.address}]:{self.port}"
            if ":" in self.address
            else (f"{self.address}:{self.port}")
        )


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """A desired virtual server. `service` and `kind` explain it; they are not compared."""

    key: VSKey
    scheduler: str = DEFAULT_SCHEDULER
    flags: int = 0
    timeout: int = 0  # persistence timeout in seconds (0: not persistent)
    dests: tuple[Dest, ...] = ()
    service: str = field(default="", compare=False)
    kind: str = field(default="", compare=False)

    @property
    def persistent(self) -> bool:
        return bool(self.flags & FLAG_PERSISTENT)


@dataclass(frozen=True, slots=True)
class ServiceIPVS:
    """Everything one service (all its ports, one family) contributes to the IPVS dataplane.

    `entries` are (set base name, entry text) pairs in `ipset save` form; `bind` the addresses to
    hold on kube-ipvs0.
    """

    servers: tuple[VirtualServer, ...] = ()
    entries: tuple[tuple[str, str], ...] = ()
    bind: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.servers or self.entries or self.bind)


EMPTY_SERVICE_IPVS = ServiceIPVS()


@dataclass(frozen=True, slots=True)
class DesiredIPVS:
    """The whole IPVS dataplane of one family: what the kernel should hold after a sync."""

    servers: Mapping[VSKey, VirtualServer]
    sets: Mapping[str, frozenset[str]]  # base set name -> entries
    bind: frozenset[str]
    conflicts: tuple[str, ...] = ()  # "<vs> wanted by a and b" lines (first service wins)

    @property
    def dest_count(self) -> int:
        return sum(len(vs.dests) for vs in self.servers.values())


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def set_entry(ip: str, proto: str, port: int) -> str:
    return f"{ip},{proto.lower()}:{port}"


def _net_entry(cidr: str) -> str | None:
    """An ipset `net` field in `ipset save` form (host prefixes print bare), None for /0."""
    net = ipaddress.ip_network(cidr.strip(), strict=False)
    if net.prefixlen == 0:
        return None
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def effective_scheduler(requested: str, default: str) -> str:
    """The scheduler a service gets: its annotation when valid, else `default` (else rr)."""
    if requested in SCHEDULERS:
        return requested
    return default if default in SCHEDULERS else DEFAULT_SCHEDULER


def _usable(endpoints: Sequence[EndpointInfo]) -> tuple[EndpointInfo, ...]:
    ready = tuple(e for e in endpoints if e.ready)
    return ready or tuple(e for e in endpoints if e.serving and e.terminating)


def _dests(endpoints: Iterable[EndpointInfo]) -> tuple[Dest, ...]:
    return tuple(sorted({Dest(e.ip, e.port, 1) for e in endpoints}))


@dataclass(slots=True)
class IPVSRenderer:
    """Renders services of one family for one set of options.

    `options.node_ips` must be the node's own addresses (not those on kube-ipvs0); NodePort
    virtual servers go on `options.nodeport_ips` when set, else on every node address.
    Loopback and link-local addresses never carry NodePorts.
    """

    options: ProxyOptions
    scheduler: str = DEFAULT_SCHEDULER
    _node_ips: frozenset[str] = field(init=False, default=frozenset())
    _nodeport_ips: tuple[str, ...] = field(init=False, default=())
    _node_addrs: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = field(
        init=False, default=()
    )

    def __post_init__(self) -> None:
        fam = self.options.family
        self._node_addrs = tuple(
            ip
            for ip in (ipaddress.ip_address(a) for a in self.options.node_ips)
            if ip.version == fam
        )
        self._node_ips = frozenset(str(ip) for ip in self._node_addrs)
        source = (
            self.options.node_ips
            if self.options.nodeport_ips is None
            else self.options.nodeport_ips
        )
        out: list[str] = []
        for text in source:
            ip = ipaddress.ip_address(text)
            if ip.version != fam or ip.is_loopback or ip.is_link_local:
                continue
            if str(ip) not in out:
                out.append(str(ip))
        self._nodeport_ips = tuple(sorted(out))

    @property
    def nodeport_addresses(self) -> tuple[str, ...]:
        return self._nodeport_ips

    def render_service(self, views: Sequence[ServicePortView]) -> ServiceIPVS:
        """What one service (its port views, all of this family) contributes."""
        if not views:
            return EMPTY_SERVICE_IPVS
        servers: list[VirtualServer] = []
        entries: list[tuple[str, str]] = []
        bind: list[str] = []
        for view in views:
            self._render_port(view, servers, entries, bind)
        return ServiceIPVS(
            servers=tuple(servers),
            entries=tuple(dict.fromkeys(entries)),
            bind=tuple(dict.fromkeys(bind)),
        )

    def _render_port(
        self,
        v: ServicePortView,
        servers: list[VirtualServer],
        entries: list[tuple[str, str]],
        bind: list[str],
    ) -> None:
        svc = v.service
        proto = v.port.protocol
        lproto = proto.lower()
        port = v.port.port
        name = v.name
        d = v.decision
        external_local = d.external_local

        scheduler = effective_scheduler(svc.ipvs_scheduler, self.scheduler)
        flags = 0
        timeout = 0
        if d.affinity_timeout:
            flags |= FLAG_PERSISTENT
            timeout = d.affinity_timeout
        if scheduler == "mh":
            flags |= FLAG_SCHED2  # kube-proxy's FlagSourceHash

        def server(address: str, vport: int, kind: str, dests: tuple[Dest, ...]) -> None:
            servers.append(
                VirtualServer(
                    key=VSKey(address, proto, vport),
                    scheduler=scheduler,
                    flags=flags,
                    timeout=timeout,
                    dests=dests,
                    service=name,
                    kind=kind,
                )
            )

        # hairpin: a local endpoint reaching its own service is masqueraded
        for ep in v.endpoints:
            if ep.is_local:
                entries.append((LOOP_BACK, f"{ep.ip},{lproto}:{ep.port},{ep.ip}"))

        # -- ClusterIP ---------------------------------------------------------------------
        cip = v.cluster_ip
        internal = _dests(d.internal)
        server(cip, port, CLUSTER_IP, internal)
        bind.append(cip)
        entries.append((IPVS_IPS, cip))
        cip_entry = set_entry(cip, proto, port)
        entries.append((CLUSTER_IP_SET, cip_entry))
        if d.internal_verdict is Verdict.REJECT:
            entries.append((NO_ENDPOINTS, cip_entry))
        elif d.internal_verdict is Verdict.DROP:
            entries.append((NO_LOCAL_ENDPOINTS, cip_entry))

        hc = d.health_check_node_port
        if hc:
            entries.append((HEALTH_CHECK_NODE_PORT, str(hc)))

        # -- external destinations ---------------------------------------------------------
        if not v.has_external:
            return
        # One virtual server serves external traffic from outside and from pods/the node
        # alike; under externalTrafficPolicy Local without local endpoints it gets the
        # short-circuit (cluster-wide) endpoints for pod/node traffic, and the
        # EXTERNAL_NO_LOCAL set drops what comes from outside.
        external = _dests(d.external or d.short_circuit)
        ext_verdict: str | None = None
        if d.external_verdict is Verdict.REJECT:
            ext_verdict = NO_ENDPOINTS
        elif d.external_verdict is Verdict.DROP:
            ext_verdict = EXTERNAL_NO_LOCAL

        for eip in v.external_ips:
            e = set_entry(eip, proto, port)
            entries.append((EXTERNAL_IP_LOCAL if external_local else EXTERNAL_IP_SET, e))
            if ext_verdict:
                entries.append((ext_verdict, e))
            server(eip, port, EXTERNAL_IP, external)
            if eip not in self._node_ips:
                bind.append(eip)
                entries.append((IPVS_IPS, eip))

        ranges = [_net_entry(c) for c in v.source_ranges]
        filtered = d.firewall and None not in ranges
        allow_from_node = filtered and node_in_source_ranges(
            v.source_ranges, map(ipaddress.ip_address, self.options.self_ips)
        )
        for lb in v.load_balancer_ips:
            e = set_entry(lb, proto, port)
            entries.append((LB_SET, e))
            if external_local:
                entries.append((LB_LOCAL, e))
            if filtered:
                entries.append((LB_FW, e))
                entries.extend((LB_SOURCE_CIDR, f"{e},{r}") for r in ranges if r)
                if allow_from_node:
                    entries.append((LB_SOURCE_IP, f"{e},{lb}"))
            if ext_verdict:
                entries.append((ext_verdict, e))
            server(lb, port, LOAD_BALANCER, external)
            if lb not in self._node_ips:
                bind.append(lb)
                entries.append((IPVS_IPS, lb))

        node_port = v.port.node_port
        if node_port and self._nodeport_ips:
            if proto == "SCTP":
                for ip in self._nodeport_ips:
                    e = set_entry(ip, proto, node_port)
                    entries.append((NODE_PORT_SCTP, e))
                    if external_local:
                        entries.append((NODE_PORT_LOCAL_SCTP, e))
            else:
                entries.append((NODE_PORT_SETS[proto], str(node_port)))
                if external_local:
                    entries.append((NODE_PORT_LOCAL_SETS[proto], str(node_port)))
            for ip in self._nodeport_ips:
                if ext_verdict:
                    entries.append((ext_verdict, set_entry(ip, proto, node_port)))
                server(ip, node_port, NODE_PORT, external)


def aggregate(contributions: Iterable[ServiceIPVS]) -> DesiredIPVS:
    """The desired state from per-service contributions (in priority order: on a clash of
    virtual servers the first one wins, as the first-created service does in Kubernetes)."""
    servers: dict[VSKey, VirtualServer] = {}
    sets: dict[str, set[str]] = {s.base: set() for s in SETS}
    bind: set[str] = set()
    conflicts: list[str] = []
    for c in contributions:
        for vs in c.servers:
            old = servers.get(vs.key)
            if old is None:
                servers[vs.key] = vs
            elif old.service != vs.service:
                conflicts.append(f"{vs.key} wanted by {old.service} and {vs.service}")
        for set_name, entry in c.entries:
            sets[set_name].add(entry)
        bind.update(c.bind)
    return DesiredIPVS(
        servers=servers,
        sets={k: frozenset(v) for k, v in sets.items()},
        bind=frozenset(bind),
        conflicts=tuple(conflicts),
    )


def render_desired(
    views: Mapping[Ref, Sequence[ServicePortView]],
    options: ProxyOptions,
    *,
    scheduler: str = DEFAULT_SCHEDULER,
) -> DesiredIPVS:
    """The complete desired IPVS state of one family (services in namespace/name order)."""
    renderer = IPVSRenderer(options, scheduler=scheduler)
    return aggregate(renderer.render_service(views[ref]) for ref in sorted(views))


# -- text forms --------------------------------------------------------------------------------
_SCHED_FLAG_NAMES = {"sh": ("sh-fallback", "sh-port"), "mh": ("mh-fallback", "mh-port")}


def ipvsadm_rules(servers: Iterable[VirtualServer]) -> str:
    """The `ipvsadm -R` input that programs `servers` (for comparisons and display)."""
    out: list[str] = []
    opt = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}
    for vs in sorted(servers, key=lambda v: v.key):
        k = vs.key
        where = f"{opt[k.protocol]} {_hostport(k.address, k.port)}"
        line = f"-A {where} -s {vs.scheduler}"
        names = _SCHED_FLAG_NAMES.get(vs.scheduler)
        if names:
            flags = [
                n
                for bit, n in zip((FLAG_SCHED1, FLAG_SCHED2), names, strict=True)
                if vs.flags & bit
            ]
            if flags:
                line += " -b " + ",".join(flags)
        if vs.persistent:
            line += f" -p {vs.timeout}"
        out.append(line + "\n")
        out.extend(f"-a {where} -r {d.hostport} -m -w {d.weight}\n" for d in vs.dests)
    return "".join(out)


def describe(vs: VirtualServer) -> str:
    """One line for logs: 'TCP 10.96.0.1:80 rr persistent 10800 -> 3 real servers (ns/svc:http)'."""
    extra = f" persistent {vs.timeout}" if vs.persistent else ""
    return f"{vs.key} {vs.scheduler}{extra} -> {len(vs.dests)} real servers ({vs.service})"
