"""`ipvsadm -Ln` text -> virtual servers and real servers (pure), for `status` and `explain`, and
for the VM tests that check kproxy's netlink programming against what ipvsadm shows. Reads the
plain listing and `-Ln --persistent-conn` (whose real-server lines carry a persistent-connection
count instead of the forwarding method)."""

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
    persist: int | None = None  # only in --persistent-conn listings (forward is "" there)

    @property
    def hostport(self) -> str:
        return hostport(self.address, self.port)


@dataclass(slots=True)
class VirtualService:
    protocol: str  # TCP, UDP, SCTP, FWM
    address: str
    port: int
    scheduler: str
    flags: tuple[str, ...] = ()  # scheduler flags: sh-fallback, sh-port, mh-port, ...
    persistent: int | None = None  # persistence timeout in seconds
    mask: str | None = None  # persistence netmask
    one_packet: bool = False  # "ops": one-packet scheduling
    reals: list[RealServer] = field(default_factory=list)

    @property
    def hostport(self) -> str:
        return hostport(self.address, self.port)

    def shares(self) -> dict[str, float] | None:
        """Each real server's share of new connections, when the scheduler makes it predictable
        (rr/wrr: by weight; weight 0 takes none). None otherwise."""
        if self.scheduler not in SHARE_BY_WEIGHT:
            return None
        total = sum(r.weight for r in self.reals)
        if total <= 0:
            return {r.hostport: 0.0 for r in self.reals}
        return {r.hostport: r.weight / total for r in self.reals}


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def split_hostport(text: str) -> tuple[str, int]:
    """'10.0.0.1:80' / '[fd00::1]:443' -> (address, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def parse_listing(text: str) -> list[VirtualService]:
    """`ipvsadm -Ln` or `ipvsadm -Ln --persistent-conn` -> virtual services in listing order."""
    out: list[VirtualService] = []
    current: VirtualService | None = None
    persistent_layout = False
    for line in text.splitlines():
        words = line.split()
        if not words or line.startswith("IP Virtual Server"):
            continue
        if words[0] == "Prot":
            persistent_layout = "PersistConn" in words
            continue
        if words[0] == "->":
            if words[1] == "RemoteAddress:Port" or current is None or len(words) < 6:
                continue
            address, port = split_hostport(words[1])
            if persistent_layout:
                weight, persist, active, inactive = (int(w) for w in words[2:6])
                real = RealServer(address, port, "", weight, active, inactive, persist)
            else:
                forward = FORWARD_WORDS.get(words[2], words[2].lower())
                weight, active, inactive = (int(w) for w in words[3:6])
                real = RealServer(address, port, forward, weight, active, inactive)
            current.reals.append(real)
            continue
        if words[0] == "FWM":
            current = VirtualService("FWM", "", int(words[1]), words[2])
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
            elif w == "mask" and i + 1 < len(rest):
                current.mask = rest[i + 1]
                i += 1
            elif w == "ops":
                current.one_packet = True
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
