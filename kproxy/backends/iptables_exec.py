"""Running iptables: which flavour and binary, `iptables-save`, and `iptables-restore` (the one
place the iptables-based modes write to the kernel). Shared by the iptables, IPVS (companion
rules) and userspace modes, and by `kproxy status`/`explain`.

Flavour detection (legacy or nft) follows kubelet's iptables-wrapper: the flavour whose mangle
table holds kubelet's KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY chain, else the one with more
rules, else nft. Binaries are iptables-<flavour>-restore/-save (ip6tables-* for IPv6).

A `Restorer` opens a `RestoreSink`: text written to the sink is the restore input, `end()` closes
it (the restore then commits), `wait()` waits and raises RestoreFailed with the tool's message
and the offending lines. Nothing is committed unless the input reaches COMMIT, so `abort()`
(kill before the end) leaves the tables untouched.

`ProcessRestorer` streams into a running iptables-restore process, so the process parses the
first services while later ones are still being rendered (on two cores a full sync then costs
about as much as the restore alone). `RunRestorer` buffers the input and hands it to a
subprocess.run-style callable in one go (for callers that inject their own runner).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from kproxy.backends.base import SyncError
from kproxy.errors import DataplaneError

Run = Callable[..., subprocess.CompletedProcess[str]]

_FLUSH_AT = 1 << 18  # bytes buffered before a pipe write

FLAVOURS = ("nft", "legacy")
KUBELET_MARKERS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
SAVED_TABLES = ("nat", "filter", "mangle")


def binary(family: int, flavour: str, tool: str | None) -> str:
    """e.g. binary(4, "nft", "restore") -> "iptables-nft-restore"; tool None: the plain command."""
    base = "ip6tables" if family == 6 else "iptables"
    return f"{base}-{flavour}-{tool}" if tool else f"{base}-{flavour}"


def save(family: int, flavour: str, table: str, run: Run = subprocess.run) -> str:
    """`iptables-save -t TABLE` of one flavour; "" when the tool is missing or fails."""
    tool = binary(family, flavour, "save")
    if shutil.which(tool) is None:
        return ""
    res = run([tool, "-t", table], capture_output=True, text=True, check=False)
    return res.stdout if res.returncode == 0 else ""


def detect_flavour(family: int = 4, run: Run = subprocess.run) -> str:
    """legacy or nft: the one kubelet uses, else the one with more rules, else nft."""
    available = [f for f in FLAVOURS if shutil.which(binary(family, f, "restore"))]
    if not available:
        raise SyncError("no iptables-restore found (install the iptables package)")
    if len(available) == 1:
        return available[0]
    for flavour in available:
        mangle = save(family, flavour, "mangle", run)
        if any(f":{marker} " in mangle for marker in KUBELET_MARKERS):
            return flavour
    counts: dict[str, int] = {}
    for flavour in available:
        text = "".join(save(family, flavour, t, run) for t in SAVED_TABLES)
        counts[flavour] = sum(1 for line in text.splitlines() if line.startswith("-A "))
    if counts.get("legacy", 0) > counts.get("nft", 0):
        return "legacy"
    return "nft"


class RestoreFailed(DataplaneError):
    """iptables-restore refused the input; nothing of that input was committed.

    The message is the tool's own (one line); `lines` shows the input around the line it named.
    """

    def __init__(self, message: str, lines: str = "") -> None:
        super().__init__(message)
        self.lines = lines


class RestoreSink(Protocol):
    def write(self, text: str) -> None: ...

    def end(self) -> None: ...

    def wait(self) -> None: ...

    def abort(self) -> None: ...


class Restorer(Protocol):
    def open(self, argv: Sequence[str]) -> RestoreSink: ...


def excerpt(parts: Sequence[str], error: str, context: int = 3) -> str:
    """The input lines around the line number iptables-restore reported."""
    m = re.search(r"line:? (\d+)", error)
    lines = "".join(parts).splitlines()
    if not m:
        return "\n".join(lines[:20])
    n = int(m.group(1))
    lo, hi = max(0, n - 1 - context), min(len(lines), n + context)
    return "\n".join(f"{i + 1}: {lines[i]}" for i in range(lo, hi))


def _failure(argv: Sequence[str], rc: int, stderr: str, parts: Sequence[str]) -> RestoreFailed:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    detail = " | ".join(ln for ln in lines if not ln.startswith("Try `"))[-2000:]
    return RestoreFailed(f"{argv[0]} failed ({rc}): {detail}", excerpt(parts, detail))


class _ProcessSink:
    def __init__(self, argv: Sequence[str]) -> None:
        self._argv = list(argv)
        self._proc = subprocess.Popen(
            self._argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._parts: list[str] = []  # kept (by reference) for the error excerpt
        self._pending: list[str] = []
        self._size = 0
        self._broken = False

    def write(self, text: str) -> None:
        self._parts.append(text)
        self._pending.append(text)
        self._size += len(text)
        if self._size >= _FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        data, self._pending, self._size = "".join(self._pending), [], 0
        if self._broken or not data:
            return
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(data)
        except BrokenPipeError:  # the tool stopped reading: it failed, wait() reports why
            self._broken = True

    def end(self) -> None:
        self._flush()
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            self._broken = True

    def wait(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self.end()
        assert self._proc.stderr is not None
        stderr = self._proc.stderr.read()
        rc = self._proc.wait()
        if rc != 0:
            raise _failure(self._argv, rc, stderr, self._parts)

    def abort(self) -> None:
        self._proc.kill()
        self._proc.wait()


class ProcessRestorer:
    """Streams each input into its own iptables-restore process."""

    def open(self, argv: Sequence[str]) -> RestoreSink:
        return _ProcessSink(argv)


class _RunSink:
    def __init__(self, run: Run, argv: Sequence[str]) -> None:
        self._run = run
        self._argv = list(argv)
        self._parts: list[str] = []
        self._done = False

    def write(self, text: str) -> None:
        self._parts.append(text)

    def end(self) -> None:
        pass

    def wait(self) -> None:
        if self._done:
            return
        self._done = True
        res = self._run(
            self._argv, input="".join(self._parts), capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            raise _failure(self._argv, res.returncode, res.stderr or res.stdout, self._parts)

    def abort(self) -> None:
        self._done = True


class RunRestorer:
    """Buffers each input and runs it through a subprocess.run-style callable."""

    def __init__(self, run: Run) -> None:
        self._run = run

    def open(self, argv: Sequence[str]) -> RestoreSink:
        return _RunSink(self._run, argv)


def restore_noflush(family: int, flavour: str, text: str, run: Run = subprocess.run) -> None:
    """One small `iptables-restore --noflush` of `text` (raises RestoreFailed; waits up to 5 s
    for the xtables lock)."""
    sink = RunRestorer(run).open([binary(family, flavour, "restore"), "--noflush", "-w", "5"])
    sink.write(text)
    sink.end()
    sink.wait()


def save_all(family: int, flavour: str, run: Run = subprocess.run) -> str:
    """The nat, filter and mangle tables of one flavour, as one iptables-save text."""
    return "".join(save(family, flavour, table, run) for table in SAVED_TABLES)


def cleanup_flavours(
    family: int,
    tables: Sequence[str],
    removal: Callable[[Mapping[str, str]], str],
    run: Run = subprocess.run,
) -> list[str]:
    """`kproxy cleanup` in every iptables flavour present: `removal` turns the saved `tables`
    (table -> iptables-save text) into the restore input that removes what a mode left ("" for
    nothing), which is applied. Returns the flavours something was removed from."""
    cleaned: list[str] = []
    for flavour in FLAVOURS:
        if shutil.which(binary(family, flavour, "restore")) is None:
            continue
        text = removal({t: save(family, flavour, t, run) for t in tables})
        if text:
            restore_noflush(family, flavour, text, run)
            cleaned.append(flavour)
    return cleaned
