"""kproxy's ipsets in the kernel: created, read back and changed through `ipset save/restore`.

One `IPSets` per IP family owns the sets `kproxy.render.ipvs.SETS` names (KUBE-* for IPv4,
KUBE-6-* for IPv6). Changes go to the kernel as one `ipset restore -exist` batch per sync (add
and del lines only for entries that change), so a sync that touches no set costs no process at
all, and a sync that does costs one, whatever the number of entries. The last contents written
(or read) are kept in memory; `read()` refreshes them from the kernel (start-up, full syncs).

`-exist` makes adding a present entry and deleting an absent one no-ops, so a batch computed
from stale knowledge still applies. Sets are never destroyed while kproxy runs (iptables rules
reference them); `destroy_all` is for cleanup, after the rules are gone.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kproxy.render.ipvs import SETS, SetSpec

log = logging.getLogger("kproxy.ipset")


class IPSetError(RuntimeError):
    """An ipset command failed; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class SavedSet:
    """One set as `ipset save` prints it."""

    name: str
    type: str
    entries: frozenset[str] = frozenset()


def parse_save(text: str) -> dict[str, SavedSet]:
    """`ipset save` output -> sets by name."""
    types: dict[str, str] = {}
    entries: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "create":
            types[parts[1]] = parts[2]
            entries.setdefault(parts[1], [])
        elif len(parts) >= 3 and parts[0] == "add":
            entries.setdefault(parts[1], []).append(parts[2])
    return {
        name: SavedSet(name, types.get(name, ""), frozenset(entries.get(name, ())))
        for name in types
    }


def _run(args: list[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(
            ["ipset", *args], input=stdin, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as err:
        raise IPSetError("the ipset command is not installed") from err
    if proc.returncode != 0:
        raise IPSetError(f"ipset {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def save_all() -> dict[str, SavedSet]:
    """Every set of this network namespace."""
    return parse_save(_run(["save"]))


def restore(text: str) -> None:
    """Apply an `ipset restore` batch with -exist (idempotent adds, dels and creates)."""
    if text:
        _run(["restore", "-exist"], stdin=text)


def available() -> bool:
    return shutil.which("ipset") is not None


@dataclass
class IPSets:
    """The ipsets of one family and what they hold (keyed by base name, e.g. KUBE-CLUSTER-IP)."""

    family: int
    specs: tuple[SetSpec, ...] = SETS
    contents: dict[str, set[str]] = field(default_factory=dict)
    restores: int = 0
    _names: dict[str, str] = field(default_factory=dict)
    _existing: set[str] = field(default_factory=set)
    _mismatched: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._names = {s.base: s.name(self.family) for s in self.specs}
        self.contents = {s.base: set() for s in self.specs}

    def name(self, base: str) -> str:
        return self._names[base]

    def read(self) -> dict[str, set[str]]:
        """Refresh `contents` from the kernel; sets that do not exist read as empty."""
        saved = save_all()
        for spec in self.specs:
            found = saved.get(self._names[spec.base])
            self.contents[spec.base] = set(found.entries) if found else set()
        self._existing = {base for base, name in self._names.items() if name in saved}
        self._mismatched = {
            spec.base
            for spec in self.specs
            if (s := saved.get(self._names[spec.base])) is not None and s.type != spec.type
        }
        return self.contents

    def ensure(self) -> None:
        """Create every missing set (reads the kernel first)."""
        self.read()
        if self._mismatched:
            bad = ", ".join(sorted(self._names[b] for b in self._mismatched))
            raise IPSetError(f"ipsets exist with another type: {bad} (run kproxy cleanup)")
        missing = [s for s in self.specs if s.base not in self._existing]
        if missing:
            restore(
                "".join(
                    f"create {s.name(self.family)} {s.create_args(self.family)}\n" for s in missing
                )
            )
            self.restores += 1
            self._existing.update(s.base for s in missing)

    def update(
        self,
        *,
        add: Mapping[str, Iterable[str]] | None = None,
        delete: Mapping[str, Iterable[str]] | None = None,
    ) -> int:
        """Add and delete entries (by base set name) in one batch; returns the lines written.

        Entries already present (for adds) or absent (for deletes) per `contents` are skipped.
        """
        lines: list[str] = []
        for base, entries in (delete or {}).items():
            have = self.contents[base]
            name = self._names[base]
            for e in entries:
                if e in have:
                    lines.append(f"del {name} {e}\n")
        for base, entries in (add or {}).items():
            have = self.contents[base]
            name = self._names[base]
            for e in entries:
                if e not in have:
                    lines.append(f"add {name} {e}\n")
        if not lines:
            return 0
        restore("".join(lines))
        self.restores += 1
        for base, entries in (delete or {}).items():
            self.contents[base].difference_update(entries)
        for base, entries in (add or {}).items():
            self.contents[base].update(entries)
        return len(lines)

    def sync_to(self, desired: Mapping[str, Iterable[str]], *, phase: str) -> int:
        """Make the sets hold `desired`: phase "add" only adds, "delete" only deletes (so a sync
        can add before and delete after it changes IPVS)."""
        if phase == "add":
            adds = {b: set(desired.get(b, ())) - self.contents[b] for b in self._names}
            return self.update(add={b: e for b, e in adds.items() if e})
        dels = {b: self.contents[b] - set(desired.get(b, ())) for b in self._names}
        return self.update(delete={b: e for b, e in dels.items() if e})


def destroy_all(families: Iterable[int] = (4, 6)) -> list[str]:
    """Destroy every kproxy set of `families` that exists; returns the names destroyed.

    Fails for a set an iptables rule still references: remove the rules first.
    """
    saved = save_all()
    names = [s.name(f) for f in families for s in SETS if s.name(f) in saved]
    names = list(dict.fromkeys(names))
    if names:
        restore("".join(f"destroy {n}\n" for n in names))
    return names
