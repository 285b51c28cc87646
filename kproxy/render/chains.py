"""The names of every iptables chain kproxy owns, and the jumps that hook them into the kernel.

Per-service chains are named exactly as kube-proxy names them, so that `iptables-save` output
reads the same under both and kproxy adopts a node kube-proxy programmed before it:

    KUBE-SVC-<hash>  Cluster-policy endpoints      KUBE-SVL-<hash>  Local-policy endpoints
    KUBE-EXT-<hash>  external traffic dispatch     KUBE-FW-<hash>   loadBalancerSourceRanges
    KUBE-SEP-<hash>  one endpoint (DNAT)

where <hash> is the first 16 characters of base32(sha256(portName + protocol [+ "ip:port"])),
portName is "ns/svc:port" ("ns/svc" for an unnamed port) and protocol is lower case.

The hook jumps (PREROUTING -> KUBE-SERVICES, ...) live in built-in chains that other software
shares, so they are never part of a flushing restore: the backend inserts each one only when it
is missing. Their text is written in the canonical order iptables-save prints, so presence is a
plain string comparison against `iptables -S` output.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

# -- fixed chains ------------------------------------------------------------------------------
SERVICES = "KUBE-SERVICES"  # nat and filter
EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"  # filter
NODEPORTS = "KUBE-NODEPORTS"  # nat and filter
POSTROUTING = "KUBE-POSTROUTING"  # nat
MARK_MASQ = "KUBE-MARK-MASQ"  # nat
FORWARD = "KUBE-FORWARD"  # filter
PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"  # filter
CANARY = "KUBE-PROXY-CANARY"  # mangle, nat, filter: empty, its absence means "flushed"
# kproxy-only: the "not from any cluster CIDR" test when a family has several cluster CIDRs
# (one `! -s` rule cannot express "outside all of them").
MASQ_OFF_CLUSTER = "KUBE-MARK-MASQ-OFFCLUSTER"  # nat

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
EXT_PREFIX = "KUBE-EXT-"
FW_PREFIX = "KUBE-FW-"
SEP_PREFIX = "KUBE-SEP-"
# per-service chains of older kube-proxy versions: removed when found, never created
LEGACY_PREFIXES = ("KUBE-XLB-",)
SERVICE_PREFIXES = (SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX)

NAT_FIXED = (SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ)
# nat chains whose content depends only on the options and that service chains jump to
NAT_FIXED_TARGETS = (MARK_MASQ, MASQ_OFF_CLUSTER)
FILTER_FIXED = (SERVICES, EXTERNAL_SERVICES, FORWARD, NODEPORTS, PROXY_FIREWALL)

# Every fixed chain kproxy owns per table (cleanup removes exactly these plus service chains).
# KUBE-FIREWALL, KUBE-MARK-DROP, KUBE-KUBELET-CANARY and KUBE-IPTABLES-HINT belong to kubelet.
OWNED_FIXED: dict[str, tuple[str, ...]] = {
    "nat": (*NAT_FIXED, MASQ_OFF_CLUSTER, CANARY),
    "filter": (*FILTER_FIXED, CANARY),
    "mangle": (CANARY,),
}

BUILTIN = {
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
}


def is_service_chain(name: str) -> bool:
    """True for a per-service chain kproxy (or kube-proxy) creates and may therefore delete."""
    return name.startswith(SERVICE_PREFIXES) or name.startswith(LEGACY_PREFIXES)


def is_owned(table: str, name: str) -> bool:
    """True for any chain of `table` that kproxy owns."""
    return name in OWNED_FIXED.get(table, ()) or (table == "nat" and is_service_chain(name))


# -- hashing -----------------------------------------------------------------------------------
def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode("ascii")


def port_hash(port_name: str, protocol: str) -> str:
    """kube-proxy's portProtoHash: 16 base32 characters of sha256(portName + protocol).

    Not cached: portName is "ns/svc:port", so hashes do not repeat across services, and a
    cache held ~2 MB at 10k services to save ~0.1 s of a full render."""
    return _hash16(port_name + protocol.lower())


def svc_chain(port_name: str, protocol: str) -> str:
    return SVC_PREFIX + port_hash(port_name, protocol)


def svl_chain(port_name: str, protocol: str) -> str:
    return SVL_PREFIX + port_hash(port_name, protocol)


def ext_chain(port_name: str, protocol: str) -> str:
    return EXT_PREFIX + port_hash(port_name, protocol)


def fw_chain(port_name: str, protocol: str) -> str:
    return FW_PREFIX + port_hash(port_name, protocol)


def sep_chain(port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP name for `endpoint` ("ip:port", "[ip6]:port") of a service port."""
    return SEP_PREFIX + _hash16(port_name + protocol.lower() + endpoint)


# -- hooks -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hook:
    """One jump from a built-in chain into a kproxy chain, e.g. nat PREROUTING -> KUBE-SERVICES.

    `spec` is the rule without "-A CHAIN", in iptables-save's canonical form.
    """

    table: str
    chain: str
    spec: str

    @property
    def target(self) -> str:
        return self.spec.rsplit("-j ", 1)[1]

    @property
    def line(self) -> str:
        """The rule as iptables-save prints it."""
        return f"-A {self.chain} {self.spec}"


_NEW = "-m conntrack --ctstate NEW "

# In kube-proxy's order: each is inserted at the top of its chain in turn, so the last one listed
# for a chain ends up first.
HOOKS: tuple[Hook, ...] = (
    Hook(
        "filter",
        "INPUT",
        _NEW + '-m comment --comment "kubernetes externally-visible service portals" '
        "-j " + EXTERNAL_SERVICES,
    ),
    Hook(
        "filter",
        "FORWARD",
        _NEW + '-m comment --comment "kubernetes externally-visible service portals" '
        "-j " + EXTERNAL_SERVICES,
    ),
    Hook(
        "filter",
        "INPUT",
        '-m comment --comment "kubernetes health check service ports" -j ' + NODEPORTS,
    ),
    Hook(
        "filter",
        "FORWARD",
        _NEW + '-m comment --comment "kubernetes service portals" -j ' + SERVICES,
    ),
    Hook(
        "filter",
        "OUTPUT",
        _NEW + '-m comment --comment "kubernetes service portals" -j ' + SERVICES,
    ),
    Hook("filter", "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j ' + FORWARD),
    Hook(
        "filter",
        "INPUT",
        _NEW + '-m comment --comment "kubernetes load balancer firewall" -j ' + PROXY_FIREWALL,
    ),
    Hook(
        "filter",
        "OUTPUT",
        _NEW + '-m comment --comment "kubernetes load balancer firewall" -j ' + PROXY_FIREWALL,
    ),
    Hook(
        "filter",
        "FORWARD",
        _NEW + '-m comment --comment "kubernetes load balancer firewall" -j ' + PROXY_FIREWALL,
    ),
    Hook("nat", "OUTPUT", '-m comment --comment "kubernetes service portals" -j ' + SERVICES),
    Hook("nat", "PREROUTING", '-m comment --comment "kubernetes service portals" -j ' + SERVICES),
    Hook(
        "nat",
        "POSTROUTING",
        '-m comment --comment "kubernetes postrouting rules" -j ' + POSTROUTING,
    ),
)


def hooks_for(table: str, chain: str) -> tuple[Hook, ...]:
    """The hooks of one built-in chain, in the order they appear in it once installed."""
    return tuple(reversed([h for h in HOOKS if h.table == table and h.chain == chain]))
