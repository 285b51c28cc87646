"""Settings the dataplane renderers need, independent of where they came from (flags, file)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """How this node proxies, for one IP family.

    nodeport_ips: the local addresses that accept NodePorts; None means every local address
    (kube-proxy's `--nodeport-addresses` unset: `-m addrtype --dst-type LOCAL`).
    cluster_cidrs: traffic from outside these is masqueraded when it goes to a ClusterIP;
    empty means "unknown", in which case only masquerade_all masquerades ClusterIP traffic.
    """

    family: int = 4
    node_name: str = ""
    node_ips: tuple[str, ...] = ()
    nodeport_ips: tuple[str, ...] | None = None
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14

    @property
    def masq_mark(self) -> str:
        """The fwmark/mask text used to mark packets for masquerade, e.g. 0x4000/0x4000."""
        bit = 1 << self.masquerade_bit
        return f"{bit:#x}/{bit:#x}"
