"""Read `ipvsadm` the way a person does, and write its `-R` input: the independent check on what
kproxy's netlink adapter programs.

Pure (text in, objects out); `ipvsadm` itself is run by the tests. Parses the listings of
`ipvsadm -Ln`, `-Ln --persistent-conn` and `-Ln --stats --exact`; `restore_text` renders a table of
`VirtualServer`/`RealServer` objects as `ipvsadm -R` input (used by the benchmark and by the tests
that program with ipvsadm and read back with the adapter).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kproxy.backends.ipvs_netlink import (
    FLAG_ONEPACKET,
    FLAG_SCHED1,
    FLAG_SCHED2,
    RealServer,
    VirtualServer,
)
from kproxy.inspect.ipvsadm import hostport, parse_listing, split_hostport

FORWARD_OPTIONS = {"masq": "-m", "route": "-g", "tunnel": "-i"}
PROTO_OPTIONS = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}
SCHED_FLAG_NAMES = {
    "sh": ("sh-fallback", "sh-port"),
    "mh": ("mh-fallback", "mh-port"),
}


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


def expected_listing(vs: VirtualServer) -> ListedService:
    """What `ipvsadm -Ln` shows for a virtual server programmed as `vs` (without real servers)."""
    names = SCHED_FLAG_NAMES.get(vs.scheduler, ("flag-1", "flag-2"))
    flags = tuple(
        n for bit, n in zip((FLAG_SCHED1, FLAG_SCHED2), names, strict=True) if vs.flags & bit
    )
    mask: str | None = None
    if vs.timeout and vs.netmask is not None:
        mask = str(vs.netmask) if ":" in vs.address else _mask4(vs.netmask)
    return ListedService(
        vs.protocol,
        vs.address,
        vs.port,
        vs.scheduler,
        sched_flags=flags,
        persistent=vs.timeout or None,
        mask=mask,
        one_packet=bool(vs.flags & FLAG_ONEPACKET),
    )


def restore_text(table: Mapping[VirtualServer, Iterable[RealServer]]) -> str:
    """`ipvsadm -R` input that programs `table` (virtual server -> its real servers)."""
    out: list[str] = []
    for vs, dests in table.items():
        where = f"{PROTO_OPTIONS[vs.protocol]} {hostport(vs.address, vs.port)}"
        line = f"-A {where} -s {vs.scheduler}"
        names = SCHED_FLAG_NAMES.get(vs.scheduler)
        if names:
            flags = [
                n
                for bit, n in zip((FLAG_SCHED1, FLAG_SCHED2), names, strict=True)
                if vs.flags & bit
            ]
            if flags:
                line += " -b " + ",".join(flags)
        if vs.timeout:
            line += f" -p {vs.timeout}"
            if vs.netmask is not None:
                line += f" -M {vs.netmask}" if ":" in vs.address else f" -M {_mask4(vs.netmask)}"
        if vs.flags & FLAG_ONEPACKET:
            line += " -o"
        out.append(line)
        for rs in dests:
            fwd = FORWARD_OPTIONS[rs.forward]
            extra = ""
            if rs.u_threshold:
                extra += f" -x {rs.u_threshold}"
            if rs.l_threshold:
                extra += f" -y {rs.l_threshold}"
            out.append(f"-a {where} -r {hostport(rs.address, rs.port)} {fwd} -w {rs.weight}{extra}")
    return "\n".join(out) + "\n"


def _mask4(plen: int) -> str:
    bits = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
    return ".".join(str((bits >> s) & 0xFF) for s in (24, 16, 8, 0))
