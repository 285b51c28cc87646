"""Settings the dataplane renderers need, independent of where they came from (flags, file)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """How this node proxies, for one IP family.

    nodeport_ips: the local addresses that accept NodePorts; None means every local address
    (kube-proxy's `--nodeport-addresses` unset: `-m addrtype --dst-type LOCAL`).
    nodeport_cidrs: `--nodeport-addresses` of this family, from which nodeport_ips are read
    (empty: every address).
    cluster_cidrs: traffic from outside these is masqueraded when it goes to a ClusterIP;
    empty means "unknown", in which case only masquerade_all masquerades ClusterIP traffic.
    primary_ips: the node's primary addresses (kube-proxy's --node-ip-override); None means
    any of node_ips. A LoadBalancer's source ranges that contain one also admit its LB IPs.
    """

    family: int = 4
    node_name: str = ""
    node_ips: tuple[str, ...] = ()
    nodeport_ips: tuple[str, ...] | None = None
    nodeport_cidrs: tuple[str, ...] = ()
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    primary_ips: tuple[str, ...] | None = None

    @property
    def self_ips(self) -> tuple[str, ...]:
        """The addresses that count as "the node itself" for LoadBalancer source ranges."""
        return self.node_ips if self.primary_ips is None else self.primary_ips

    @property
    def masq_mark(self) -> str:
        """The fwmark/mask text used to mark packets for masquerade, e.g. 0x4000/0x4000."""
        bit = 1 << self.masquerade_bit
        return f"{bit:#x}/{bit:#x}"
