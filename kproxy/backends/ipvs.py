"""IPVS mode: `IPVSProxier` keeps the kernel's IPVS table, kube-ipvs0, kproxy's ipsets and the
companion iptables rules in line with the model; `cleanup_ipvs` removes all of it.

What a sync does (one family per proxier, as kube-proxy's dual-stack meta-proxier):

1. render: the services' views -> per-service contributions (`kproxy.render.ipvs`): virtual
   servers, ipset entries, addresses for kube-ipvs0;
2. read the kernel: a full sync dumps the whole IPVS table, every kproxy ipset and kube-ipvs0's
   addresses; a partial sync reads only the real servers of the virtual servers it touches (and
   of those still draining), trusting its record of the rest: kproxy is the only writer of what it
   owns, and every full sync (start-up, `--ipvs-sync-period`, after any failure) re-reads all;
3. diff (`kproxy.render.ipvs_diff`) and apply, in an order that never opens a gap: ipset entries
   added, companion rules (full syncs only: their text depends on the options, not on services),
   new addresses bound, the IPVS operations in one batched netlink exchange, then stale ipset
   entries deleted and stale addresses unbound;
The daemon does what is the same in every mode after each sync: stale UDP conntrack cleanup and
the health-check node port servers.

Per-service contributions are kept between syncs with reference counts for ipset entries and
addresses, so a partial sync costs time in proportion to what changed, not to the table size.

Start-up (the first sync) sets the sysctls IPVS mode needs and reconciles without flushing
anything, so connections survive a restart:

- net.ipv4.vs.conntrack=1: IPVS keeps conntrack entries, which the masquerade rules need;
- net.ipv4.vs.expire_nodest_conn=1: a connection whose real server was deleted is dropped on its
  next packet instead of hanging (UDP flows then reach a live real server);
- net.ipv4.vs.expire_quiescent_template=1: persistence templates of a weight-0 real server expire,
  so ClientIP affinity moves clients off a draining endpoint;
- net.ipv4.vs.conn_reuse_mode=0 on kernels 4.1 to 5.8 only (kube-proxy's rule: later kernels fixed
  the slow port-reuse path, earlier ones lack the knob);
- net.ipv4.ip_forward=1 (net.ipv6.conf.all.forwarding=1 for IPv6);
- IPVS tcp/tcpfin/udp timeouts from --ipvs-*-timeout when set (ipvsadm --set; 0 keeps the kernel's).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from kproxy.backends import ipvs_netlink as N
from kproxy.backends import ipvs_procfs as procfs
from kproxy.backends.base import SyncError, SyncResult
from kproxy.backends.ipset import IPSets
from kproxy.backends.ipvs_census import Census, Rotation, SockoptReader, key_hash
from kproxy.backends.ipvs_device import address_map
from kproxy.backends.ipvs_iptables import CompanionRules
from kproxy.backends.netinfo import write_sysctl
from kproxy.model.objects import IPV6, Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Changes, Snapshot
from kproxy.model.view import ServicePortView, build_views
from kproxy.render import ipvs as R
from kproxy.render import ipvs_diff as D

log = logging.getLogger("kproxy.ipvs")

ViewMap = Mapping[Ref, Sequence[ServicePortView]]
Entry = tuple[str, str]  # (set base name, entry)


class AddressDevice(Protocol):
    """kube-ipvs0: the dummy interface holding the VIPs (kproxy.backends.ipvs_device)."""

    def ensure(self) -> None: ...

    def addresses(self, family: int) -> set[str]: ...

    def count(self, family: int) -> int: ...

    def bind(self, addresses: Iterable[str]) -> int: ...

    def unbind(self, addresses: Iterable[str]) -> int: ...


# -- start-up ------------------------------------------------------------------------------------
def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def set_sysctls(family: int) -> dict[str, bool]:
    """The sysctls of the module docstring; returns {name: written}."""
    wanted = {
        "net.ipv4.vs.conntrack": "1",
        "net.ipv4.vs.expire_nodest_conn": "1",
        "net.ipv4.vs.expire_quiescent_template": "1",
        "net.ipv4.ip_forward": "1",
    }
    if family == IPV6:
        wanted["net.ipv6.conf.all.forwarding"] = "1"
    if (4, 1) <= _kernel_version() < (5, 9):
        wanted["net.ipv4.vs.conn_reuse_mode"] = "0"
    result = {name: write_sysctl(name, value) for name, value in wanted.items()}
    for name, ok in result.items():
        if not ok:
            log.warning("could not set sysctl %s=%s", name, wanted[name])
    return result


def set_timeouts(tcp: float, tcpfin: float, udp: float) -> bool:
    """`ipvsadm --set` (0 leaves a timeout as it is); False when not set."""
    if not (tcp or tcpfin or udp):
        return False
    if not shutil.which("ipvsadm"):
        log.warning("ipvsadm not installed: IPVS timeouts left as they are")
        return False
    argv = ["ipvsadm", "--set", str(int(tcp)), str(int(tcpfin)), str(int(udp))]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode:
        log.warning("%s failed: %s", " ".join(argv), proc.stderr.strip())
        return False
    return True


# -- the proxier ---------------------------------------------------------------------------------
def node_options(
    options: ProxyOptions, amap: Mapping[str, set[str]]
) -> tuple[set[str], ProxyOptions]:
    """(addresses on kube-ipvs0, `options` with the node's addresses taken from `amap`, an
    interface -> addresses map of one family): the node's addresses are all but kube-ipvs0's
    (the VIPs there are local too, but no NodePort listens on them). Pure; shared by the
    proxier and `kproxy status`, so both want the same virtual servers."""
    amap = dict(amap)
    bound = set(amap.pop(R.DUMMY_DEVICE, set()))
    local = sorted({a for addrs in amap.values() for a in addrs})
    nodeport_ips = options.nodeport_ips
    if nodeport_ips is not None:
        nets = [ipaddress.ip_network(c) for c in options.nodeport_cidrs]
        if nets:
            nodeport_ips = tuple(
                a for a in local if any(ipaddress.ip_address(a) in n for n in nets)
            )
        nodeport_ips = tuple(a for a in nodeport_ips if a not in bound)
    return bound, replace(options, node_ips=tuple(local), nodeport_ips=nodeport_ips)


@dataclass(frozen=True, slots=True)
class IPVSOptions:
    """The IPVS-only settings: the default scheduler and the kernel's session timeouts in
    seconds (0 keeps the kernel's)."""

    scheduler: str = R.DEFAULT_SCHEDULER
    tcp_timeout: float = 0.0
    tcpfin_timeout: float = 0.0
    udp_timeout: float = 0.0


class IPVSProxier:
    """The IPVS dataplane of one IP family (see the module docstring)."""

    def __init__(
        self,
        *,
        options: ProxyOptions,
        ipvs_options: IPVSOptions | None = None,
        ipvs: N.IPVSAdapter | None = None,
        device: AddressDevice | None = None,
        ipsets: IPSets | None = None,
        rules: CompanionRules | None = None,
        sysctls: Callable[[int], object] = set_sysctls,
        interfaces: Callable[[int], Mapping[str, set[str]]] = address_map,
        read_dests: Callable[[], Mapping[R.VSKey, list[D.ObservedDest]]] = procfs.read,
        census: Callable[[int], Census | None] | None = None,
        rotation: Rotation | None = None,
    ) -> None:
        """The collaborators default to the kernel's; tests inject in-memory ones (and the
        host-touching `sysctls`, `interfaces`, /proc reader `read_dests` and the drift check's
        `census`: family -> Census, or None when that family has no cheap census; see
        kproxy.backends.ipvs_census)."""
        self.options = options
        self.ipvs_options = ipvs_options or IPVSOptions()
        self.family = options.family
        self.scheduler = self.ipvs_options.scheduler or R.DEFAULT_SCHEDULER
        self._ipvs = ipvs
        self._device = device
        self.ipsets = ipsets or IPSets(options.family)
        self._rules = rules
        self._sysctls = sysctls
        self._interfaces = interfaces
        self._read_dests = read_dests
        self._census = census or self._sockopt_census
        self._sockopt: SockoptReader | None = None
        self._census_failed = False
        self.rotation = rotation or Rotation()
        self._started = False
        self._needs_full = True
        self._contrib_valid = False
        # what the last sync left in the kernel, as kproxy knows it. These are records of what
        # was programmed (reference-counted claims on shared virtual servers, ipset entries and
        # addresses), not a copy of the model: the previous *model* state is not enough to undo
        # a service's share of a virtual server another service also claims.
        self._renderer = R.IPVSRenderer(options, scheduler=self.scheduler)
        self._contrib: dict[Ref, R.ServiceIPVS] = {}
        self._claims: dict[R.VSKey, dict[Ref, R.VirtualServer]] = {}
        self._entries: Counter[Entry] = Counter()
        self._observed: dict[R.VSKey, D.ObservedVS] = {}
        # real servers per virtual server of this family as the kernel holds them after kproxy's
        # last write (all of them, kproxy's or not), their total and fingerprint
        # (ipvs_census.key_hash summed): what `drift` compares the kernel's census with
        self._dest_counts: dict[R.VSKey, int] = {}
        self._dest_total = 0
        self._fingerprint = 0
        self._draining: set[R.VSKey] = set()
        self.last_plan: D.Plan = D.Plan()
        self.timings: dict[str, float] = {}

    # -- collaborators (created lazily: constructing a proxier touches no kernel state) ---------
    @property
    def ipvs(self) -> N.IPVSAdapter:
        if self._ipvs is None:
            self._ipvs = N.IPVSAdapter()
        return self._ipvs

    @property
    def device(self) -> AddressDevice:
        if self._device is None:
            from kproxy.backends.ipvs_device import KubeIPVS0

            self._device = KubeIPVS0()
        return self._device

    @property
    def rules(self) -> CompanionRules:
        if self._rules is None:
            self._rules = CompanionRules(self.options)
        return self._rules

    # -- the Proxier contract ------------------------------------------------------------------
    def sync(self, snapshot: Snapshot, changes: Changes, *, full: bool) -> SyncResult:
        try:
            if not self._started:
                self._start()
            if full or self._needs_full or changes.node_changed or changes.full:
                result = self._full_sync(snapshot, changes)
            else:
                result = self._partial_sync(snapshot, changes.services)
            self._needs_full = False
            return result
        except SyncError:
            self._failed()
            raise
        except Exception as err:
            self._failed()
            raise SyncError(f"IPVS sync: {err}") from err

    # -- drift ------------------------------------------------------------------------------------
    def drift(self) -> str | None:
        """The periodic check (kproxy.backends.base.DriftCheck): None while the kernel holds the
        virtual servers and real servers of this family kproxy's record says; else what
        differs, and the next sync is a full one (which reads the whole table back).

        Nothing is read back (kproxy.backends.ipvs_census): IPv4 asks the kernel for every
        virtual server's number of real servers in one getsockopt, so an outside
        `ipvsadm -A/-D/-a/-d` or a flush shows at the next check; otherwise (IPv6, or the
        sockopt refused) one netlink service dump counts the virtual servers and the real
        servers of a rotating slice of them are counted (each virtual server at least once
        every `rotation.periods` checks). Then one header dump of the ipsets (element counts)
        and one undecoded address dump of kube-ipvs0 (its address count). An outside weight or
        scheduler edit, or an entry swapped for another, shows in none of these (the full
        resync period catches those)."""
        if self._needs_full or not self._started:
            return None  # the next sync is full anyway
        found = self._drift() or self.ipsets.drift() or self._address_drift()
        if found:
            self._needs_full = True
        return found

    def _sockopt_census(self, family: int) -> Census | None:
        if family != 4:
            return None  # the sockopt interface lists IPv4 virtual servers only
        if self._sockopt is None:
            self._sockopt = SockoptReader()
        return self._sockopt.read_v4()

    def _drift(self) -> str | None:
        fam = self.family
        services, dests = len(self._dest_counts), self._dest_total
        census: Census | None = None
        try:
            census = self._census(fam)
        except OSError as err:
            if not self._census_failed:
                log.info("IPVS census by getsockopt failed (%s): counting over netlink", err)
            self._census_failed = True
        if census is not None:
            if (census.services, census.dests) != (services, dests):
                return (
                    f"the IPVS table holds {census.services} IPv{fam} virtual servers with "
                    f"{census.dests} real servers, kproxy wrote {services} with {dests}"
                )
            if census.fingerprint != self._fingerprint:
                return (
                    f"the IPVS table holds as many IPv{fam} virtual servers ({services}) and "
                    f"real servers ({dests}) as kproxy wrote, but not the same ones"
                )
            return None
        found = self.ipvs.count_services(fam)
        if found != services:
            return f"the IPVS table holds {found} IPv{fam} virtual servers, kproxy wrote {services}"
        for key in self.rotation.take(self._dest_counts):
            n = self.ipvs.count_dests(key)
            if n != self._dest_counts[key]:
                return (
                    f"the IPVS virtual server {key.address}:{key.port}/{key.protocol} has {n} "
                    f"real servers, kproxy wrote {self._dest_counts[key]}"
                )
        return None

    def _address_drift(self) -> str | None:
        """kube-ipvs0 holds one address per entry of KUBE-IPVS-IPS (kproxy binds exactly those)."""
        have = self.device.count(self.family)
        want = len(self.ipsets.contents[R.IPVS_IPS])
        if have != want:
            return f"{R.DUMMY_DEVICE} holds {have} IPv{self.family} addresses, kproxy bound {want}"
        return None

    def _set_dest_counts(self, counts: Mapping[R.VSKey, int], *, replace_all: bool) -> None:
        if replace_all:
            self._dest_counts = dict(counts)
            self._dest_total = sum(counts.values())
            self._fingerprint = sum(key_hash(key, n) for key, n in counts.items())
            return
        for key, n in counts.items():  # O(changed), not O(table): partial syncs stay cheap
            self._forget_dest_counts(key)
            self._dest_total += n
            self._fingerprint += key_hash(key, n)
            self._dest_counts[key] = n

    def _forget_dest_counts(self, key: R.VSKey) -> None:
        n = self._dest_counts.pop(key, None)
        if n is not None:
            self._dest_total -= n
            self._fingerprint -= key_hash(key, n)

    def _failed(self) -> None:
        # The next sync reads the whole kernel state again and renders every service anew
        # (a sync that failed half-way may have left some contributions out of date).
        self._needs_full = True
        self._contrib_valid = False

    def cleanup(self) -> None:
        cleanup_ipvs(families=(self.family,), ipvs=self._ipvs)

    # -- start-up ------------------------------------------------------------------------------
    def _start(self) -> None:
        try:
            self.ipvs  # noqa: B018  (opening the netlink family loads ip_vs when it can)
        except N.IPVSUnavailable as err:
            raise SyncError(f"{err}; IPVS mode needs the ip_vs kernel module") from err
        self._sysctls(self.family)
        o = self.ipvs_options
        set_timeouts(o.tcp_timeout, o.tcpfin_timeout, o.udp_timeout)
        self.device.ensure()
        self.ipsets.ensure()
        self._started = True

    def _addresses(self) -> tuple[set[str], ProxyOptions]:
        """(addresses on kube-ipvs0, the options with this moment's node addresses): one read
        of every interface."""
        return node_options(self.options, self._interfaces(self.family))

    def _read_table(self) -> dict[R.VSKey, D.ObservedVS]:
        """The kernel's virtual servers of this family with their real servers: one netlink
        service dump plus /proc/net/ip_vs (kproxy.backends.ipvs_procfs), or one dest dump per
        service when /proc cannot be read."""
        services = [vs for vs in self.ipvs.services() if vs.key.family == self.family]
        try:
            dests = self._read_dests()
        except OSError as err:
            log.info(
                "reading %s failed (%s): one netlink dump per virtual server", procfs.PATH, err
            )
            return {vs.key: replace(vs, dests=self.ipvs.dests(vs.key)) for vs in services}
        return procfs.merge(services, dests)

    # -- full sync -----------------------------------------------------------------------------
    def _full_sync(self, snapshot: Snapshot, changes: Changes) -> SyncResult:
        """Read everything from the kernel and reconcile all of it. Services are rendered anew
        only when needed: all of them at start-up, after a failure, or when the node (addresses,
        zone) changed; otherwise only those in `changes` (a periodic resync of an idle cluster
        renders nothing)."""
        t0 = time.perf_counter()
        fam = self.family
        bound, options = self._addresses()
        t_addr = time.perf_counter()
        node = self.options.node_name
        if not self._contrib_valid or changes.node_changed or options != self._renderer.options:
            self._renderer = R.IPVSRenderer(options, scheduler=self.scheduler)
            views = build_views(snapshot, family=fam, node_name=node)
            contrib = {ref: self._renderer.render_service(v) for ref, v in views.items()}
        else:
            views = build_views(snapshot, family=fam, node_name=node, refs=changes.services)
            contrib = dict(self._contrib)
            for ref, v in views.items():
                contrib[ref] = self._renderer.render_service(v)
        contrib = {ref: c for ref, c in contrib.items() if not c.empty}
        self.rules.options = options
        desired = R.aggregate(contrib[ref] for ref in sorted(contrib))
        for line in desired.conflicts:
            log.warning("IPVS virtual server conflict: %s", line)
        t1 = time.perf_counter()

        observed = self._read_table()
        t_ipvs = time.perf_counter()
        sets = self.ipsets.read()
        owned = D.owner_predicate(bound=bound, sets=sets)
        plan = D.diff_ipvs(desired.servers, observed, owned=owned)
        t2 = time.perf_counter()

        self.ipsets.sync_to(desired.sets, phase="add")
        t_sets = time.perf_counter()
        nat_filter = self.rules.apply()
        t_rules = time.perf_counter()
        self.device.bind(desired.bind - bound)
        t_bind = time.perf_counter()
        self._apply(plan)
        t_apply = time.perf_counter()
        self.ipsets.sync_to(desired.sets, phase="delete")
        self.device.unbind(bound - desired.bind)
        t3 = time.perf_counter()
        self.timings.update(
            ipset_add=t_sets - t2,
            rules=t_rules - t_sets,
            bind=t_bind - t_rules,
            cleanup=t3 - t_apply,
        )

        self._contrib = contrib
        self._claims = {}
        self._entries = Counter()
        for ref in sorted(contrib):
            self._add_contribution(ref, contrib[ref])
        self._observed = _after(observed, plan, desired.servers)
        self._set_dest_counts(_dest_counts_after(observed, plan), replace_all=True)
        self._draining = set(plan.draining)
        self._contrib_valid = True
        self.timings.update(
            addresses=t_addr - t0,
            render=t1 - t_addr,
            read_ipvs=t_ipvs - t1,
            read=t2 - t1,
            apply=t3 - t2,
        )
        return self._result(full=True, written=len(contrib), rules=nat_filter, plan=plan)

    # -- partial sync --------------------------------------------------------------------------
    def _partial_sync(self, snapshot: Snapshot, refs: Iterable[Ref]) -> SyncResult:
        t0 = time.perf_counter()
        refs = frozenset(refs)
        views = build_views(
            snapshot, family=self.family, node_name=self.options.node_name, refs=refs
        )
        affected: set[R.VSKey] = set(self._draining)
        added: Counter[Entry] = Counter()
        removed: Counter[Entry] = Counter()
        written = 0
        for ref in refs:
            new = self._renderer.render_service(views.get(ref, ()))
            old = self._contrib.get(ref, R.EMPTY_SERVICE_IPVS)
            if new == old:
                continue
            written += 1
            affected.update(vs.key for vs in old.servers)
            affected.update(vs.key for vs in new.servers)
            for e in old.entries:
                removed[e] += 1
            for e in new.entries:
                added[e] += 1
            self._remove_contribution(ref, old)
            if new.empty:
                self._contrib.pop(ref, None)
            else:
                self._contrib[ref] = new
                self._add_contribution(ref, new)
        t1 = time.perf_counter()

        desired = {k: v for k in affected if (v := self._effective(k)) is not None}
        observed: dict[R.VSKey, D.ObservedVS] = {}
        for key in affected:
            known = self._observed.get(key)
            if known is None:
                continue
            observed[key] = replace(known, dests=self.ipvs.dests(key))
        plan = D.diff_ipvs(desired, observed, owned=lambda _k: True)
        t2 = time.perf_counter()

        adds = _by_set(e for e in added if self._entries[e] > 0)
        dels = _by_set(e for e in removed if self._entries[e] == 0)
        bind = adds.get(R.IPVS_IPS, set()) - self.ipsets.contents[R.IPVS_IPS]
        self.ipsets.update(add=adds)
        self.device.bind(bind)
        self._apply(plan)
        self.ipsets.update(delete=dels)
        self.device.unbind(set(dels.get(R.IPVS_IPS, ())))
        t3 = time.perf_counter()

        for key in affected:
            self._observed.pop(key, None)
            self._forget_dest_counts(key)
        self._observed.update(_after(observed, plan, desired))
        self._set_dest_counts(_dest_counts_after(observed, plan), replace_all=False)
        self._draining = (self._draining - affected) | set(plan.draining)
        self.timings.update(render=t1 - t0, read=t2 - t1, apply=t3 - t2)
        return self._result(full=False, written=written, rules=None, plan=plan)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _add_contribution(self, ref: Ref, c: R.ServiceIPVS) -> None:
        for vs in c.servers:
            self._claims.setdefault(vs.key, {})[ref] = vs
        self._entries.update(c.entries)

    def _remove_contribution(self, ref: Ref, c: R.ServiceIPVS) -> None:
        for vs in c.servers:
            claim = self._claims.get(vs.key)
            if claim is not None:
                claim.pop(ref, None)
                if not claim:
                    del self._claims[vs.key]
        self._entries.subtract(c.entries)
        for e in c.entries:
            if self._entries[e] <= 0:
                del self._entries[e]

    def _effective(self, key: R.VSKey) -> R.VirtualServer | None:
        """The virtual server wanted at `key`: the first service in namespace/name order."""
        claim = self._claims.get(key)
        if not claim:
            return None
        return claim[min(claim)]

    def _apply(self, plan: D.Plan) -> None:
        self.last_plan = plan
        self.timings["ipvs"] = 0.0
        if plan.empty:
            return
        started = time.perf_counter()
        result = self.ipvs.apply(plan.ops)
        self.timings["ipvs"] = time.perf_counter() - started
        if result.failures:
            raise SyncError(
                f"{len(result.failures)} of {len(plan.ops)} IPVS operations failed, first: "
                f"{result.failures[0]}"
            )

    def _result(
        self, *, full: bool, written: int, rules: dict[str, int] | None, plan: D.Plan
    ) -> SyncResult:
        counts: dict[str, int] = {}
        if full:  # O(table): only on full syncs (the gauges keep their value in between)
            counts["ipvs-services"] = len(self._claims)
            counts["ipvs-destinations"] = sum(
                len(next(iter(c.values())).dests) for c in self._claims.values()
            )
        if rules is not None:
            counts.update(rules)
        detail = (
            f"{plan.count(D.AddVS)} services added, {plan.count(D.DelVS)} deleted, "
            f"{plan.count(D.EditVS)} edited; {plan.dests_added} real servers added, "
            f"{plan.count(D.EditDest)} re-weighted, {plan.count(D.DelDest)} deleted; "
            f"{len(self._draining)} services draining"
        )
        return SyncResult(full=full, services_written=written, rules=counts, detail=detail)


def _by_set(entries: Iterable[Entry]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for base, e in entries:
        out.setdefault(base, set()).add(e)
    return out


def _dest_counts_after(
    observed: Mapping[R.VSKey, D.ObservedVS], plan: D.Plan
) -> dict[R.VSKey, int]:
    """Real servers per virtual server once `plan` has been applied to `observed` (draining
    real servers are still there: they go only when a later plan deletes them)."""
    out = {key: len(vs.dests) for key, vs in observed.items()}
    for op in plan.ops:
        if isinstance(op, D.DelVS):
            out.pop(op.key, None)
        elif isinstance(op, D.AddVS):
            out[op.vs.key] = len(op.vs.dests)
        elif isinstance(op, D.AddDest):
            out[op.key] = out.get(op.key, 0) + 1
        elif isinstance(op, D.DelDest):
            out[op.key] = out.get(op.key, 0) - 1
    return out


def _after(
    observed: Mapping[R.VSKey, D.ObservedVS],
    plan: D.Plan,
    desired: Mapping[R.VSKey, R.VirtualServer],
) -> dict[R.VSKey, D.ObservedVS]:
    """kproxy's record of the virtual servers after `plan` (attributes only matter: real servers
    are re-read whenever a partial sync touches a virtual server)."""
    out = dict(observed)
    for op in plan.ops:
        if isinstance(op, D.DelVS):
            out.pop(op.key, None)
    for key, vs in desired.items():
        out[key] = D.ObservedVS(key, vs.scheduler, vs.flags, vs.timeout)
    return out


# -- cleanup -------------------------------------------------------------------------------------
def cleanup_ipvs(*, families: Iterable[int] = (4, 6), ipvs: N.IPVSAdapter | None = None) -> None:
    """`kproxy cleanup` for IPVS mode: kproxy's virtual servers (by the ownership rule), the
    addresses and then the kube-ipvs0 device, the companion chains and hooks, then the ipsets."""
    from kproxy.backends import ipset as ipset_mod
    from kproxy.backends.ipvs_iptables import cleanup_rules

    families = tuple(families)
    sets: dict[str, set[str]] = {}
    for fam in families:
        for base, entries in IPSets(fam).read().items():
            sets.setdefault(base, set()).update(entries)
    from kproxy.backends.ipvs_device import KubeIPVS0, device_exists

    bound: set[str] = set()
    if device_exists():
        dev = KubeIPVS0()
        for fam in families:
            bound |= dev.addresses(fam)
    try:
        adapter = ipvs or N.IPVSAdapter()
    except N.IPVSUnavailable:
        adapter = None
    if adapter is not None:
        owned = D.owner_predicate(bound=bound, sets=sets)
        ops = [
            D.DelVS(vs.key)
            for vs in adapter.services()
            if vs.key.family in families and owned(vs.key)
        ]
        if ops:
            adapter.apply(ops)
            log.info("deleted %d IPVS virtual servers", len(ops))
    if device_exists():
        KubeIPVS0().remove(families=families)
    removed = cleanup_rules(families)
    if removed:
        log.info("removed %d IPVS-mode chains", len(removed))
    if ipset_mod.available():
        gone = ipset_mod.destroy_all(families)
        if gone:
            log.info("destroyed %d ipsets", len(gone))
