"""In-memory test doubles of kproxy's own dataplane interfaces (never of subprocess, pyroute2 or
kubernetes): an iptables `Restorer` that records every restore input and can refuse some, and
a `Run` that answers iptables-save from what was restored."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from kproxy.backends.iptables_exec import RestoreFailed, RestoreSink


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
