"""Read `ipvsadm` the way a person does, and write its `-R` input: the independent check on what
kproxy's netlink adapter programs.

Pure (text in, objects out); `ipvsadm` itself is run by the tests. Parses the listings of
`ipvsadm -Ln`, `-Ln --persistent-conn` and `-Ln --stats --exact` with its own reader (it imports
nothing from kproxy, so a mistake in kproxy's listing parser, kproxy.inspect.ipvsadm, cannot
hide one in what the tests check); `restore_text` writes listed services back as `ipvsadm -R`
input, line for line what `ipvsadm -Sn` saves (used by the benchmark and by the tests that program
with ipvsadm and read back with the adapter). It knows nothing of kproxy's IPVS types: its input
is what it parses, so what kproxy programs and what this module expects are two separate
descriptions of the kernel's table.

The reader takes the column names from the listing's own header lines (``Forward Weight
ActiveConn InActConn``, ``Weight PersistConn ...``, ``Conns InPkts ...``) and refuses a line it
does not understand (ValueError) rather than skipping it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>\d+)$")
# after "PROTO ADDRESS:PORT SCHEDULER": "(flag,...)", "persistent N", "mask M", "ops"
_SERVICE_WORDS = re.compile(
    r"\((?P<flags>[\w,-]+)\)|persistent (?P<timeout>\d+)|mask (?P<mask>\S+)|(?P<ops>ops)"
)


def endpoint(text: str) -> tuple[str, int]:
    """'10.0.0.1:80' / '[fd00::1]:443' -> (address, port); ValueError for anything else."""
    m = _ENDPOINT.match(text)
    if m is None:
        raise ValueError(f"not an address:port: {text!r}")
    return m["v6"] or m["v4"], int(m["port"])


@dataclass(frozen=True)
class _Row:
    """One service line (`service` True) or real-server line of a listing: its address, port,
    protocol (services) and the words under the header's column names."""

    service: bool
    protocol: str
    address: str
    port: int
    rest: str  # service lines: what follows the address (scheduler, flags, ...)
    columns: dict[str, str]


def _rows(text: str) -> Iterator[_Row]:
    service_cols: list[str] = []
    dest_cols: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or line.startswith("IP Virtual Server version"):
            continue
        if words[:2] == ["Prot", "LocalAddress:Port"]:
            service_cols = [] if words[2:] == ["Scheduler", "Flags"] else words[2:]
            continue
        if words[:2] == ["->", "RemoteAddress:Port"]:
            # the real-server columns: on this line, else (--persistent-conn) on the Prot line
            dest_cols = words[2:] or service_cols
            continue
        if words[0] == "->":
            address, port = endpoint(words[1])
            if len(words[2:]) != len(dest_cols):
                raise ValueError(
                    f"real-server line does not match the header {dest_cols}: {line!r}"
                )
            yield _Row(False, "", address, port, "", dict(zip(dest_cols, words[2:], strict=True)))
            continue
        if words[0] == "FWM" and words[1].isdigit():  # a firewall-mark service: no address
            address, port = "", int(words[1])
        elif words[0] in ("TCP", "UDP", "SCTP"):
            address, port = endpoint(words[1])
        else:
            raise ValueError(f"unexpected ipvsadm line: {line!r}")
        rest = line.split(None, 2)[2] if len(words) > 2 else ""
        # numbers under the Prot line's columns (--stats), else a scheduler and its options
        numeric = len(words) > 2 and words[2].isdigit()
        columns = dict(zip(service_cols, words[2:], strict=True)) if numeric else {}
        yield _Row(True, words[0], address, port, rest, columns)


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
    """`ipvsadm -Ln` or `ipvsadm -Ln --persistent-conn` -> {(address, protocol, port): service}."""
    out: dict[tuple[str, str, int], ListedService] = {}
    current: ListedService | None = None
    for row in _rows(text):
        if row.service:
            scheduler, _, options = row.rest.partition(" ")
            current = ListedService(row.protocol, row.address, row.port, scheduler)
            _read_options(current, options)
            out[current.key] = current
            continue
        if current is None:
            raise ValueError("a real server before any service")
        cols = row.columns
        forward = cols.get("Forward")
        persist = cols.get("PersistConn")
        current.dests[(row.address, row.port)] = ListedDest(
            row.address,
            row.port,
            int(cols["Weight"]),
            forward.lower() if forward is not None else None,
            int(cols["ActiveConn"]),
            int(cols["InActConn"]),
            int(persist) if persist is not None else None,
        )
    return out


def _read_options(service: ListedService, options: str) -> None:
    """Fill `service` from the words after its scheduler; ValueError for a word it cannot read."""
    leftover = _SERVICE_WORDS.sub("", options).strip()
    if leftover:
        raise ValueError(f"unknown service options {leftover!r} in {options!r}")
    for m in _SERVICE_WORDS.finditer(options):
        if m["flags"]:
            service.sched_flags = tuple(m["flags"].split(","))
        elif m["timeout"]:
            service.persistent = int(m["timeout"])
        elif m["mask"]:
            service.mask = m["mask"]
        elif m["ops"]:
            service.one_packet = True


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
    dests: dict[tuple[str, int], ListedStats] | None = None
    for row in _rows(text):
        stats = ListedStats(*(int(row.columns[c]) for c in _STATS_COLUMNS))
        if row.service:
            dests = {}
            out[(row.address, row.protocol, row.port)] = (stats, dests)
        elif dests is None:
            raise ValueError("a real server before any service")
        else:
            dests[(row.address, row.port)] = stats
    return out


_STATS_COLUMNS = ("Conns", "InPkts", "OutPkts", "InBytes", "OutBytes")


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
