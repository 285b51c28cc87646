"""The iptables dataplane: programs the renderer's rules with `iptables-restore --noflush`.

Owns the kernel side of iptables mode for one IP family:

- Flavour detection (legacy or nft), as kubelet's iptables-wrapper does: the flavour whose mangle
  table holds kubelet's KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY chain, else the one holding more
  rules, else nft. Binaries are iptables-<flavour>-restore/-save (ip6tables-* for IPv6).
- Full syncs declare every kproxy chain (which with --noflush flushes it) and refill it, delete
  owned chains that are no longer wanted, and insert missing hook jumps ("-I", never
  duplicated). Nothing that is still wanted is ever flushed outside the transaction that refills
  it, so a restart drops no established or new connection. The first full sync, and the first
  after a failure or a flush, reconciles with what the kernel really holds (the three tables are
  read back, so chains left by an earlier agent or kube-proxy are adopted or deleted); periodic
  full syncs trust what kproxy applied and read only the built-in chains, for the hooks.
- Partial syncs write only what changed: the chains of changed services whose text differs, the
  chains that disappeared (deleted), and in-place "-D"/"-I" edits of the shared chains for the
  lines that changed, all in one atomic restore. An endpoint change at 10k services rewrites one
  KUBE-SVC chain and one KUBE-SEP chain, not KUBE-SERVICES.
- A canary chain (KUBE-PROXY-CANARY in mangle, nat and filter, as kube-proxy), and `drift()`,
  the cheap "are the tables still ours" check the sync loop runs every sync period
  (kproxy.backends.iptables_drift: a ruleset fingerprint first, a read-back of the owned chains'
  rule counts, canaries and hooks only when the fingerprint moved). Drift makes the next sync a
  reconciling full one. A failed restore raises SyncError and makes the next sync full as well.

One deliberate exception to "one restore per sync": iptables-nft-restore (v1.8.9) with --noflush
is quadratic in the number of chains one input names (measured here: 10k services x 10 endpoints,
110k chains, did not finish in 15 minutes as one input, in about 25 s as 200-service inputs).
So nft full syncs above `nft_chunk_chains` chains are split at service boundaries: the service
chains go first, a service's chains always in one input (each service is old or new, never half
of each), and the last input rewrites the shared chains (KUBE-SERVICES...), deletes stale chains
and sets the canary. Until that last input lands, KUBE-SERVICES keeps jumping to the (already
rewritten, same-named) service chains, and removed services' chains still exist; if an input
fails, the next sync is full. Legacy restores rewrite the whole table per input, so legacy
always uses one.

Full-sync inputs are streamed into iptables-restore while later services are still being
rendered (see iptables_exec), so the restore's own parsing overlaps kproxy's rendering.

A floor kproxy cannot go under on nft: every rule an input adds makes the kernel re-validate all
chains reachable from the base chains (xt-compat matches and NAT targets carry validation
hooks), about 100 ms at 3k services and 300 ms at 10k here, however small the input (a
delete-only input takes 15 ms). A one-endpoint change therefore costs what a raw one-chain
restore costs; kproxy's own share is about a millisecond.

python-iptables is not used (nor a dependency): it drives only the legacy flavour, acts on the
calling process's namespace only, and reads nothing the save output does not already give.
"""

from __future__ import annotations

import base64
import logging
import re
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from kproxy.backends.base import SyncError, SyncResult
from kproxy.backends.iptables_drift import (
    OWN_NFT,
    compare_counts,
    fingerprint,
    nft_generation,
    saved_counts,
)
from kproxy.backends.iptables_exec import (
    ProcessRestorer,
    RestoreFailed,
    Restorer,
    RestoreSink,
    Run,
    RunRestorer,
    binary,
    cleanup_flavours,
    detect_flavour,
    save,
)
from kproxy.backends.iptables_rejects import find_rejected, short, suspects_of
from kproxy.backends.rejects import Rejected, admitted
from kproxy.model.codec import paused_gc
from kproxy.model.objects import Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Changes, Snapshot
from kproxy.model.view import build_views
from kproxy.render import chains as C
from kproxy.render.iptables import (
    FILTER,
    MANGLE,
    NAT,
    SHARED_SLOTS,
    Renderer,
    ServiceRules,
    Shared,
    TableWrite,
    assemble,
    full_writes,
)

log = logging.getLogger("kproxy.iptables")

NFT_CHUNK_CHAINS = 2000
MAX_REJECT_ROUNDS = 3  # find-and-retry rounds after a refused restore
TABLES = (NAT, FILTER, MANGLE)


def chains_in(save_text: str) -> list[str]:
    """Chain names declared in iptables-save output of one table."""
    return [line[1:].split(" ", 1)[0] for line in save_text.splitlines() if line.startswith(":")]


def missing_hooks(table: str, save_text: str) -> str:
    """ "-I" lines for the hook jumps of `table` absent from its saved built-in chains."""
    present = set(save_text.splitlines())
    lines = []
    for chain in C.BUILTIN.get(table, ()):
        # hooks_for gives the final order; inserting the last first leaves the first on top
        for hook in reversed(C.hooks_for(table, chain)):
            if hook.line not in present:
                lines.append(f"-I {hook.chain} 1 {hook.spec}\n")
    return "".join(lines)


def shared_edits(old: Shared, new: Shared) -> dict[str, str]:
    """table -> "-D"/"-I" lines that turn `old`'s lines in the shared chains into `new`'s.

    Lines of one service never overlap another service's matches, so their position in a
    shared chain does not matter; inserting at the top keeps KUBE-SERVICES' last rule last.
    """
    out: dict[str, list[str]] = {}
    for (table, _chain), before, after in zip(SHARED_SLOTS, old, new, strict=True):
        if before == after:
            continue
        gone = Counter(before.splitlines()) - Counter(after.splitlines())
        added = Counter(after.splitlines()) - Counter(before.splitlines())
        lines = out.setdefault(table, [])
        for line, n in gone.items():
            lines.extend(["-D" + line[2:] + "\n"] * n)
        for line, n in added.items():
            chain, _, spec = line[3:].partition(" ")
            lines.extend([f"-I {chain} 1 {spec}\n"] * n)
    return {table: "".join(lines) for table, lines in out.items()}


class _CommitCounting:
    """A restore sink that counts the table sections written (iptables-nft-restore commits
    each as its own nf_tables transaction: one generation each)."""

    def __init__(self, sink: RestoreSink, owner: IptablesProxier) -> None:
        self._sink = sink
        self._owner = owner

    def write(self, text: str) -> None:
        self._owner.commits += text.count("COMMIT\n")
        self._sink.write(text)

    def end(self) -> None:
        self._sink.end()

    def wait(self) -> None:
        self._sink.wait()

    def abort(self) -> None:
        self._sink.abort()


def _count(text: str) -> int:
    return text.count("\n")


_STATS = struct.Struct("=qI")  # per chain: a 64-bit digest of its lines, its rule count
_B32_HASH = 16  # the base32 characters of a per-service chain's hash (kproxy.render.chains)
_PREFIX_CODES = {prefix: code for code, prefix in enumerate(C.SERVICE_PREFIXES)}


def _pack_names(names: Iterable[str]) -> bytes | None:
    """Per-service chain names in 11 bytes each: the prefix's index in
    `C.SERVICE_PREFIXES`, then the 10 bytes the 16 base32 characters of the hash encode.
    None when a name is not of that shape."""
    out = bytearray()
    for name in names:
        code = _PREFIX_CODES.get(name[:-_B32_HASH])
        if code is None:
            return None
        try:
            raw = base64.b32decode(name[-_B32_HASH:])
        except ValueError:  # binascii.Error: not upper-case base32
            return None
        out.append(code)
        out += raw
    return bytes(out)


def _unpack_names(packed: bytes) -> tuple[str, ...]:
    prefixes = C.SERVICE_PREFIXES
    return tuple(
        prefixes[packed[i]] + base64.b32encode(packed[i + 1 : i + 11]).decode("ascii")
        for i in range(0, len(packed), 11)
    )


@dataclass(frozen=True, slots=True)
class Written:
    """What kproxy last wrote for one service: enough to diff its next rendering against,
    without the text. At 10k services x 10 endpoints the chains' text is ~55 MB; this keeps
    their names (packed: 11 bytes a name), a 64-bit digest of each chain's lines (Python's
    string hash: a collision between a chain's old and new text, 2^-64, would only skip
    rewriting that chain until the next full sync) and its rule count (what drift checks
    compare), the service's lines in the shared chains (needed verbatim for their "-D"
    edits) and its nat rule count. ~0.5 KB a service with 10 endpoints."""

    chains: bytes | str  # `_pack_names`; the names joined by "\n" when one does not fit
    stats: bytes  # `_STATS` per chain, in `names` order
    lines: Shared | str  # its lines in the shared chains; a str: nat KUBE-SERVICES lines only
    nat_rules: int

    @property
    def names(self) -> tuple[str, ...]:
        chains = self.chains
        if isinstance(chains, bytes):
            return _unpack_names(chains)
        return tuple(chains.split("\n")) if chains else ()

    @property
    def shared(self) -> Shared:
        lines = self.lines
        return Shared(lines) if isinstance(lines, str) else lines

    @classmethod
    def of(cls, block: ServiceRules) -> Written:
        names = [name for name, _ in block.chains]
        counts = [_count(text) for _, text in block.chains]
        stats = [_STATS.pack(hash(text), _count(text)) for _, text in block.chains]
        packed = _pack_names(names)
        shared = block.shared
        only_nat = shared == Shared(shared.nat_services)
        return cls(
            chains=packed if packed is not None else "\n".join(names),
            stats=b"".join(stats),
            lines=shared.nat_services if only_nat else shared,
            nat_rules=sum(counts),
        )

    def _stats(self) -> Iterator[tuple[int, int]]:
        return _STATS.iter_unpack(self.stats)

    def chain_digests(self) -> dict[str, int]:
        return {name: digest for name, (digest, _) in zip(self.names, self._stats(), strict=True)}

    def chain_counts(self) -> dict[str, int]:
        return {name: count for name, (_, count) in zip(self.names, self._stats(), strict=True)}


NOTHING_WRITTEN = Written(chains=b"", stats=b"", lines="", nat_rules=0)


class IptablesProxier:
    """Programs one IP family's kube-proxy-style rules. See the module docstring.

    It keeps a record of what it *wrote* per service (`Written`: chain names, digests, shared
    lines), not of the model: a partial sync diffs the new rendering against what the kernel
    holds, which after a refused service or a failed restore differs from the previous model."""

    def __init__(
        self,
        *,
        options: ProxyOptions,
        flavour: str | None = None,
        run: Run = subprocess.run,
        restorer: Restorer | None = None,
        clock: Callable[[], float] = time.monotonic,
        nft_chunk_chains: int = NFT_CHUNK_CHAINS,
    ) -> None:
        self.options = options
        self.family = options.family
        self._run = run
        # restores stream into the process, unless the caller injected its own runner
        self._restorer: Restorer = restorer or (
            ProcessRestorer() if run is subprocess.run else RunRestorer(run)
        )
        self._clock = clock
        self.flavour = flavour or detect_flavour(self.family, run)
        self.restore = binary(self.family, self.flavour, "restore")
        self.save_binary = binary(self.family, self.flavour, "save")
        self.iptables = binary(self.family, self.flavour, None)
        self.nft_chunk_chains = nft_chunk_chains
        self.renderer = Renderer(options)
        self._blocks: dict[Ref, Written] = {}
        self._nat_rules = 0
        self._filter_rules = 0
        self._need_full = True
        self._reconcile = True  # the next full sync reads the tables back (start-up, failures)
        # the canary and shared chains written, per table (the services' chains are in
        # `_blocks`: `_present` adds them when a full sync needs them)
        self._applied: dict[str, set[str]] = {t: set() for t in TABLES}
        # canary and shared chain -> rule count, per table, as last written; with the
        # services' chain counts in `_blocks`, what `inspect` compares with (`_expected_in`)
        self._expected: dict[str, dict[str, int]] = {t: {} for t in TABLES}
        self._fingerprint: tuple[object, ...] | None = None  # of the tables after our writes
        self._gen_before: int | None = None  # nft: the generation when this sync began
        self.commits = 0  # nft: table sections (one transaction each) written by this sync
        self.restores = 0  # restore invocations of the last sync
        # services whose block iptables refused, with its error: left out until they change
        self.rejected: dict[Ref, Rejected[ServiceRules]] = {}
        log.info("iptables mode: IPv%d via %s", self.family, self.restore)

    # -- kernel I/O ----------------------------------------------------------------------------
    def _open(self) -> RestoreSink:
        self.restores += 1
        sink = self._restorer.open([self.restore, "--noflush", "-w", "5"])
        return _CommitCounting(sink, self) if self.flavour == "nft" else sink

    def _finish(self, sink: RestoreSink) -> None:
        """Wait for a restore; a failure makes the next sync a reconciling full one."""
        try:
            sink.wait()
        except RestoreFailed as err:
            self._need_full = self._reconcile = True
            log.debug("refused restore input:\n%s", err.lines)
            raise SyncError(str(err)) from err

    def _apply(self, text: str) -> None:
        if not text:
            return
        sink = self._open()
        sink.write(text)
        self._finish(sink)

    def save(self, table: str) -> str:
        return save(self.family, self.flavour, table, self._run)

    def canary_missing(self) -> bool:
        """True when the mangle canary chain is gone (someone flushed the tables)."""
        res = self._run(
            [self.iptables, "-w", "5", "-t", MANGLE, "-S", C.CANARY],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            log.warning("canary chain %s is gone: tables were flushed, resyncing all", C.CANARY)
            self._reconcile = True
            return True
        return False

    def _builtin_rules(self, table: str) -> str:
        """The rules of the built-in chains kproxy hooks into, as iptables-save lines. nft
        lists single chains cheaply; legacy reads the whole table either way, so one save."""
        if self.flavour == "legacy":
            return self.save(table)
        out = []
        for chain in C.BUILTIN.get(table, ()):
            if not C.hooks_for(table, chain):
                continue
            res = self._run(
                [self.iptables, "-w", "5", "-t", table, "-S", chain],
                capture_output=True,
                text=True,
                check=False,
            )
            out.append(res.stdout)
        return "".join(out)

    # -- drift ---------------------------------------------------------------------------------
    def _record_written(self) -> None:
        """After each of kproxy's writes: the fingerprint `drift` compares with."""
        self._fingerprint = fingerprint(self.flavour, self.family, TABLES)
        if self.flavour == "nft" and self._fingerprint is not None:
            after = self._fingerprint[1]
            OWN_NFT.note(self._gen_before, after if isinstance(after, int) else None, self.commits)

    def drift(self) -> str | None:
        """None while the tables hold what kproxy wrote; else what differs (the next sync is
        then a reconciling full one). Costs a netlink round trip (nft) or three getsockopt
        calls (legacy) unless something wrote to the tables since kproxy's last write."""
        if self._need_full:
            return None  # the next sync rewrites everything anyway
        now = fingerprint(self.flavour, self.family, TABLES)
        if now is not None and now == self._fingerprint:
            return None
        if self._moved_only_by_kproxy(now):
            self._fingerprint = now  # the other IP family's proxier wrote, nobody else
            return None
        found = self.inspect()
        if found is None:
            self._fingerprint = now  # someone else wrote elsewhere; ours is intact
        else:
            self._need_full = self._reconcile = True
        return found

    def _moved_only_by_kproxy(self, now: tuple[object, ...] | None) -> bool:
        if self.flavour != "nft" or now is None or self._fingerprint is None:
            return False
        since, current = self._fingerprint[1], now[1]
        if not isinstance(since, int) or not isinstance(current, int):
            return False
        return OWN_NFT.only_own(since, current)

    def inspect(self) -> str | None:
        """The thorough half of `drift`: read the tables back and compare canaries, owned
        chains, their rule counts and the hook jumps with what kproxy last wrote."""
        for table in TABLES:
            text = self.save(table)
            if f":{C.CANARY} " not in text:
                return f"canary chain {C.CANARY} gone from {table}: tables were flushed"
            observed = saved_counts(text, (c for c in chains_in(text) if C.is_owned(table, c)))
            found = compare_counts(self._expected_in(table), observed)
            if found:
                return f"{table}: {found}"
            hooks = missing_hooks(table, text)
            if hooks:
                return f"{table}: hook jump missing ({hooks.splitlines()[0].strip()})"
        return None

    def _expected_in(self, table: str) -> dict[str, int]:
        """owned chain -> rule count in `table` as last written (built when asked: at 10k
        services x 10 endpoints a standing copy of the nat counts holds ~5 MB)."""
        out = dict(self._expected[table])
        if table == NAT:
            for block in self._blocks.values():
                out.update(block.chain_counts())
        return out

    def _present(self) -> dict[str, set[str]]:
        """The owned chains last written, per table."""
        out = {t: set(chains) for t, chains in self._applied.items()}
        for block in self._blocks.values():
            out[NAT].update(block.names)
        return out

    # -- syncing -------------------------------------------------------------------------------
    def sync(self, snapshot: Snapshot, changes: Changes, *, full: bool) -> SyncResult:
        if self.rejected:  # deleted services are forgotten
            self.rejected = {r: b for r, b in self.rejected.items() if r in snapshot.services}
        try:
            return self._sync_once(snapshot, changes, full=full)
        except SyncError as err:
            return self._sync_without_rejected(snapshot, err)

    def _sync_once(self, snapshot: Snapshot, changes: Changes, *, full: bool) -> SyncResult:
        self.restores = self.commits = 0
        self._gen_before = nft_generation() if self.flavour == "nft" else None
        full = full or changes.full or changes.node_changed or self._need_full
        if full:
            return self._full_sync(snapshot)
        return self._partial_sync(snapshot, changes.services)

    def _render(self, snapshot: Snapshot, refs: Iterable[Ref] | None) -> dict[Ref, ServiceRules]:
        views = build_views(
            snapshot, family=self.family, node_name=self.options.node_name, refs=refs
        )
        render = self.renderer.render_service
        return {ref: render(v) for ref, v in views.items()}

    def _full_sync(self, snapshot: Snapshot) -> SyncResult:
        self._need_full = True  # until this sync has landed
        reconcile = self._reconcile
        if reconcile:
            # start-up or after trouble: what is really there decides what goes
            existing = {t: self.save(t) for t in TABLES}
            present = {t: set(chains_in(existing[t])) for t in TABLES}
            builtin = existing
        else:
            present = self._present()
            builtin = {t: self._builtin_rules(t) for t in (NAT, FILTER)}
        hooks = {t: missing_hooks(t, builtin.get(t, "")) for t in TABLES}
        with paused_gc():  # rendering 10k services allocates no cycles
            if self.flavour == "legacy":
                blocks, shared, delete = self._stream_legacy(snapshot, present, hooks)
            else:
                blocks, shared, delete = self._stream_nft(snapshot, present, hooks)
        self._blocks = blocks
        wanted: dict[str, set[str]] = {NAT: {C.CANARY}, FILTER: {C.CANARY}, MANGLE: {C.CANARY}}
        for table, chain in shared:
            wanted[table].add(chain)
        self._applied = wanted
        self._reconcile = False
        self._nat_rules = sum(_count(t) for (table, _), t in shared.items() if table == NAT)
        self._nat_rules += sum(b.nat_rules for b in blocks.values())
        self._filter_rules = sum(_count(t) for (table, _), t in shared.items() if table == FILTER)
        self._expected = _expected_counts(shared)
        self._need_full = False
        self._record_written()
        return SyncResult(
            full=True,
            services_written=len(blocks),
            rules=self._rule_counts(),
            detail=(
                f"{self.flavour}: {self.restores} restore(s), {len(delete)} stale chains"
                f"{', tables read back' if reconcile else ''}"
            ),
        )

    def _blocks_of(self, snapshot: Snapshot) -> Iterator[tuple[Ref, ServiceRules]]:
        """Every non-empty service block, in namespace/name order, rendered on demand."""
        render = self.renderer.render_service
        node = self.options.node_name
        for ref in sorted(snapshot.services):
            views = build_views(snapshot, family=self.family, node_name=node, refs=(ref,))[ref]
            block = render(views)
            if not block.empty and self._admitted(ref, block):
                yield ref, block

    def _deletions(
        self,
        present: Mapping[str, set[str]],
        shared: Mapping[tuple[str, str], str],
        blocks: Mapping[Ref, Written],
    ) -> dict[str, list[str]]:
        """Owned chains present but no longer wanted, per table."""
        keep = {t: set(present[t]) for t in TABLES}
        for table, chain in shared:
            keep[table].discard(chain)
        for b in blocks.values():
            keep[NAT].difference_update(b.names)
        return {t: sorted(c for c in keep[t] if C.is_owned(t, c) and c != C.CANARY) for t in TABLES}

    def _final_writes(
        self,
        shared: Mapping[tuple[str, str], str],
        blocks: Iterable[ServiceRules],
        delete: Mapping[str, list[str]],
        hooks: Mapping[str, str],
    ) -> list[TableWrite]:
        return [
            TableWrite(w.table, chains=w.chains, edits=hooks.get(w.table, ""), delete=w.delete)
            for w in full_writes(shared, blocks, delete=delete, canary=True)
        ]

    def _stream_legacy(
        self, snapshot: Snapshot, present: Mapping[str, set[str]], hooks: Mapping[str, str]
    ) -> tuple[dict[Ref, Written], dict[tuple[str, str], str], list[str]]:
        """One restore, written while it is being rendered: the nat table first (fixed chains,
        then each service's block as soon as it is rendered, declarations before rules within
        a block, then the shared chains that jump into the blocks), then filter and mangle."""
        blocks: dict[Ref, Written] = {}
        sink = self._open()
        try:
            fixed = self.renderer.fixed_nat()
            sink.write("*nat\n" + "".join(f":{c} - [0:0]\n" for c, _ in fixed))
            sink.write("".join(text for _, text in fixed))
            for ref, block in self._blocks_of(snapshot):
                blocks[ref] = Written.of(block)
                sink.write("".join(f":{c} - [0:0]\n" for c, _ in block.chains))
                sink.write("".join(text for _, text in block.chains))
            shared = self.renderer.shared_chains(b.shared for b in blocks.values())
            delete = self._deletions(present, shared, blocks)
            fixed_names = {c for c, _ in fixed}
            writes = self._final_writes(shared, (), delete, hooks)
            writes.sort(key=lambda w: w.table != NAT)  # finish the open nat section first
            for w in writes:
                if w.table == NAT:  # the fixed chains are already written
                    w = TableWrite(
                        NAT,
                        chains=[(c, t) for c, t in w.chains if c not in fixed_names],
                        edits=w.edits,
                        delete=w.delete,
                    )
                    sink.write(assemble([w], sort=False).removeprefix("*nat\n"))
                else:
                    sink.write(assemble([w], sort=False))
        except BaseException:
            sink.abort()
            raise
        self._finish(sink)
        return blocks, shared, delete[NAT]

    def _stream_nft(
        self, snapshot: Snapshot, present: Mapping[str, set[str]], hooks: Mapping[str, str]
    ) -> tuple[dict[Ref, Written], dict[tuple[str, str], str], list[str]]:
        """Service chains in inputs of about nft_chunk_chains chains (each service whole),
        each restored while the next is rendered; then one input with the shared chains,
        deletions, hooks and canaries. Small rulesets go in a single input."""
        blocks: dict[Ref, Written] = {}
        unsent: list[ServiceRules] = []  # rendered text is kept only until it is written
        fixed = [(c, t) for c, t in self.renderer.fixed_nat() if c in C.NAT_FIXED_TARGETS]
        chunk: list[tuple[str, str]] = list(fixed)
        pending: RestoreSink | None = None
        sent = False

        def send(chains: list[tuple[str, str]]) -> None:
            """Restore `chains` once the input before them is done (one restore at a time)."""
            nonlocal pending
            text = assemble([TableWrite(NAT, chains=chains)])
            if pending is not None:
                self._finish(pending)
            pending = self._open()
            pending.write(text)
            pending.end()

        try:
            for ref, block in self._blocks_of(snapshot):
                blocks[ref] = Written.of(block)
                chunk.extend(block.chains)
                if not sent:
                    unsent.append(block)
                if len(chunk) >= self.nft_chunk_chains:
                    send(chunk)
                    chunk, sent, unsent = [], True, []
            shared = self.renderer.shared_chains(b.shared for b in blocks.values())
            delete = self._deletions(present, shared, blocks)
            if sent and chunk:
                send(chunk)
            if pending is not None:
                self._finish(pending)
                pending = None
            final = self._final_writes(shared, unsent, delete, hooks)
            self._apply(assemble(final))
        except BaseException:
            if pending is not None:
                pending.abort()
            raise
        return blocks, shared, delete[NAT]

    def _partial_sync(self, snapshot: Snapshot, refs: frozenset[Ref]) -> SyncResult:
        if not refs:
            return SyncResult(full=False, rules=self._rule_counts())
        rendered = self._render(snapshot, refs)
        chains: list[tuple[str, str]] = []
        delete: list[str] = []
        edits: dict[str, list[str]] = {}
        changed: dict[Ref, Written] = {}
        nat_delta = filter_delta = 0
        for ref, block in rendered.items():
            old = self._blocks.get(ref, NOTHING_WRITTEN)
            new = Written.of(block)
            if new == old or not self._admitted(ref, block):
                continue
            changed[ref] = new
            before = old.chain_digests()
            chains.extend((c, t) for c, t in block.chains if before.get(c) != hash(t))
            kept = set(new.names)
            delete.extend(c for c in old.names if c not in kept)
            for table, text in shared_edits(old.shared, new.shared).items():
                edits.setdefault(table, []).append(text)
            nat_delta += new.nat_rules - old.nat_rules
            for (table, _), a, b in zip(SHARED_SLOTS, old.shared, new.shared, strict=True):
                if table == NAT:
                    nat_delta += _count(b) - _count(a)
                else:
                    filter_delta += _count(b) - _count(a)
        if not changed:
            return SyncResult(full=False, rules=self._rule_counts())
        writes = [
            TableWrite(FILTER, edits="".join(edits.get(FILTER, ()))),
            TableWrite(NAT, chains=chains, edits="".join(edits.get(NAT, ())), delete=delete),
        ]
        self._apply(assemble(writes))
        changed_old = {ref: self._blocks.get(ref, NOTHING_WRITTEN) for ref in changed}
        for ref, written in changed.items():
            if written == NOTHING_WRITTEN:
                self._blocks.pop(ref, None)
            else:
                self._blocks[ref] = written
        self._nat_rules += nat_delta
        self._filter_rules += filter_delta
        self._expect_partial(changed_old)
        self._record_written()
        return SyncResult(
            full=False,
            services_written=len(changed),
            rules=self._rule_counts(),
            detail=f"{len(chains)} chains written, {len(delete)} deleted",
        )

    def _expect_partial(self, changed: Mapping[Ref, Written]) -> None:
        """Keep `_expected`'s shared chain counts in step with a partial write (`changed`: the
        blocks before it; the services' own chains are counted in their new blocks)."""
        for ref, old in changed.items():
            new = self._blocks.get(ref, NOTHING_WRITTEN)
            for (table, chain), a, b in zip(SHARED_SLOTS, old.shared, new.shared, strict=True):
                if a != b:
                    counts = self._expected[table]
                    counts[chain] = counts.get(chain, 0) + _count(b) - _count(a)

    # -- services iptables refuses ------------------------------------------------------------
    def _admitted(self, ref: Ref, block: ServiceRules) -> bool:
        """False for a block iptables already refused; a service that changed is tried again."""
        return admitted(self.rejected, ref, block, tool="iptables", name=_name(ref), log=log)

    def _sync_without_rejected(self, snapshot: Snapshot, failure: SyncError) -> SyncResult:
        """After a refused restore: find the services iptables refuses on their own (see
        iptables_rejects), leave them out, and program everything else in a full sync (a few
        rounds, when one refused line hid another). When no service is to blame, or the sync
        fails even without them, `failure` stands."""
        before = dict(self.rejected)
        for _ in range(MAX_REJECT_ROUNDS):
            candidates = [
                (ref, block)
                for ref, block in self._render(snapshot, sorted(snapshot.services)).items()
                if not block.empty and self._admitted(ref, block)
            ]
            found = find_rejected(
                candidates,
                (self._test_probe, self._probe),
                suspects=suspects_of(candidates, _refused_line(failure)),
                max_chains=self.nft_chunk_chains,
            )
            if not found:
                break
            blocks = dict(candidates)
            for ref, error in found.items():
                self.rejected[ref] = Rejected(blocks[ref], error)
                log.error(
                    "iptables refused the rules of service %s (IPv%d), leaving it out: %s",
                    _name(ref),
                    self.family,
                    error,
                    extra={"service": _name(ref), "family": self.family, "error": error},
                )
            try:
                return self._full_sync(snapshot)
            except SyncError as err:
                failure = err
        self.rejected = before  # not their fault after all
        raise failure

    def _probe(self, text: str, *flags: str) -> str:
        """Restore `text` (a probe that leaves nothing behind): "" or iptables' error."""
        self.restores += 1
        sink = self._restorer.open([self.restore, "--noflush", "-w", "5", *flags])
        sink.write(text)
        try:
            sink.wait()
        except RestoreFailed as err:
            return str(err)
        return ""

    def _test_probe(self, text: str) -> str:
        """`_probe` with --test: parsed only, nothing sent to the kernel (cheap)."""
        return self._probe(text, "--test")

    def _rule_counts(self) -> dict[str, int]:
        return {NAT: self._nat_rules, FILTER: self._filter_rules}

    @property
    def programmed(self) -> Mapping[Ref, Written]:
        """What was last written for each service (chain names and digests, for status and
        tests; `kproxy status` reads the rules themselves back from the kernel)."""
        return dict(self._blocks)

    # -- cleanup -------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Remove every chain and hook kproxy owns, in every iptables flavour present."""
        try:
            cleaned = cleanup_flavours(self.family, TABLES, cleanup_text, self._run)
        except RestoreFailed as err:
            raise SyncError(f"cleanup failed: {err}") from err
        for flavour in cleaned:
            log.info("removed kproxy's IPv%d chains (%s)", self.family, flavour)
        self._blocks = {}
        self._applied = {t: set() for t in TABLES}
        self._need_full = self._reconcile = True


def _expected_counts(shared: Mapping[tuple[str, str], str]) -> dict[str, dict[str, int]]:
    """canary and shared chain -> rule count per table, for a full write of `shared`."""
    out: dict[str, dict[str, int]] = {t: {C.CANARY: 0} for t in TABLES}
    for (table, chain), text in shared.items():
        out[table][chain] = _count(text)
    return out


def _name(ref: Ref) -> str:
    return f"{short(ref.namespace)}/{short(ref.name)}"


def _refused_line(failure: SyncError) -> str:
    """The input line iptables-restore named in `failure` ("Error occurred at line: N"), from
    the excerpt RestoreFailed keeps; "" when it named none."""
    cause = failure.__cause__
    if not isinstance(cause, RestoreFailed):
        return ""
    m = re.search(r"line:? (\d+)", str(cause))
    if not m:
        return ""
    prefix = f"{m.group(1)}: "
    for line in cause.lines.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :]
    return ""


def cleanup_text(saved: Mapping[str, str]) -> str:
    """The restore input that removes kproxy's chains, and every rule jumping to them from
    chains kproxy does not own (the hooks), from `saved` tables (table -> iptables-save text)."""
    out = []
    for table, text in saved.items():
        owned = [c for c in chains_in(text) if C.is_owned(table, c)]
        if not owned:
            continue
        targets = set(owned)
        jumps = []
        for line in text.splitlines():
            if not line.startswith("-A "):
                continue
            chain = line.split(" ", 2)[1]
            target = line.rsplit("-j ", 1)[-1].split(" ", 1)[0] if "-j " in line else ""
            if chain not in targets and target in targets:
                jumps.append("-D" + line[2:] + "\n")
        out.append(f"*{table}\n")
        out.extend(f":{c} - [0:0]\n" for c in owned)
        out.extend(jumps)
        out.extend(f"-X {c}\n" for c in owned)
        out.append("COMMIT\n")
    return "".join(out)
