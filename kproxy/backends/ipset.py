"""kproxy's ipsets in the kernel: created with the `ipset` tool, read and changed over netlink.

One `IPSets` per IP family owns the sets `kproxy.render.ipvs.SETS` names (KUBE-* for IPv4,
KUBE-6-* for IPv6). Element changes go to the kernel as batched netlink messages
(kproxy.backends.ipset_netlink: hundreds of elements per message, only for entries that change),
so a sync that touches no set costs nothing, and one that does costs a few round trips whatever
the number of entries; listings are one netlink dump per set. The `ipset` tool creates the sets
(`ipset restore`, no elements) and destroys them in cleanup: it resolves the protocol of every
element through /etc/protocols, far too slow for element work at scale (see ipset_netlink).

The last contents written (or read) are kept in memory; `read()` refreshes them from the kernel
(start-up, full syncs). Adding a present entry and deleting an absent one are no-ops, so a
batch computed from stale knowledge still applies. Sets are never destroyed while kproxy runs
(iptables rules reference them); `destroy_all` is for cleanup, after the rules are gone.
"""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kproxy.backends.ipset_netlink import CMD_ADD, CMD_DEL, IPSetNetlinkError, IPSetSocket
from kproxy.errors import DataplaneError
from kproxy.render.ipvs import SETS, SetSpec

log = logging.getLogger("kproxy.ipset")


class IPSetError(DataplaneError):
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


def set_types() -> dict[str, str]:
    """Name -> type of every set of this network namespace (headers only: `ipset list -t`)."""
    out: dict[str, str] = {}
    name = ""
    for line in _run(["list", "-t"]).splitlines():
        if line.startswith("Name: "):
            name = line[6:].strip()
        elif line.startswith("Type: ") and name:
            out[name] = line[6:].strip()
    return out


@dataclass
class IPSets:
    """The ipsets of one family and what they hold (keyed by base name, e.g. KUBE-CLUSTER-IP)."""

    family: int
    specs: tuple[SetSpec, ...] = SETS
    contents: dict[str, set[str]] = field(default_factory=dict)
    restores: int = 0
    _names: dict[str, str] = field(default_factory=dict)
    _existing: set[str] = field(default_factory=set)
    _specs: dict[str, SetSpec] = field(default_factory=dict)
    _sock: IPSetSocket | None = None

    def __post_init__(self) -> None:
        self._names = {s.base: s.name(self.family) for s in self.specs}
        self._specs = {s.base: s for s in self.specs}
        self.contents = {s.base: set() for s in self.specs}

    def name(self, base: str) -> str:
        return self._names[base]

    def _socket(self) -> IPSetSocket:
        if self._sock is None:
            self._sock = IPSetSocket()
        return self._sock

    def read(self) -> dict[str, set[str]]:
        """Refresh `contents` from the kernel; sets that do not exist read as empty."""
        sock = self._socket()
        existing = set()
        for spec in self.specs:
            try:
                self.contents[spec.base] = sock.list(self._names[spec.base], spec.type)
                existing.add(spec.base)
            except IPSetNetlinkError as err:
                if err.errno != errno.ENOENT:
                    raise IPSetError(f"listing {self._names[spec.base]}: {err}") from err
                self.contents[spec.base] = set()
        self._existing = existing
        return self.contents

    def drift(self) -> str | None:
        """None while every set holds as many elements as `contents` says (one header dump of
        all sets: the drift check's read, no element listed); else what differs."""
        try:
            counts = self._socket().counts()
        except IPSetNetlinkError as err:
            raise IPSetError(f"listing the ipset headers: {err}") from err
        for base, name in self._names.items():
            if name not in counts:
                return f"ipset {name} is gone"
            have, want = counts[name], len(self.contents[base])
            if have is not None and have != want:  # None: a kernel that does not count
                return f"ipset {name} holds {have} entries, kproxy wrote {want}"
        return None

    def ensure(self) -> None:
        """Create every missing set, then read what the sets hold."""
        types = set_types()
        bad = [
            self._names[s.base]
            for s in self.specs
            if self._names[s.base] in types and types[self._names[s.base]] != s.type
        ]
        if bad:
            raise IPSetError(f"ipsets exist with another type: {', '.join(bad)} (kproxy cleanup)")
        missing = [s for s in self.specs if self._names[s.base] not in types]
        if missing:
            restore(
                "".join(
                    f"create {s.name(self.family)} {s.create_args(self.family)}\n" for s in missing
                )
            )
            self.restores += 1
        self.read()

    def update(
        self,
        *,
        add: Mapping[str, Iterable[str]] | None = None,
        delete: Mapping[str, Iterable[str]] | None = None,
    ) -> int:
        """Delete, then add entries (by base set name); returns how many were sent.

        Entries already present (for adds) or absent (for deletes) per `contents` are skipped.
        """
        sent = 0
        for cmd, changes in ((CMD_DEL, delete or {}), (CMD_ADD, add or {})):
            for base, entries in changes.items():
                have = self.contents[base]
                todo = [e for e in entries if (e in have) == (cmd == CMD_DEL)]
                if not todo:
                    continue
                spec = self._specs[base]
                try:
                    sent += self._socket().change(
                        cmd, self._names[base], spec.type, self.family, todo
                    )
                except IPSetNetlinkError as err:
                    raise IPSetError(str(err)) from err
                if cmd == CMD_DEL:
                    have.difference_update(todo)
                else:
                    have.update(todo)
        if sent:
            self.restores += 1
        return sent

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
    existing = set_types()
    names = [s.name(f) for f in families for s in SETS if s.name(f) in existing]
    names = list(dict.fromkeys(names))
    if names:
        restore("".join(f"destroy {n}\n" for n in names))
    return names
