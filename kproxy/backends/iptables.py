"""The iptables dataplane: applies the renderer's rules with `iptables-restore --noflush`.

Owns the kernel side of iptables mode for one IP family:
- flavour detection (legacy or nft), following kubelet/iptables-wrapper: the flavour whose
  tables hold kubelet's KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY chains, else the one holding
  more rules, else nft;
- full syncs: every kproxy chain is (re)declared with its rules, and owned chains that are no
  longer wanted are deleted, in one restore. Declaring a chain flushes and refills it inside one
  atomic table commit, so no packet ever sees a half-written table: a restart never drops
  traffic, and nothing is flushed on start or stop;
- partial syncs: only the chains of services whose rendered block changed, the shared chains
  whose text changed, and the chains that disappeared are written;
- the hook jumps from built-in chains, inserted only when missing (never duplicated);
- a canary chain (KUBE-PROXY-CANARY) whose absence means someone flushed the tables: the next
  sync is then full.
A failed restore raises SyncError and forces the next sync to be full.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable

from kproxy.backends.base import SyncError, SyncResult
from kproxy.model.objects import IPV6, Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Changes, Snapshot
from kproxy.model.view import build_views
from kproxy.render import chains as C
from kproxy.render.iptables import (
    FILTER,
    FILTER_ORDER,
    MANGLE,
    NAT,
    NAT_ORDER,
    Renderer,
    ServiceRules,
    TableWrite,
    assemble,
    full_writes,
)

log = logging.getLogger("kproxy.iptables")

FLAVOURS = ("nft", "legacy")
KUBELET_MARKERS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
CANARY_CHECK_INTERVAL = 10.0

Run = Callable[..., subprocess.CompletedProcess[str]]


def _binary(family: int, flavour: str, tool: str) -> str:
    base = "ip6tables" if family == IPV6 else "iptables"
    return f"{base}-{flavour}-{tool}"


def _save(family: int, flavour: str, table: str, run: Run = subprocess.run) -> str:
    binary = _binary(family, flavour, "save")
    if shutil.which(binary) is None:
        return ""
    res = run([binary, "-t", table], capture_output=True, text=True, check=False)
    return res.stdout if res.returncode == 0 else ""


def detect_flavour(family: int = 4, run: Run = subprocess.run) -> str:
    """legacy or nft: the one kubelet uses, else the one with more rules, else nft."""
    available = [f for f in FLAVOURS if shutil.which(_binary(family, f, "restore"))]
    if not available:
        raise SyncError("no iptables-restore found (install the iptables package)")
    if len(available) == 1:
        return available[0]
    counts: dict[str, int] = {}
    for flavour in available:
        text = "".join(_save(family, flavour, t, run) for t in ("mangle", "nat", "filter"))
        if any(f":{marker} " in text for marker in KUBELET_MARKERS):
            return flavour
        counts[flavour] = sum(1 for line in text.splitlines() if line.startswith("-A "))
    if counts.get("legacy", 0) > counts.get("nft", 0):
        return "legacy"
    return "nft"


def chains_in(save_text: str) -> list[str]:
    """Chain names declared in iptables-save output of one table."""
    return [line[1:].split(" ", 1)[0] for line in save_text.splitlines() if line.startswith(":")]


class IptablesProxier:
    """Programs one IP family's kube-proxy-style rules. See the module docstring."""

    def __init__(
        self,
        *,
        options: ProxyOptions,
        flavour: str | None = None,
        run: Run = subprocess.run,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.family = options.family
        self._run = run
        self._clock = clock
        self.flavour = flavour or detect_flavour(self.family, run)
        self.restore = _binary(self.family, self.flavour, "restore")
        self.save_binary = _binary(self.family, self.flavour, "save")
        self.renderer = Renderer(options)
        self._blocks: dict[Ref, ServiceRules] = {}
        self._shared: dict[tuple[str, str], str] = {}
        self._need_full = True
        self._canary_checked = float("-inf")
        log.info("iptables mode: IPv%d via %s", self.family, self.restore)

    # -- kernel I/O ------------------------------------------------------------------------
    def _apply(self, text: str) -> None:
        if not text:
            return
        res = self._run(
            [self.restore, "--noflush", "-w", "5"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            self._need_full = True
            detail = res.stderr.strip() or res.stdout.strip()
            log.debug("failed restore input:\n%s", text[:20000])
            raise SyncError(f"{self.restore} failed ({res.returncode}): {detail}")

    def save(self, table: str) -> str:
        return _save(self.family, self.flavour, table, self._run)

    def _canary_missing(self) -> bool:
        now = self._clock()
        if now - self._canary_checked < CANARY_CHECK_INTERVAL:
            return False
        self._canary_checked = now
        binary = "ip6tables" if self.family == IPV6 else "iptables"
        res = self._run(
            [f"{binary}-{self.flavour}", "-w", "5", "-t", MANGLE, "-S", C.CANARY],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            log.warning("canary chain %s is gone: tables were flushed, resyncing all", C.CANARY)
            return True
        return False

    # -- syncing ---------------------------------------------------------------------------
    def sync(self, snapshot: Snapshot, changes: Changes, *, full: bool) -> SyncResult:
        if full or self._need_full or self._canary_missing():
            return self._full_sync(snapshot)
        return self._partial_sync(snapshot, changes.services)

    def _render(self, snapshot: Snapshot, refs: Iterable[Ref] | None) -> dict[Ref, ServiceRules]:
        views = build_views(
            snapshot, family=self.family, node_name=self.options.node_name, refs=refs
        )
        return {ref: self.renderer.render_service(v) for ref, v in views.items()}

    def _shared_chains(self, blocks: dict[Ref, ServiceRules]) -> dict[tuple[str, str], str]:
        return self.renderer.shared_chains(blocks[ref].shared for ref in sorted(blocks))

    def _full_sync(self, snapshot: Snapshot) -> SyncResult:
        blocks = {ref: b for ref, b in self._render(snapshot, None).items() if not b.empty}
        shared = self._shared_chains(blocks)
        wanted_nat = {c for b in blocks.values() for c in b.chains}
        wanted_nat.update(c for t, c in shared if t == NAT)
        wanted_filter = {c for t, c in shared if t == FILTER}
        existing = {t: self.save(t) for t in (NAT, FILTER, MANGLE)}
        delete = {
            NAT: [
                c
                for c in chains_in(existing[NAT])
                if C.is_owned(NAT, c) and c not in wanted_nat and c != C.CANARY
            ],
            FILTER: [
                c
                for c in chains_in(existing[FILTER])
                if C.is_owned(FILTER, c) and c not in wanted_filter and c != C.CANARY
            ],
        }
        ordered = [blocks[ref] for ref in sorted(blocks)]
        writes = full_writes(shared, ordered, delete=delete, canary=True)
        writes = self._with_hooks(writes, existing)
        self._apply(assemble(writes))
        self._blocks = blocks
        self._shared = shared
        self._need_full = False
        self._canary_checked = self._clock()
        return SyncResult(full=True, services_written=len(blocks), rules=self._rule_counts())

    def _partial_sync(self, snapshot: Snapshot, refs: frozenset[Ref]) -> SyncResult:
        if not refs:
            return SyncResult(full=False, rules=self._rule_counts())
        rendered = self._render(snapshot, refs)
        blocks = dict(self._blocks)
        changed: list[ServiceRules] = []
        removed: list[str] = []
        for ref, block in rendered.items():
            old = self._blocks.get(ref)
            if block == old or (old is None and block.empty):
                continue
            if block.empty:
                blocks.pop(ref, None)
            else:
                blocks[ref] = block
                changed.append(block)
            if old is not None:
                removed.extend(c for c in old.chains if c not in set(block.chains))
        shared = self._shared_chains(blocks)
        dirty = {key: text for key, text in shared.items() if self._shared.get(key) != text}
        if not changed and not removed and not dirty:
            return SyncResult(full=False, rules=self._rule_counts())
        nat_head = [(c, dirty[(NAT, c)]) for c in NAT_ORDER[1:] if (NAT, c) in dirty]
        nat_tail = [(C.SERVICES, dirty[(NAT, C.SERVICES)])] if (NAT, C.SERVICES) in dirty else []
        writes = [
            TableWrite(
                FILTER,
                chains=[(c, dirty[(FILTER, c)]) for c in FILTER_ORDER if (FILTER, c) in dirty],
            ),
            TableWrite(NAT, chains=nat_head, blocks=changed, tail=nat_tail, delete=removed),
        ]
        self._apply(assemble(writes))
        self._blocks = blocks
        self._shared = shared
        return SyncResult(full=False, services_written=len(changed), rules=self._rule_counts())

    def _with_hooks(self, writes: list[TableWrite], existing: dict[str, str]) -> list[TableWrite]:
        """Add "-I" lines for the hook jumps that are missing from the built-in chains."""
        out = []
        for w in writes:
            present = set(existing.get(w.table, "").splitlines())
            lines = []
            for chain in C.BUILTIN.get(w.table, ()):
                # hooks_for gives the final order; insert the last first so the first ends on top
                for hook in reversed(C.hooks_for(w.table, chain)):
                    if hook.line not in present:
                        lines.append(f"-I {hook.chain} 1 {hook.spec}\n")
            if lines:
                w = TableWrite(
                    w.table,
                    chains=w.chains,
                    blocks=w.blocks,
                    tail=w.tail,
                    delete=w.delete,
                    extra=w.extra + "".join(lines),
                )
            out.append(w)
        return out

    def _rule_counts(self) -> dict[str, int]:
        nat = sum(b.nat_rule_count for b in self._blocks.values())
        nat += sum(t.count("\n") for (table, _), t in self._shared.items() if table == NAT)
        filt = sum(t.count("\n") for (table, _), t in self._shared.items() if table == FILTER)
        return {NAT: nat, FILTER: filt}

    # -- cleanup ---------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Remove every chain and hook kproxy owns, in every iptables flavour present."""
        for flavour in FLAVOURS:
            restore = _binary(self.family, flavour, "restore")
            if shutil.which(restore) is None:
                continue
            text = cleanup_text(
                {t: _save(self.family, flavour, t, self._run) for t in (NAT, FILTER, MANGLE)}
            )
            if not text:
                continue
            res = self._run(
                [restore, "--noflush", "-w", "5"],
                input=text,
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0:
                raise SyncError(f"{restore} cleanup failed: {res.stderr.strip()}")
            log.info("removed kproxy's IPv%d chains (%s)", self.family, flavour)


def cleanup_text(saved: dict[str, str]) -> str:
    """The restore input that removes kproxy's chains and hooks from `saved` tables."""
    out = []
    for table, text in saved.items():
        owned = [c for c in chains_in(text) if C.is_owned(table, c)]
        if not owned:
            continue
        builtin = C.BUILTIN.get(table, ())
        hooks = [
            "-D" + line[2:]
            for line in text.splitlines()
            if line.startswith("-A ")
            and line.split(" ", 2)[1] in builtin
            and line.rsplit("-j ", 1)[-1].split(" ", 1)[0] in owned
        ]
        out.append(f"*{table}\n")
        out.extend(f":{c} - [0:0]\n" for c in owned)
        out.extend(f"{h}\n" for h in hooks)
        out.extend(f"-X {c}\n" for c in owned)
        out.append("COMMIT\n")
    return "".join(out)
