"""In-memory test doubles of kproxy's own dataplane interfaces (never of subprocess, pyroute2 or
kubernetes): an iptables `Restorer` that records every restore input and can refuse some, a
`Run` that answers iptables-save from what was restored, and IPVSProxier's collaborators (IPVS
table, kube-ipvs0, ipsets, companion rules)."""

from __future__ import annotations

import dataclasses
import errno
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from kproxy.backends import ipvs_netlink as N
from kproxy.backends.iptables_exec import RestoreFailed, RestoreSink
from kproxy.render import ipvs as R
from kproxy.render import ipvs_diff as D


class _Sink:
    def __init__(self, owner: FakeRestorer, argv: Sequence[str]) -> None:
        self.owner = owner
        self.argv = list(argv)
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def end(self) -> None:
        pass

    def wait(self) -> None:
        text = "".join(self.parts)
        if self.owner.refuse > 0 and "--test" not in self.argv:
            self.owner.refuse -= 1
            raise RestoreFailed("iptables-restore: line 2 failed")
        if "--test" not in self.argv:
            self.owner.inputs.append(text)

    def abort(self) -> None:
        self.parts = []


class FakeRestorer:
    """Records each committed restore input in `inputs`; the next `refuse` inputs (not --test
    probes) fail as iptables-restore would refuse them."""

    def __init__(self) -> None:
        self.inputs: list[str] = []
        self.refuse = 0

    def open(self, argv: Sequence[str]) -> RestoreSink:
        return _Sink(self, argv)


class SavedTables:
    """A `Run` for IptablesProxier: `iptables-save -t T` prints `tables[T]`; `iptables -S` of a
    chain succeeds. `load(text)` replaces the tables with a full restore input as iptables-save
    would print it (hook inserts become appends)."""

    def __init__(self) -> None:
        self.tables: dict[str, str] = {}
        self.calls: list[list[str]] = []

    def load(self, restore_input: str) -> None:
        self.tables = {}
        table = ""
        for line in restore_input.splitlines():
            if line.startswith("*"):
                table = line[1:]
                self.tables.setdefault(table, "")
            elif line.startswith((":", "-A ")):
                self.tables[table] += line + "\n"
            elif line.startswith("-I "):
                chain, _pos, spec = line[3:].split(" ", 2)
                self.tables[table] += f"-A {chain} {spec}\n"

    def __call__(self, argv: Sequence[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        out = ""
        if "-save" in argv[0]:
            out = self.tables.get(argv[argv.index("-t") + 1], "")
        return subprocess.CompletedProcess(list(argv), 0, out, "")


# -- IPVS mode ---------------------------------------------------------------------------------
class FakeIPVS:
    """An in-memory IPVS table behind the IPVSAdapter calls IPVSProxier makes. `applied` holds
    every batch of operations; `refuse` fails the next batches (every operation, EPERM)."""

    def __init__(self) -> None:
        self.table: dict[N.ServiceKey, tuple[N.VirtualServer, dict[N.DestKey, N.RealServer]]] = {}
        self.applied: list[list[N.Op]] = []
        self.refuse = 0

    def services(self) -> list[N.VirtualServer]:
        return [vs for vs, _ in self.table.values()]

    def dests(self, key: N.ServiceKey, *, stats: bool = True) -> dict[N.DestKey, N.RealServer]:
        return dict(self.table[key][1]) if key in self.table else {}

    def proc(self) -> dict[R.VSKey, list[D.ObservedDest]]:
        """What /proc/net/ip_vs would list (IPVSProxier's `read_dests`)."""
        return {
            R.VSKey(*key): [
                D.ObservedDest(
                    rs.address, rs.port, rs.weight, rs.active_conns, rs.inactive_conns, rs.forward
                )
                for rs in dests.values()
            ]
            for key, (_vs, dests) in self.table.items()
        }

    def connections(self, key: N.ServiceKey, dest: N.DestKey, active: int) -> None:
        _vs, dests = self.table[key]
        dests[dest] = dataclasses.replace(dests[dest], active_conns=active)

    def apply(self, ops: Sequence[N.Op]) -> N.ApplyResult:
        self.applied.append(list(ops))
        if self.refuse > 0:
            self.refuse -= 1
            return N.ApplyResult(failures=tuple(N.OpFailure(op, errno.EPERM) for op in ops))
        for op in ops:
            if isinstance(op, N.AddService | N.EditService):
                key = N.ServiceKey(op.service.address, op.service.protocol, op.service.port)
                old = self.table.get(key, (op.service, {}))[1]
                self.table[key] = (op.service, old)
            elif isinstance(op, N.DeleteService):
                self.table.pop(op.key, None)
            elif isinstance(op, N.AddDest | N.EditDest):
                dests = self.table[op.service][1]
                was = dests.get(op.dest.key)
                dest = op.dest
                if was is not None:
                    dest = dataclasses.replace(
                        dest, active_conns=was.active_conns, inactive_conns=was.inactive_conns
                    )
                dests[op.dest.key] = dest
            else:
                self.table[op.service][1].pop(op.dest, None)
        return N.ApplyResult(done=len(ops))

    def ops(self, kind: type) -> list[N.Op]:
        """Every applied operation of `kind` (e.g. N.DeleteDest)."""
        return [op for batch in self.applied for op in batch if isinstance(op, kind)]


class FakeDevice:
    """kube-ipvs0's addresses (an AddressDevice)."""

    def __init__(self) -> None:
        self.bound: set[str] = set()

    def ensure(self) -> None:
        pass

    def addresses(self, family: int) -> set[str]:
        return set(self.bound)

    def bind(self, addresses: Iterable[str]) -> int:
        new = set(addresses) - self.bound
        self.bound |= new
        return len(new)

    def unbind(self, addresses: Iterable[str]) -> int:
        gone = set(addresses) & self.bound
        self.bound -= gone
        return len(gone)

    def interfaces(self, family: int) -> dict[str, set[str]]:
        """IPVSProxier's `interfaces`: one node address on eth0, and kube-ipvs0's."""
        return {"eth0": {"192.168.5.10"}, R.DUMMY_DEVICE: set(self.bound)}


class FakeIPSets:
    """kproxy's ipsets of one family, in memory (the IPSets calls IPVSProxier makes)."""

    def __init__(self) -> None:
        self.contents: defaultdict[str, set[str]] = defaultdict(set)

    def ensure(self) -> None:
        pass

    def read(self) -> dict[str, set[str]]:
        return {b: set(e) for b, e in self.contents.items()}

    def update(
        self,
        *,
        add: Mapping[str, Iterable[str]] | None = None,
        delete: Mapping[str, Iterable[str]] | None = None,
    ) -> int:
        sent = 0
        for base, entries in (delete or {}).items():
            sent += len(self.contents[base] & set(entries))
            self.contents[base] -= set(entries)
        for base, entries in (add or {}).items():
            sent += len(set(entries) - self.contents[base])
            self.contents[base] |= set(entries)
        return sent

    def sync_to(self, desired: Mapping[str, Iterable[str]], *, phase: str) -> int:
        bases = set(self.contents) | set(desired)
        if phase == "add":
            return self.update(add={b: set(desired.get(b, ())) for b in bases})
        return self.update(delete={b: self.contents[b] - set(desired.get(b, ())) for b in bases})


class FakeRules:
    """The companion iptables rules (CompanionRules): applied only on full syncs."""

    def __init__(self) -> None:
        self.options: object = None
        self.applied = 0

    def apply(self) -> dict[str, int]:
        self.applied += 1
        return {"nat": 0, "filter": 0}
