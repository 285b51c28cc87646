"""Read `ipvsadm` the way a person does, and write its `-R` input: the independent check on what
kproxy's netlink adapter programs.

Pure (text in, objects out); `ipvsadm` itself is run by the tests. Parses the listings of
`ipvsadm -Ln`, `-Ln --persistent-conn` and `-Ln --stats --exact`; `restore_text` writes listed
services back as `ipvsadm -R` input, line for line what `ipvsadm -Sn` saves (used by the benchmark
and by the tests that program with ipvsadm and read back with the adapter). It knows nothing of
kproxy's IPVS types: its input is what it parses, so what kproxy programs and what this module
expects are two separate descriptions of the kernel's table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kproxy.inspect.ipvsadm import parse_listing, split_hostport


@dataclass
class ListedDest:
    address: str
    port: int
    weight: int
    forward: str | None = None  # absent from --persistent-conn listings
    active: int = 0
    inactive: int = 0
    persist: int | None = None  # only in --persistent-conn listings


@dataclass
class ListedService:
    protocol: str
    address: str
    port: int
    scheduler: str
    sched_flags: tuple[str, ...] = ()
    persistent: int | None = None  # timeout seconds
    mask: str | None = None
    one_packet: bool = False
    dests: dict[tuple[str, int], ListedDest] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.address, self.protocol, self.port)


def parse_list(text: str) -> dict[tuple[str, str, int], ListedService]:
    """`ipvsadm -Ln` or `ipvsadm -Ln --persistent-conn` -> {(address, protocol, port): service},
    read by kproxy's own listing parser (kproxy.inspect.ipvsadm) and keyed for lookups."""
    out: dict[tuple[str, str, int], ListedService] = {}
    for vs in parse_listing(text):
        listed = ListedService(
            vs.protocol,
            vs.address,
            vs.port,
            vs.scheduler,
            sched_flags=vs.flags,
            persistent=vs.persistent,
            mask=vs.mask,
            one_packet=vs.one_packet,
        )
        for r in vs.reals:
            listed.dests[(r.address, r.port)] = ListedDest(
                r.address, r.port, r.weight, r.forward or None, r.active, r.inactive, r.persist
            )
        out[listed.key] = listed
    return out


@dataclass(frozen=True)
class ListedStats:
    conns: int
    inpkts: int
    outpkts: int
    inbytes: int
    outbytes: int


def parse_stats(
    text: str,
) -> dict[tuple[str, str, int], tuple[ListedStats, dict[tuple[str, int], ListedStats]]]:
    """`ipvsadm -Ln --stats --exact` -> {service key: (stats, {dest key: stats})}."""
    out: dict[tuple[str, str, int], tuple[ListedStats, dict[tuple[str, int], ListedStats]]] = {}
    dests: dict[tuple[str, int], ListedStats] = {}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] in ("IP", "Prot") or words[1] == "RemoteAddress:Port":
            continue
        if words[0] == "->":
            address, port = split_hostport(words[1])
            dests[(address, port)] = ListedStats(*(int(w) for w in words[2:7]))
            continue
        address, port = split_hostport(words[1])
        dests = {}
        out[(address, words[0], port)] = (ListedStats(*(int(w) for w in words[2:7])), dests)
    return out


# ipvsadm(8): "-m, --masquerading", "-g, --gatewaying" (direct routing), "-i, --ipip" (tunnel)
_PACKET_FORWARDING = {"masq": "-m", "route": "-g", "tunnel": "-i"}
_SERVICE_OPTION = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}


def _endpoint(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}"


def restore_text(services: Iterable[ListedService]) -> str:
    """The `ipvsadm -R` input that recreates `services`, in `ipvsadm -Sn`'s words and order:

    -A -t 10.0.0.4:81 -s lblcr -p 100 -M 255.255.255.0 -b flag,... -o
    -a -t 10.0.0.4:81 -r 10.1.0.9:81 -g -w 1
    """
    lines: list[str] = []
    for svc in services:
        vip = (_SERVICE_OPTION[svc.protocol], _endpoint(svc.address, svc.port))
        words = ["-A", *vip, "-s", svc.scheduler]
        if svc.persistent is not None:
            words += ["-p", str(svc.persistent)]
            if svc.mask is not None:
                words += ["-M", svc.mask]
        if svc.sched_flags:
            words += ["-b", ",".join(svc.sched_flags)]
        if svc.one_packet:
            words.append("-o")
        lines.append(" ".join(words))
        for rs in svc.dests.values():
            hop = _PACKET_FORWARDING[rs.forward or "masq"]
            real = _endpoint(rs.address, rs.port)
            lines.append(" ".join(["-a", *vip, "-r", real, hop, "-w", str(rs.weight)]))
    return "".join(line + "\n" for line in lines)
