"""The nftables dataplane: one `kube-proxy` table per family (see kproxy.render.nftables).

- Full syncs (start-up, after a failure, when the table was tampered with, periodically) are
  one transaction that re-declares the table, flushes what kproxy owns and refills it, and
  deletes stale service chains and sets: atomic, so nothing is ever missing in between and a
  restart drops no connection. With the netlink writer it is one netlink batch
  (`kproxy.backends.nft_netlink.FullSync`, no text and no nft); otherwise, or when the kernel
  refuses that batch, the same transaction as `nft -f` text (`full_chunks`). Start-up reads
  back which chains and sets exist (so chains left by an earlier agent or kube-proxy are
  deleted); later full syncs trust memory.
- Partial syncs send only the delta of the changed services (`delta_ops`): new or rewritten
  per-service chains, element additions and deletions in the shared maps. They are encoded by
  `Writer`, which is `nft -f` by default; `kproxy.backends.nft_netlink` writes the same ops
  over a persistent netlink socket, without nft's per-command cache fetch.
- Nothing is deleted on stop; `cleanup` deletes the table.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from kproxy.backends.base import SyncError, SyncResult
from kproxy.backends.iptables_exec import ProcessRestorer, RestoreFailed, Restorer, RunRestorer
from kproxy.backends.nftables_rejects import find_refused, suspects_of
from kproxy.backends.rejects import Rejected, admitted
from kproxy.model.objects import Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Changes, Snapshot
from kproxy.model.view import ServicePortView, build_views
from kproxy.render.nftables import (
    EMPTY_BLOCK,
    TABLE,
    ElementKey,
    FastTexts,
    Op,
    Owners,
    Renderer,
    ServiceBlock,
    SetDef,
    apply_counts,
    block_text,
    count_map_name,
    count_maps_of,
    delta_ops,
    element_counts,
    family_word,
    full_chunks,
    full_text,
    is_count_map,
    is_service_chain,
    is_service_set,
    new_count_maps,
    ops_text,
)

log = logging.getLogger("kproxy.nftables")
MAX_REJECT_ROUNDS = 3  # find-and-retry rounds after a refused full sync

Run = Callable[..., "subprocess.CompletedProcess[str]"]


class Writer(Protocol):
    """Applies the ops of one partial sync as one transaction."""

    def apply(self, ops: Sequence[Op]) -> None: ...

    def table_exists(self) -> bool: ...


def nft_binary() -> str:
    path = shutil.which("nft")
    if path is None:
        raise SyncError("nftables mode needs the nft command (Debian package nftables)")
    return path


def _exit_text(code: int) -> str:
    """How nft ended, when it printed nothing (nft 1.0.6 crashes on some inputs)."""
    return f"nft killed by signal {-code}" if code < 0 else f"nft exited {code}"


NO_NF_TABLES = (
    "this kernel has no nf_tables (the nftables mode needs CONFIG_NF_TABLES and "
    "CONFIG_NETFILTER_NETLINK, as Debian 12's 6.1 and newer have; kube-proxy requires >= 5.13)"
)


def _missing_nf_tables(err: str) -> bool:
    return "Protocol not supported" in err or "Operation not supported" in err


def _nft_error(err: str) -> str:
    if _missing_nf_tables(err):
        return f"{NO_NF_TABLES}: {err}"
    return f"nft -f failed: {err[-2000:]}"


def run_nft(args: Sequence[str], *, stdin: str | None = None, run: Run = subprocess.run) -> str:
    """Run nft; a missing nf_tables kernel surfaces here with a clear message."""
    res = run([nft_binary(), *args], input=stdin, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        err = res.stderr.strip()
        if _missing_nf_tables(err):
            raise SyncError(f"{NO_NF_TABLES}: {err}")
        raise SyncError(f"nft {' '.join(args[:2])} failed: {err[-2000:]}")
    return res.stdout


class NftCommandWriter:
    """Partial syncs through `nft -f -` (nft reads the table's cache before each command)."""

    def __init__(self, family: int, run: Run = subprocess.run) -> None:
        self.family = family
        self._run = run

    def apply(self, ops: Sequence[Op]) -> None:
        run_nft(["-f", "-"], stdin=ops_text(ops, self.family), run=self._run)

    def table_exists(self) -> bool:
        res = self._run(
            [nft_binary(), "list", "table", family_word(self.family), TABLE, "-t"],
            capture_output=True,
            text=True,
            check=False,
        )
        return res.returncode == 0


def _default_writer(family: int, run: Run) -> Writer:
    """Partial syncs over netlink (kproxy.backends.nft_netlink), falling back to `nft -f` for
    what that codec does not encode."""
    from kproxy.backends.nft_netlink import NetlinkWriter

    fallback = NftCommandWriter(family, run)
    try:
        return NetlinkWriter(family, fallback=fallback)
    except OSError as err:
        raise SyncError(f"{NO_NF_TABLES}: no nf_tables netlink socket: {err}") from err


def read_objects(family: int, run: Run = subprocess.run) -> tuple[set[str], dict[str, int]]:
    """(chains, sets) of the kube-proxy table of `family` as they are in the kernel; each set
    with its timeout in seconds (0 for none)."""
    fw = family_word(family)
    res = run(
        [nft_binary(), "-j", "-t", "list", "table", fw, TABLE],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:  # no table yet
        return set(), {}
    chains: set[str] = set()
    sets: dict[str, int] = {}
    for item in json.loads(res.stdout).get("nftables", ()):
        if "chain" in item:
            chains.add(item["chain"]["name"])
        elif "set" in item or "map" in item:
            s = item.get("set") or item["map"]
            sets[s["name"]] = int(s.get("timeout", 0))
    return chains, sets


class _Present:
    """The chains and sets (with their timeouts) a full sync finds in the table, and what it
    therefore deletes or recreates."""

    def __init__(self, chains: set[str], sets: dict[str, int], keep_stale: bool) -> None:
        self.chains = chains
        self.sets = sets
        self.keep_stale = keep_stale

    def stale(
        self, blocks: Mapping[Ref, ServiceBlock], fast_maps: Iterable[int]
    ) -> tuple[list[str], list[str]]:
        """(chains, sets) of the table that neither `blocks` nor the fast-path maps of
        `fast_maps` (their endpoint counts) keep, and that kproxy owns."""
        if self.keep_stale:
            return [], []
        wanted_chains = {c for b in blocks.values() for c, _ in b.chains}
        wanted_sets = {s.name for b in blocks.values() for s in b.sets}
        wanted_sets |= {
            count_map_name(n)
            for b in blocks.values()
            for n in count_maps_of(e.set for e in b.elements)
        }
        wanted_sets |= {count_map_name(n) for n in fast_maps}
        chains = sorted(c for c in self.chains - wanted_chains if is_service_chain(c))
        gone = self.sets.keys() - wanted_sets
        return chains, sorted(s for s in gone if is_service_set(s) or is_count_map(s))

    def redefined(self, s: SetDef) -> bool:
        """An affinity set whose timeout changed (recreated, see delta_ops)."""
        return self.sets.get(s.name, s.timeout) != s.timeout


class NftablesProxier:
    """Programs one IP family's kube-proxy table. See the module docstring."""

    def __init__(
        self,
        *,
        options: ProxyOptions,
        writer: Writer | None = None,
        run: Run = subprocess.run,
        restorer: Restorer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.family = options.family
        self._run = run
        self._clock = clock
        self.renderer = Renderer(options)
        self.writer: Writer = writer or _default_writer(self.family, run)
        self._restorer: Restorer = restorer or (
            ProcessRestorer() if run is subprocess.run else RunRestorer(run)
        )
        self._blocks: dict[Ref, ServiceBlock] = {}
        self._counts: dict[ElementKey, Owners] = {}  # see delta_ops
        self._count_maps: set[int] = set()  # N of the fast-path maps in the table
        self._need_full = True
        self._reconcile = True
        self._state: tuple[int, int | None] | None = None
        self._rules = 0
        # services whose block nft or the kernel refused, with the error: left out until they
        # change (see kproxy.backends.nftables_rejects)
        self.rejected: dict[Ref, Rejected[ServiceBlock]] = {}
        self.netlink_full_failures = 0  # full syncs the kernel refused over netlink (see above)
        log.info("nftables mode: IPv%d, table %s %s", self.family, family_word(self.family), TABLE)

    # -- syncing -------------------------------------------------------------------------------
    def sync(self, snapshot: Snapshot, changes: Changes, *, full: bool) -> SyncResult:
        if self.rejected:  # deleted services are forgotten
            self.rejected = {r: b for r, b in self.rejected.items() if r in snapshot.services}
        full = full or changes.full or changes.node_changed or self._need_full
        try:
            if full:
                result = self._full_sync(snapshot)
            else:
                result = self._partial_sync(snapshot, changes.services)
        except SyncError as err:
            result = self._recover(snapshot, err, tried_full=full)
        self._remember_state()
        return result

    # -- drift ---------------------------------------------------------------------------------
    def _remember_state(self) -> None:
        """After each of kproxy's writes: the ruleset generation and the table's object count."""
        state = getattr(self.writer, "state", None)
        self._state = state() if state is not None else None

    def drift(self) -> str | None:
        """The periodic check (kproxy.runtime.runner): None while the kernel holds what kproxy
        wrote. Cheap: one GETGEN round trip while nobody else committed anything to nftables;
        when someone did (iptables-nft, a CNI, a person), one GETTABLE: the table must still
        exist and hold as many chains and sets as after kproxy's last write."""
        state = getattr(self.writer, "state", None)
        if state is None or self._state is None:
            return None if self.writer.table_exists() else f"table {TABLE} is gone"
        gen, use = state()
        if gen == self._state[0]:
            return None
        if use is None:
            self._reconcile = True
            return f"table {family_word(self.family)} {TABLE} is gone"
        if use != self._state[1]:
            self._reconcile = True
            return f"table {TABLE} holds {use} chains and sets, kproxy wrote {self._state[1]}"
        self._state = (gen, use)
        return None

    def _render_all(self, snapshot: Snapshot) -> dict[Ref, ServiceBlock]:
        views = build_views(snapshot, family=self.family, node_name=self.options.node_name)
        render = self.renderer.render_service
        out = {}
        for ref in sorted(views):
            block = render(views[ref])
            if not block.empty:
                out[ref] = block
        return out

    def _blocks_of(
        self, snapshot: Snapshot, into: dict[Ref, ServiceBlock]
    ) -> Iterator[ServiceBlock]:
        """Every non-empty service block in namespace/name order, rendered on demand (and
        recorded in `into`)."""
        render = self.renderer.render_service
        node = self.options.node_name
        for ref in sorted(snapshot.services):
            views = build_views(snapshot, family=self.family, node_name=node, refs=(ref,))[ref]
            block = render(views)
            if not block.empty and self._admitted(ref, block):
                into[ref] = block
                yield block

    def _full_sync(self, snapshot: Snapshot, *, keep_stale: bool = False) -> SyncResult:
        """One transaction: over netlink when the writer is kproxy's nf_tables codec
        (`_full_sync_netlink`), else (or when the kernel refused that batch) through `nft -f`
        (`_full_sync_text`).

        The cyclic garbage collector is paused meanwhile, and what survives is moved out of its
        sight (as the DNS worker does with its index): ~1M small acyclic objects (views,
        blocks, elements) that live until the next full sync and are freed by reference
        counting; collecting them would walk them all, 0.3-0.5 s at 10k services."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._full_sync_inner(snapshot, keep_stale=keep_stale)
        finally:
            gc.freeze()
            if collecting:
                gc.enable()

    def _full_sync_inner(self, snapshot: Snapshot, *, keep_stale: bool) -> SyncResult:
        self._need_full = True  # until this sync has landed
        reconcile = self._reconcile
        if reconcile:
            present_chains, present_sets = read_objects(self.family, self._run)
        else:
            present_chains = {c for b in self._blocks.values() for c, _ in b.chains}
            present_sets = {s.name: s.timeout for b in self._blocks.values() for s in b.sets}
            present_sets |= {count_map_name(n): 0 for n in self._count_maps}
        present = _Present(present_chains, present_sets, keep_stale)
        send = getattr(self.writer, "send", None)
        if send is not None:
            from kproxy.backends.nft_netlink import NftError

            try:
                return self._full_sync_netlink(snapshot, send, present, reconcile)
            except NftError as err:
                # the transaction changed nothing: the same sync through `nft -f`, whose error
                # (if it fails too) names the refused command for the search in `_recover`
                log.warning(
                    "nftables full sync over netlink failed (%s): trying it through nft -f", err
                )
                self.netlink_full_failures += 1
        return self._full_sync_text(snapshot, present, reconcile)

    def _full_sync_netlink(
        self,
        snapshot: Snapshot,
        send: Callable[[Any], None],
        present: _Present,
        reconcile: bool,
    ) -> SyncResult:
        """The full sync as one netlink batch (kproxy.backends.nft_netlink.FullSync): no text,
        no nft. A fast-path service is encoded straight from its views, and its block rendered
        while the kernel commits the batch (the `sendmsg` runs in a helper thread; the kernel
        processes the batch inside it, without the GIL)."""
        from kproxy.backends.nft_netlink import FullSync

        enc = FullSync(self.renderer)
        enc.begin()
        blocks: dict[Ref, ServiceBlock] = {}
        deferred: dict[Ref, Sequence[ServicePortView]] = {}  # fast-path services: views
        order: list[Ref] = []
        render = self.renderer.render_service
        node = self.options.node_name
        for ref in sorted(snapshot.services):
            v = build_views(snapshot, family=self.family, node_name=node, refs=(ref,))[ref]
            if ref not in self.rejected and enc.service(v):
                deferred[ref] = v
                order.append(ref)
                continue
            block = render(v)
            if not block.empty and self._admitted(ref, block):
                blocks[ref] = block
                order.append(ref)
                enc.block(block, present.redefined)
        stale_chains, stale_sets = present.stale(blocks, set(enc.count_maps))
        enc.end(stale_chains, stale_sets)
        failed: list[BaseException] = []

        def commit() -> None:
            try:
                send(enc)
            except BaseException as err:  # handed to the caller's thread
                failed.append(err)

        worker = threading.Thread(target=commit, name="nft-full-sync", daemon=True)
        worker.start()
        try:
            for ref, views in deferred.items():
                blocks[ref] = render(views)
            deferred.clear()
            done = self._landed(blocks, order)
        finally:
            worker.join()
        if failed:
            self._reconcile = True
            raise failed[0]
        return self._commit_landed(done, stale_chains, reconcile)

    def _full_sync_text(self, snapshot: Snapshot, present: _Present, reconcile: bool) -> SyncResult:
        """The full sync as one `nft -f` transaction, written while it is being rendered.

        nft 1.0.6 reads its whole input (8.4 MB at 10k services in ~10 ms) before it parses,
        evaluates and commits any of it, so nothing before the end of the input overlaps
        nft's work: a fast-path service's elements are formatted straight from its views
        (`Renderer.fast_texts`), and its `ServiceBlock` rendered after the end of the input,
        while nft evaluates and commits."""
        blocks: dict[Ref, ServiceBlock] = {}
        deferred: dict[Ref, Sequence[ServicePortView]] = {}  # fast-path services: views
        order: list[Ref] = []  # the services written, in order
        fast_sets: set[str] = set()  # the fast-path maps the deferred services use
        stale_chains: list[str] = []

        def items() -> Iterator[ServiceBlock | FastTexts]:
            render = self.renderer.render_service
            fast = self.renderer.fast_texts
            node = self.options.node_name
            for ref in sorted(snapshot.services):
                views = build_views(snapshot, family=self.family, node_name=node, refs=(ref,))
                v = views[ref]
                texts = fast(v) if ref not in self.rejected else None
                if texts is not None:
                    deferred[ref] = v
                    order.append(ref)
                    fast_sets.update(name for name, _, _ in texts.elements)
                    yield texts
                    continue
                block = render(v)
                if not block.empty and self._admitted(ref, block):
                    blocks[ref] = block
                    order.append(ref)
                    yield block

        def stale() -> tuple[list[str], list[str]]:
            chains, sets = present.stale(blocks, count_maps_of(fast_sets))
            stale_chains.extend(chains)
            return chains, sets

        chunks = full_chunks(self.renderer, items(), stale=stale, redefined=present.redefined)
        sink = self._restorer.open([nft_binary(), "-f", "-"])
        try:
            for chunk in chunks:
                sink.write(chunk)
            sink.end()
        except BaseException:
            sink.abort()
            raise
        # while nft evaluates and commits its input (kept only if that succeeds): the blocks
        # of the fast-path services, and the element counts
        render = self.renderer.render_service
        for ref, v in deferred.items():
            blocks[ref] = render(v)
        deferred.clear()  # the views (~150,000 objects) are freed now, not after nft is done
        done = self._landed(blocks, order)
        try:
            sink.wait()
        except RestoreFailed as err:
            self._reconcile = True
            raise SyncError(_nft_error(str(err))) from err
        return self._commit_landed(done, stale_chains, reconcile)

    def _landed(
        self, blocks: dict[Ref, ServiceBlock], order: Sequence[Ref]
    ) -> tuple[dict[Ref, ServiceBlock], dict[ElementKey, Owners], set[int]]:
        """What a full sync leaves in memory (kept once it has landed): the blocks in the order
        written, their element owners and the fast-path maps."""
        ordered = {ref: blocks[ref] for ref in order}
        counts = element_counts(ordered.items())
        return ordered, counts, count_maps_of({name for name, _ in counts})

    def _commit_landed(
        self,
        done: tuple[dict[Ref, ServiceBlock], dict[ElementKey, Owners], set[int]],
        stale_chains: Sequence[str],
        reconcile: bool,
    ) -> SyncResult:
        self._blocks, self._counts, self._count_maps = done
        self._rules = sum(b.rule_count for b in self._blocks.values())
        self._need_full = self._reconcile = False
        return SyncResult(
            full=True,
            services_written=len(self._blocks),
            rules={TABLE: self._rules},
            detail=f"{len(stale_chains)} stale chains{', read back' if reconcile else ''}",
        )

    def _partial_sync(self, snapshot: Snapshot, refs: Iterable[Ref]) -> SyncResult:
        refs = list(refs)
        if not refs:
            return SyncResult(full=False, rules={TABLE: self._rules})
        views = build_views(
            snapshot, family=self.family, node_name=self.options.node_name, refs=refs
        )
        render = self.renderer.render_service
        new = {ref: render(v) for ref, v in views.items()}
        changed = {
            ref: b
            for ref, b in new.items()
            if b != self._blocks.get(ref, EMPTY_BLOCK) and self._admitted(ref, b)
        }
        if not changed:
            return SyncResult(full=False, rules={TABLE: self._rules})
        ops, counts = delta_ops(
            self._blocks, changed, self._counts, family=self.family, count_maps=self._count_maps
        )
        try:
            self.writer.apply(ops)
        except Exception as err:
            self._need_full = self._reconcile = True
            raise SyncError(f"nftables partial sync failed: {err}") from err
        apply_counts(self._counts, counts)
        self._count_maps |= new_count_maps(ops)
        for ref, block in changed.items():
            self._rules += block.rule_count - self._blocks.get(ref, EMPTY_BLOCK).rule_count
            if block.empty:
                self._blocks.pop(ref, None)
            else:
                self._blocks[ref] = block
        return SyncResult(
            full=False,
            services_written=len(changed),
            rules={TABLE: self._rules},
            detail=f"{len(ops)} ops",
        )

    # -- what nft or the kernel refuses ---------------------------------------------------------
    def _admitted(self, ref: Ref, block: ServiceBlock) -> bool:
        """False for a block nftables already refused; a service that changed is tried again."""
        return admitted(self.rejected, ref, block, tool="nftables", name=str(ref), log=log)

    def _recover(self, snapshot: Snapshot, failure: SyncError, *, tried_full: bool) -> SyncResult:
        """After a refused transaction: a full sync (unless that is what failed); when that is
        refused too, find the services refused on their own (kproxy.backends.nftables_rejects),
        leave them out and sync the rest, a few rounds when one refusal hid another. When no
        service is to blame, a full sync that keeps the stale chains and sets (something outside
        kproxy may still name them). When that fails too, `failure` stands."""
        before = dict(self.rejected)
        for attempt in range(MAX_REJECT_ROUNDS + 1):
            if attempt or not tried_full:
                try:
                    return self._full_sync(snapshot)
                except SyncError as err:
                    failure = err
            if attempt == MAX_REJECT_ROUNDS:
                break
            found = self._find_refused(snapshot, str(failure.__cause__ or failure))
            if not found:
                break
            for ref, (block, error) in found.items():
                self.rejected[ref] = Rejected(block, error)
                log.error(
                    "nftables refused the rules of service %s (IPv%d), leaving it out: %s",
                    ref,
                    self.family,
                    error,
                    extra={"service": str(ref), "family": self.family, "error": error},
                )
        try:
            result = self._full_sync(snapshot, keep_stale=True)
        except SyncError:
            self.rejected = before  # not their fault after all
            raise failure from None
        log.error("nftables refused deleting stale chains or sets: keeping them (%s)", failure)
        return result

    def _find_refused(self, snapshot: Snapshot, error: str) -> dict[Ref, tuple[ServiceBlock, str]]:
        blocks: dict[Ref, ServiceBlock] = {}
        for _ in self._blocks_of(snapshot, blocks):
            pass
        items = list(blocks.items())
        fam = self.family
        found = find_refused(
            items,
            self._check,
            suspects=suspects_of(items, error, lambda b: block_text(b, fam)),
        )
        return {ref: (blocks[ref], err) for ref, err in found.items()}

    def _check(self, blocks: Sequence[ServiceBlock]) -> str:
        """`nft --check` of a full sync's input for `blocks` alone: "" or nft's error."""
        res = self._run(
            [nft_binary(), "--check", "-f", "-"],
            input=full_text(self.renderer, blocks),
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode == 0:
            return ""
        lines = [ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        error = " | ".join(ln for ln in lines if not set(ln) <= {"^", "~"})[-2000:]
        return error or _exit_text(res.returncode)

    @property
    def programmed(self) -> Mapping[Ref, ServiceBlock]:
        return dict(self._blocks)

    # -- cleanup -------------------------------------------------------------------------------
    def cleanup(self) -> None:
        cleanup_nftables(self.family, self._run)
        self._blocks = {}
        self._counts = {}
        self._count_maps = set()
        self._need_full = self._reconcile = True


def cleanup_nftables(family: int, run: Run = subprocess.run) -> bool:
    """Delete the kube-proxy table of `family`; True when there was one."""
    if shutil.which("nft") is None:
        return False
    res = run(
        [nft_binary(), "delete", "table", family_word(family), TABLE],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode == 0:
        log.info("removed the nftables table %s %s", family_word(family), TABLE)
        return True
    return False
