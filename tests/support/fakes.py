"""In-memory test doubles of kproxy's own dataplane interfaces (never of subprocess, pyroute2 or
kubernetes): an iptables `Restorer` that records every restore input and can refuse some, a
`Run` that answers iptables-save from what was restored, and IPVSProxier's collaborators (IPVS
table, kube-ipvs0, ipsets, companion rules), and NftablesProxier's table."""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kproxy.backends import ipvs_netlink as N
from kproxy.backends.iptables_exec import RestoreFailed, RestoreSink
from kproxy.backends.ipvs_census import Census, key_hash
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
        if self.owner.refuse_text and self.owner.refuse_text in text:
            raise RestoreFailed(f"refused: {self.owner.refuse_text}")
        if self.owner.refuse > 0 and "--test" not in self.argv:
            self.owner.refuse -= 1
            raise RestoreFailed("iptables-restore: line 2 failed")
        if "--test" not in self.argv:
            self.owner.inputs.append(text)
            if self.owner.on_commit is not None:
                self.owner.on_commit(text)

    def abort(self) -> None:
        self.parts = []


class FakeRestorer:
    """Records each committed restore input in `inputs`; the next `refuse` inputs (not --test
    probes) fail as iptables-restore would refuse them."""

    def __init__(self, on_commit: Callable[[str], None] | None = None) -> None:
        self.inputs: list[str] = []
        self.refuse = 0
        self.refuse_text = ""  # every input holding this text is refused
        self.on_commit = on_commit  # called with each committed input

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
        self.table: dict[R.VSKey, D.ObservedVS] = {}
        self.applied: list[list[D.Op]] = []
        self.refuse = 0

    def services(self) -> list[D.ObservedVS]:
        return [dataclasses.replace(vs, dests=()) for vs in self.table.values()]

    def dests(self, key: R.VSKey, *, stats: bool = True) -> tuple[D.ObservedDest, ...]:
        return self.table[key].dests if key in self.table else ()

    def count_services(self, family: int) -> int:
        return sum(1 for key in self.table if (":" in key.address) == (family == 6))

    def count_dests(self, key: R.VSKey) -> int:
        return len(self.dests(key))

    def census(self, family: int) -> Census | None:
        """IPVSProxier's `census`: what the getsockopt census reports (IPv4 only)."""
        if family != 4:
            return None
        keys = [key for key in self.table if ":" not in key.address]
        return Census(
            services=len(keys),
            dests=sum(len(self.table[k].dests) for k in keys),
            fingerprint=sum(key_hash(k, len(self.table[k].dests)) for k in keys),
        )

    def proc(self) -> dict[R.VSKey, list[D.ObservedDest]]:
        """What /proc/net/ip_vs would list (IPVSProxier's `read_dests`)."""
        return {key: list(vs.dests) for key, vs in self.table.items()}

    def dest(self, key: R.VSKey, address: str) -> D.ObservedDest | None:
        return next((d for d in self.dests(key) if d.address == address), None)

    def connections(self, key: R.VSKey, address: str, active: int) -> None:
        vs = self.table[key]
        dests = tuple(d._replace(active=active) if d.address == address else d for d in vs.dests)
        self.table[key] = dataclasses.replace(vs, dests=dests)

    def _put_dest(self, key: R.VSKey, dest: R.Dest) -> None:
        vs = self.table[key]
        was = {(d.address, d.port): d for d in vs.dests}
        old = was.get((dest.address, dest.port))
        was[(dest.address, dest.port)] = D.ObservedDest(
            dest.address,
            dest.port,
            dest.weight,
            old.active if old else 0,
            old.inactive if old else 0,
        )
        self.table[key] = dataclasses.replace(vs, dests=tuple(was.values()))

    def apply(self, ops: Sequence[D.Op]) -> N.ApplyResult:
        self.applied.append(list(ops))
        if self.refuse > 0:
            self.refuse -= 1
            return N.ApplyResult(failures=tuple(N.OpFailure(op, errno.EPERM) for op in ops))
        for op in ops:
            if isinstance(op, D.AddVS | D.EditVS):
                v = op.vs
                keep = self.table[v.key].dests if v.key in self.table else ()
                self.table[v.key] = D.ObservedVS(v.key, v.scheduler, v.flags, v.timeout, keep)
                if isinstance(op, D.AddVS):
                    for d in v.dests:
                        self._put_dest(v.key, d)
            elif isinstance(op, D.DelVS):
                self.table.pop(op.key, None)
            elif isinstance(op, D.AddDest | D.EditDest):
                self._put_dest(op.key, op.dest)
            else:
                vs = self.table[op.key]
                dests = tuple(d for d in vs.dests if (d.address, d.port) != (op.address, op.port))
                self.table[op.key] = dataclasses.replace(vs, dests=dests)
        return N.ApplyResult(done=len(ops))

    def ops(self, kind: type) -> list[D.Op]:
        """Every applied operation of `kind` (e.g. D.DelDest)."""
        return [op for batch in self.applied for op in batch if isinstance(op, kind)]


class FakeDevice:
    """kube-ipvs0's addresses (an AddressDevice)."""

    def __init__(self) -> None:
        self.bound: set[str] = set()

    def ensure(self) -> None:
        pass

    def addresses(self, family: int) -> set[str]:
        return set(self.bound)

    def count(self, family: int) -> int:
        return len(self.bound)

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
        self.lost: set[tuple[str, str]] = set()  # deleted from outside, still in `contents`

    def ensure(self) -> None:
        pass

    def read(self) -> dict[str, set[str]]:
        for base, entry in self.lost:
            self.contents[base].discard(entry)
        self.lost.clear()
        return {b: set(e) for b, e in self.contents.items()}

    def drift(self) -> str | None:
        """IPSets.drift: element counts of the 'kernel' (contents less `lost`) vs `contents`."""
        for base in sorted({b for b, _ in self.lost}):
            have = len(self.contents[base] - {e for b, e in self.lost if b == base})
            return f"ipset {base} holds {have} entries, kproxy wrote {len(self.contents[base])}"
        return None

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


# -- nftables mode -----------------------------------------------------------------------------
class FakeNftTable:
    """The kube-proxy table as NftablesProxier sees it: its partial-sync `Writer` (`applied`
    holds each batch of ops; `refuse` fails the next batches), the `Run` that answers
    `nft -j list table` with the chains and sets present, and the ruleset generation and object
    count of `state` (`foreign_commit` is another program's write). `load(text)` takes in a
    full sync's `nft -f` input (give it the FakeRestorer's inputs). `elements` holds the
    shared sets' and maps' elements, (set, key text) -> element text, and like the kernel a
    batch adding a key that exists or deleting one that does not is refused."""

    def __init__(self, family: int = 4) -> None:
        self.family = family
        self.chains: set[str] = set()
        self.sets: dict[str, int] = {}  # name -> timeout
        self.applied: list[list[Any]] = []
        self.refuse = 0
        self.generation = 1
        self.exists = False
        self.calls: list[list[str]] = []
        self.refuse_text = ""  # `--check` inputs and batches naming this are refused
        self.elements: dict[tuple[str, str], str] = {}

    def _drop_set(self, name: str) -> None:
        self.elements = {k: v for k, v in self.elements.items() if k[0] != name}

    def load(self, text: str) -> None:
        self.exists = True
        self.generation += 1
        for line in text.splitlines():
            words = line.split()
            if words[:2] == ["add", "element"]:
                body = line[line.index("{") + 1 : line.rindex("}")].strip()
                for item in body.split(", "):
                    key = item.split(' comment "')[0].split(" : ")[0]
                    if (words[4], key) in self.elements:  # nft -f refuses it too
                        raise RuntimeError(f"File exists: {words[4]} {key}")
                    self.elements[(words[4], key)] = item
            elif words[0] in ("flush", "delete") and words[1] in ("set", "map"):
                self._drop_set(words[4])
            if words[:2] == ["add", "chain"]:
                self.chains.add(words[4])
            elif words[:2] == ["delete", "chain"]:
                self.chains.discard(words[4])
            elif words[0] == "add" and words[1] in ("set", "map"):
                m = re.search(r"timeout (\d+)s", line)
                self.sets[words[4]] = int(m.group(1)) if m else 0
            elif words[:2] == ["delete", "set"]:
                self.sets.pop(words[4], None)

    def apply(self, ops: Sequence[Any]) -> None:
        self.applied.append(list(ops))
        if self.refuse_text and any(self.refuse_text in repr(op) for op in ops):
            raise RuntimeError(f"nf_tables: refused {self.refuse_text}")
        if self.refuse > 0:
            self.refuse -= 1
            raise RuntimeError("nf_tables message 0 (type 12): EEXIST")
        elements = dict(self.elements)
        for op in ops:
            e = op.element
            if e is not None:
                key = (e.set, " . ".join(e.key))
                if op.kind == "add-element":
                    if key in elements:
                        raise RuntimeError(f"nf_tables: EEXIST adding {key}")
                    elements[key] = e.text()
                elif elements.pop(key, None) is None:
                    raise RuntimeError(f"nf_tables: ENOENT deleting {key}")
        self.elements = elements
        self.generation += 1
        for op in ops:
            if op.kind == "add-chain":
                self.chains.add(op.name)
            elif op.kind == "delete-chain":
                self.chains.discard(op.name)
            elif op.kind == "add-set":
                self.sets[op.setdef.name] = op.setdef.timeout
            elif op.kind == "delete-set":
                self.sets.pop(op.name, None)
                self._drop_set(op.name)

    def table_exists(self) -> bool:
        return self.exists

    def state(self) -> tuple[int, int | None]:
        return self.generation, len(self.chains) + len(self.sets) if self.exists else None

    def foreign_commit(self, *, chain: str = "") -> None:
        self.generation += 1
        if chain:
            self.chains.add(chain)

    def __call__(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """`nft -j list table` and `nft --check -f -` (refused when the input holds
        `refuse_text`, as the FakeRestorer given the same text refuses the real sync)."""
        self.calls.append(list(argv))
        if "--check" in argv:
            bad = bool(self.refuse_text) and self.refuse_text in str(kw.get("input", ""))
            return subprocess.CompletedProcess(list(argv), int(bad), "", "refused" * bad)
        if "list" in argv and "-j" in argv and self.exists:
            items: list[dict[str, Any]] = [{"chain": {"name": c}} for c in sorted(self.chains)]
            for name, timeout in sorted(self.sets.items()):
                items.append({"set": {"name": name, **({"timeout": timeout} if timeout else {})}})
            return subprocess.CompletedProcess(list(argv), 0, json.dumps({"nftables": items}), "")
        return subprocess.CompletedProcess(list(argv), 0 if self.exists else 1, "", "")
