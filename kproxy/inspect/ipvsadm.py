"""`ipvsadm -Ln` text -> virtual servers and real servers (pure), for `status` and `explain`."""

from __future__ import annotations

from dataclasses import dataclass, field

FORWARD_WORDS = {"Masq": "masq", "Local": "local", "Tunnel": "tunnel", "Route": "route"}

SCHEDULER_TEXT = {
    "rr": "round robin: each new connection goes to the next real server",
    "wrr": "weighted round robin: new connections in proportion to the weights",
    "lc": "least connection: the real server with the fewest active connections",
    "wlc": "weighted least connection: fewest connections relative to weight",
    "lblc": "locality-based least connection (by destination address)",
    "lblcr": "locality-based least connection with replication",
    "sh": "source hashing: the client address picks the real server",
    "dh": "destination hashing",
    "sed": "shortest expected delay",
    "nq": "never queue: an idle real server first, else shortest expected delay",
    "mh": "maglev hashing: the client address (and port with mh-port) picks the real server",
}
# schedulers whose choice depends only on weights (shares can be predicted)
SHARE_BY_WEIGHT = ("rr", "wrr")


@dataclass(frozen=True, slots=True)
class RealServer:
    address: str
    port: int
    forward: str
    weight: int
    active: int = 0
    inactive: int = 0

    @property
    def hostport(self) -> str:
        return (
            f"[{self.address}]:{self.port}"
            if ":" in self.address
            else (f"{self.address}:{self.port}")
        )


@dataclass(slots=True)
class VirtualService:
    protocol: str  # TCP, UDP, SCTP, FWM
    address: str
    port: int
    scheduler: str
    flags: tuple[str, ...] = ()
    persistent: int | None = None
    reals: list[RealServer] = field(default_factory=list)

    @property
    def hostport(self) -> str:
        return (
            f"[{self.address}]:{self.port}"
            if ":" in self.address
            else (f"{self.address}:{self.port}")
        )

    def shares(self) -> dict[str, float] | None:
        """Each real server's share of new connections, when the scheduler makes it predictable
        (rr/wrr: by weight; weight 0 takes none). None otherwise."""
        if self.scheduler not in SHARE_BY_WEIGHT:
            return None
        total = sum(r.weight for r in self.reals)
        if total <= 0:
            return {r.hostport: 0.0 for r in self.reals}
        return {r.hostport: r.weight / total for r in self.reals}


def split_hostport(text: str) -> tuple[str, int]:
    """'10.0.0.1:80' / '[fd00::1]:443' -> (address, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def parse_listing(text: str) -> list[VirtualService]:
    """`ipvsadm -Ln` -> virtual services in listing order."""
    out: list[VirtualService] = []
    current: VirtualService | None = None
    for line in text.splitlines():
        words = line.split()
        if not words or line.startswith("IP Virtual Server") or words[0] == "Prot":
            continue
        if words[0] == "->":
            if words[1] == "RemoteAddress:Port" or current is None or len(words) < 6:
                continue
            address, port = split_hostport(words[1])
            current.reals.append(
                RealServer(
                    address,
                    port,
                    FORWARD_WORDS.get(words[2], words[2].lower()),
                    int(words[3]),
                    int(words[4]),
                    int(words[5]),
                )
            )
            continue
        if words[0] == "FWM":
            current = VirtualService("FWM", "", int(words[1]), words[2])
            rest = words[3:]
        else:
            address, port = split_hostport(words[1])
            current = VirtualService(words[0], address, port, words[2])
            rest = words[3:]
        i = 0
        while i < len(rest):
            w = rest[i]
            if w.startswith("(") and w.endswith(")"):
                current.flags = tuple(w[1:-1].split(","))
            elif w == "persistent" and i + 1 < len(rest):
                current.persistent = int(rest[i + 1])
                i += 1
            i += 1
        out.append(current)
    return out


def find(
    services: list[VirtualService], *, protocol: str, address: str, port: int
) -> VirtualService | None:
    for vs in services:
        if vs.protocol == protocol.upper() and vs.address == address and vs.port == port:
            return vs
    return None
