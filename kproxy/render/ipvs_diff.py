"""The diff of a desired IPVS table against the one the kernel holds, and kproxy's ownership rule.

Pure and standard-library only. With kproxy.render.ipvs (VSKey, VirtualServer, Dest) this module
is the whole IPVS vocabulary: the observed records, the operations and the plan here are what the
netlink codec (kproxy.backends.ipvs_netlink) encodes and decodes as they are, so nothing between
render and the kernel translates. Desired types carry only what kproxy sets; what only the
kernel knows (forwarding method, netmask, connection counts, counters) is on the observed ones.

**Ownership** (what the diff may delete): a virtual server is kproxy's when its address is bound
on kube-ipvs0, when its ip,proto:port is in one of kproxy's service ipsets (KUBE-CLUSTER-IP,
KUBE-EXTERNAL-IP(-LOCAL), KUBE-LOAD-BALANCER), or when its port is in KUBE-NODE-PORT-<PROTO>
(nodePorts are reserved for Kubernetes by the apiserver) or its ip,sctp:port in
KUBE-NODE-PORT-SCTP-HASH. All of it is kernel state, so ownership survives restarts; any other
virtual server on the host is never touched.

**Graceful termination.** A real server that is no longer wanted first gets weight 0 (no new
connections); it is deleted once `active + inactive` connections are 0. UDP and SCTP real servers
are deleted at once (no connection state to drain; expire_nodest_conn cleans up). A wanted real
server found with weight 0 (it was draining and came back) is restored to weight 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kproxy.render.ipvs import (
    COMPARED_FLAGS,
    NODE_PORT_SCTP,
    NODE_PORT_SETS,
    OWNING_SETS,
    Dest,
    VirtualServer,
    VSKey,
    set_entry,
)


@dataclass(frozen=True, slots=True)
class Stats:
    """Kernel counters of a virtual or real server (cumulative since it was created)."""

    conns: int = 0
    inpkts: int = 0
    outpkts: int = 0
    inbytes: int = 0
    outbytes: int = 0


class ObservedDest(NamedTuple):
    """A real server as the kernel reports it (netlink dump or /proc/net/ip_vs): the desired
    `Dest` fields plus the kernel-only facts kproxy reads but never sets (forwarding method,
    connection counts, counters). A named tuple: a dump builds 100,000 of them."""

    address: str
    port: int
    weight: int
    active: int = 0
    inactive: int = 0
    forward: str = "masq"  # masq, local, tunnel, route, bypass
    persist: int = 0
    stats: Stats | None = None

    @property
    def connections(self) -> int:
        return self.active + self.inactive


@dataclass(frozen=True, slots=True)
class ObservedVS:
    """A virtual server as the kernel reports it. `flags` never holds the kernel's HASHED bit
    (the decoders drop it); `netmask` is the persistence granularity as a prefix length (None:
    one address) and `stats` the counters, both kernel-only: kproxy never sets them."""

    key: VSKey
    scheduler: str
    flags: int = 0
    timeout: int = 0
    dests: tuple[ObservedDest, ...] = ()
    netmask: int | None = None
    stats: Stats | None = field(default=None, compare=False)


# -- operations: what the diff emits and kproxy.backends.ipvs_netlink encodes, as they are ------
@dataclass(frozen=True, slots=True)
class AddVS:
    """Create a virtual server *with all its real servers* (`vs.dests`): the encoder sends one
    request for the service and one per real server, without 100,000 op objects in between."""

    vs: VirtualServer


@dataclass(frozen=True, slots=True)
class EditVS:
    vs: VirtualServer


@dataclass(frozen=True, slots=True)
class DelVS:
    key: VSKey


@dataclass(frozen=True, slots=True)
class AddDest:
    key: VSKey
    dest: Dest


@dataclass(frozen=True, slots=True)
class EditDest:
    """Set an existing real server's weight (0: draining; 1: in service)."""

    key: VSKey
    dest: Dest


@dataclass(frozen=True, slots=True)
class DelDest:
    key: VSKey
    address: str
    port: int


Op = AddVS | EditVS | DelVS | AddDest | EditDest | DelDest


@dataclass(frozen=True, slots=True)
class Plan:
    """The ordered operations that turn the observed table into the desired one.

    Order: virtual servers deleted, added (each with its real servers), edited; then the real
    servers of existing virtual servers deleted, re-weighted, added. `draining` names the
    virtual servers that still hold weight-0 real servers with connections after the plan (the
    next sync must look at them again).
    """

    ops: tuple[Op, ...] = ()
    draining: frozenset[VSKey] = frozenset()

    @property
    def empty(self) -> bool:
        return not self.ops

    def count(self, kind: type) -> int:
        return sum(1 for op in self.ops if isinstance(op, kind))

    @property
    def dests_added(self) -> int:
        """Real servers added, those of new virtual servers included."""
        return self.count(AddDest) + sum(
            len(op.vs.dests) for op in self.ops if isinstance(op, AddVS)
        )


def _vs_equal(desired: VirtualServer, observed: ObservedVS) -> bool:
    return (
        desired.scheduler == observed.scheduler
        and (desired.flags & COMPARED_FLAGS) == (observed.flags & COMPARED_FLAGS)
        and (not desired.persistent or desired.timeout == observed.timeout)
    )


def diff_dests(
    key: VSKey, desired: Sequence[Dest], observed: Sequence[ObservedDest]
) -> tuple[list[Op], list[Op], list[Op], bool]:
    """(deletes, edits, adds, still draining) for the real servers of one virtual server."""
    want = {(d.address, d.port): d for d in desired}
    dels: list[Op] = []
    edits: list[Op] = []
    adds: list[Op] = []
    draining = False
    immediate = key.protocol != "TCP"
    seen: set[tuple[str, int]] = set()
    for od in observed:
        ident = (od.address, od.port)
        seen.add(ident)
        d = want.get(ident)
        if d is not None:
            if od.weight != d.weight or od.forward != "masq":
                edits.append(EditDest(key, d))
            continue
        if immediate or od.connections == 0:
            dels.append(DelDest(key, od.address, od.port))
        elif od.weight != 0:
            edits.append(EditDest(key, Dest(od.address, od.port, 0)))
            draining = True
        else:
            draining = True
    for ident, d in want.items():
        if ident not in seen:
            adds.append(AddDest(key, d))
    return dels, edits, adds, draining


def diff_ipvs(
    desired: Mapping[VSKey, VirtualServer],
    observed: Mapping[VSKey, ObservedVS],
    *,
    owned: Callable[[VSKey], bool],
) -> Plan:
    """The plan that makes the kernel's virtual servers `observed` match `desired`.

    Only virtual servers that are desired or for which `owned(key)` holds are touched; see the
    module docstring for what kproxy owns. Callers may pass a subset of both sides (a partial
    sync): keys absent from `observed` are created, keys absent from `desired` are deleted when
    owned.
    """
    vs_dels: list[Op] = []
    vs_adds: list[Op] = []
    vs_edits: list[Op] = []
    dels: list[Op] = []
    edits: list[Op] = []
    adds: list[Op] = []
    draining: set[VSKey] = set()
    for key in observed:
        if key not in desired and owned(key):
            vs_dels.append(DelVS(key))
    for key, vs in desired.items():
        found = observed.get(key)
        if found is None:
            vs_adds.append(AddVS(vs))
            continue
        if not _vs_equal(vs, found):
            vs_edits.append(EditVS(vs))
        d, e, a, drain = diff_dests(key, vs.dests, found.dests)
        dels.extend(d)
        edits.extend(e)
        adds.extend(a)
        if drain:
            draining.add(key)
    return Plan(
        ops=(*vs_dels, *vs_adds, *vs_edits, *dels, *edits, *adds),
        draining=frozenset(draining),
    )


def owner_predicate(
    *,
    bound: Iterable[str],
    sets: Mapping[str, Iterable[str]],
) -> Callable[[VSKey], bool]:
    """kproxy's ownership rule (module docstring) over kernel state: the addresses bound on
    kube-ipvs0 and the observed contents of kproxy's ipsets (keyed by base name)."""
    bound_set = frozenset(bound)
    keyed: set[str] = set()
    for base in OWNING_SETS:
        keyed.update(sets.get(base, ()))
    node_ports: dict[str, frozenset[str]] = {
        proto: frozenset(sets.get(base, ())) for proto, base in NODE_PORT_SETS.items()
    }
    sctp = frozenset(sets.get(NODE_PORT_SCTP, ()))

    def owned(key: VSKey) -> bool:
        if key.address in bound_set:
            return True
        entry = set_entry(key.address, key.protocol, key.port)
        if entry in keyed:
            return True
        if key.protocol == "SCTP":
            return entry in sctp
        return str(key.port) in node_ports.get(key.protocol, frozenset())

    return owned
