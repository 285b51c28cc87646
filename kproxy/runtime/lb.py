"""LoadBalancer support at run time: one thread that keeps this agent's heartbeat Lease, takes
part in the allocator's leader election, allocates (when leader) and tells the layer-2
responder which addresses this node answers for.

Inputs: the LB watches (kproxy.kube.lbapi) into `LBState`, and the model store's snapshots (ready
endpoints per node, for externalTrafficPolicy Local). Decisions come from the pure modules in
kproxy.lb; this module only times them and carries them out:
- every `renew` (a quarter of the agent lease duration) the heartbeat Lease is renewed;
- the allocator Lease is tried when free or expired and renewed while held; a leader that cannot
  renew within the duration steps down;
- the leader recomputes every assignment when a Service changed (and every 10 s) and patches
  only the services whose status differs; pending services are logged once per reason;
- announcements are recomputed when services, nodes, endpoints or the set of live agents change.
  While this agent cannot renew its own heartbeat (the API is unreachable) it keeps announcing
  what it announced: the other agents cannot see it die, so nobody would take over.
- Until the dataplane's first successful sync (`ready`) the agent neither renews its heartbeat
  nor announces: the others do not count it as alive, so it takes no address it cannot forward
  yet (an agent starting up - a node coming back takes its addresses back by the hash - or one
  whose rules the kernel refuses). The allocator election does not wait: allocating needs only
  the API.
On stop, both Leases are released (holder cleared) after the responder stopped answering, so
the next owner takes over at the next watch event instead of after the lease duration.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kproxy.kube.sink import RawObject
from kproxy.lb import election as E
from kproxy.lb.allocator import Decision, LBService, allocate, pool_usage
from kproxy.lb.pools import Pools
from kproxy.lb.select import NodeState, announcer, candidates
from kproxy.model.objects import Ref
from kproxy.model.store import Snapshot

log = logging.getLogger("kproxy.lb")

REALLOCATE_EVERY = 10.0
TICK = 0.1


class LBState:
    """What the LB watches delivered, converted; thread-safe. Implements the sources' Sink."""

    def __init__(self, *, on_change: Callable[[], None], clock: Callable[[], float]) -> None:
        from kproxy.kube.lbapi import parse_lb_service, parse_node_state

        self._parse_service = parse_lb_service
        self._parse_node = parse_node_state
        self._lock = threading.Lock()
        self._on_change = on_change
        self._clock = clock
        self.services: dict[Ref, LBService] = {}
        self.nodes: dict[str, NodeState] = {}
        self.leases: dict[str, E.Observation] = {}
        self.generation = 0

    def _key(self, obj: RawObject) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return str(meta.get("namespace") or ""), str(meta.get("name") or "")

    def _set(self, kind: str, obj: RawObject) -> None:
        _ns, name = self._key(obj)
        if kind == "Service":
            svc = self._parse_service(obj)
            if svc.type == "LoadBalancer" or svc.ingress:
                self.services[svc.ref] = svc
            else:
                self.services.pop(svc.ref, None)
        elif kind == "Node":
            self.nodes[name] = self._parse_node(obj)
        elif kind == "Lease":
            record = E.LeaseRecord.from_raw(obj)
            seen = self.leases.get(name)
            if seen is None:
                self.leases[name] = E.Observation(record, self._clock())
            else:
                seen.see(record, self._clock())

    def _drop(self, kind: str, obj: RawObject) -> None:
        ns, name = self._key(obj)
        if kind == "Service":
            self.services.pop(Ref(ns or "default", name), None)
        elif kind == "Node":
            self.nodes.pop(name, None)
        elif kind == "Lease":
            self.leases.pop(name, None)

    def replace(self, kind: str, objects: list[RawObject]) -> None:
        with self._lock:
            if kind == "Service":
                self.services.clear()
            elif kind == "Node":
                self.nodes.clear()
            elif kind == "Lease":
                keep = {self._key(o)[1] for o in objects}
                self.leases = {k: v for k, v in self.leases.items() if k in keep}
            for obj in objects:
                self._set(kind, obj)
            self.generation += 1
        self._on_change()

    def apply(self, kind: str, event_type: str, obj: RawObject) -> None:
        with self._lock:
            if event_type == "DELETED":
                self._drop(kind, obj)
            else:
                self._set(kind, obj)
            self.generation += 1
        self._on_change()

    def view(self) -> tuple[int, dict[Ref, LBService], dict[str, NodeState], dict[str, Any]]:
        with self._lock:
            leases = {k: E.Observation(v.record, v.seen_at) for k, v in self.leases.items()}
            return self.generation, dict(self.services), dict(self.nodes), leases


class LocalPoolSink:
    """Manifests mode (`--manifests` with pools): this agent is the whole cluster, so it is the
    allocator without an election and without status writes. It sits between the manifest
    source and the store: every Service list gets the allocator's addresses written into the
    objects' status before the store (and so the proxier) sees them; the same objects feed the
    announcer's `LBState`. Assignments are kept in memory, so they stay stable while it runs.
    """

    def __init__(self, inner: Any, pools: Pools) -> None:
        from kproxy.kube.lbapi import parse_lb_service

        self._inner = inner
        self._pools = pools
        self._parse = parse_lb_service
        self._held: dict[Ref, tuple[str, ...]] = {}
        self.decisions: dict[Ref, Decision] = {}
        self.listeners: list[Callable[[list[RawObject]], None]] = []

    def replace(self, kind: str, objects: Iterable[RawObject]) -> None:
        if kind == "Service":  # manifest sources only: small lists, read here more than once
            objects = self._assign(list(objects))
            for listener in self.listeners:
                listener(objects)
        self._inner.replace(kind, objects)

    def apply(self, kind: str, event_type: str, obj: RawObject) -> None:
        self._inner.apply(kind, event_type, obj)  # manifest sources only replace

    def _assign(self, objects: list[RawObject]) -> list[RawObject]:
        from dataclasses import replace as dc_replace

        parsed = [self._parse(o) for o in objects]
        inputs = [dc_replace(p, ingress=self._held.get(p.ref, p.ingress)) for p in parsed]
        decisions = allocate(self._pools, inputs)
        out: list[RawObject] = []
        for obj, svc in zip(objects, inputs, strict=True):
            decision = decisions.get(svc.ref)
            if decision is None or decision.pending:
                if decision is not None and self.decisions.get(svc.ref) != decision:
                    log.warning("LoadBalancer %s stays pending: %s", svc.ref, decision.pending)
                out.append(obj)
                continue
            if self._held.get(svc.ref) != decision.ips and decision.ips:
                log.info("LoadBalancer %s: assigned %s", svc.ref, ", ".join(decision.ips))
            obj = dict(obj)
            status = dict(obj.get("status") or {})
            status["loadBalancer"] = {"ingress": [{"ip": ip} for ip in decision.ips]}
            obj["status"] = status
            out.append(obj)
        self._held = {ref: d.ips for ref, d in decisions.items() if d.assigned}
        self.decisions = decisions
        return out


@dataclass
class Report:
    """What `kproxy status` shows (served as JSON at /lb on the metrics address)."""

    node: str
    leader: str = ""
    pools: dict[str, tuple[int, int]] = field(default_factory=dict)
    addresses: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "leader": self.leader,
            "pools": [
                {"range": r, "size": size, "used": used} for r, (size, used) in self.pools.items()
            ],
            "addresses": self.addresses,
            "pending": self.pending,
        }


class LoadBalancerController:
    """See the module docstring."""

    def __init__(
        self,
        *,
        pools: Pools,
        node_name: str,
        kubeconfig: str | None,
        master: str | None,
        namespace: str,
        lease_duration: int,
        snapshot: Callable[[], Snapshot],
        metrics: Any,
        stop: threading.Event,
        local: LocalPoolSink | None = None,
        ready: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kproxy.backends.l2 import L2Responder

        self.pools = pools
        self.node = node_name
        self.identity = node_name
        self.duration = max(1, lease_duration)
        self.renew = self.duration / 4
        self._snapshot = snapshot
        self.metrics = metrics
        self._stop = stop
        self._ready = ready
        self._was_ready = False
        self._clock = clock
        self._wake = threading.Event()
        self.namespace = namespace
        self.state = LBState(on_change=self._wake.set, clock=clock)
        self.local = local
        self.api: Any = None
        self._watchers: list[Any] = []
        if local is None:
            from kproxy.kube.lbapi import LBApi

            self.api = LBApi(kubeconfig=kubeconfig, master=master, namespace=namespace)
            self._watchers = self.api.watchers(self.state, stop=stop)
        else:  # manifests: one node, no API (see LocalPoolSink)
            local.listeners.append(lambda objs: self.state.replace("Service", objs))
        self.responder = L2Responder(
            on_reply=lambda fam: metrics.lb_replies.labels(str(fam)).inc(),
            on_announce=self._announced,
        )
        self._thread = threading.Thread(target=self._run, name="kproxy-lb", daemon=True)
        self._lock = threading.Lock()
        self._report = Report(node=node_name)
        # heartbeat and leadership
        self._heartbeat: E.LeaseRecord | None = None
        self._heartbeat_ok_at = -1e9
        self._beat_retry_at = 0.0
        self._leader_record: E.LeaseRecord | None = None
        self._leader_renewed_at = -1e9
        self._next_election = 0.0
        self.leader = False
        # allocation
        self._written: dict[Ref, tuple[int, tuple[str, ...]]] = {}  # ref -> (rv, ips) we wrote
        self._pending_logged: dict[Ref, str] = {}
        self._allocated_gen = -1
        self._allocated_at = -1e9
        self._decisions: dict[Ref, Decision] = {}
        # announcements
        self._owners: dict[str, str | None] = {}
        self._announce_key: Any = None
        self._interfaces: dict[str, Any] = {}
        self._interfaces_at = -1e9
        self._store_dirty = True

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        for w in self._watchers:
            w.thread.start()
        self._thread.start()
        log.info(
            "LoadBalancer address pools: %s (%d addresses); %s",
            ", ".join(r.text for r in self.pools.ranges),
            self.pools.size(),
            "allocated here (manifests)" if self.local else f"leases in {self.namespace}",
        )

    def store_changed(self) -> None:
        self._store_dirty = True
        self._wake.set()

    def stop(self) -> None:
        """Stop answering, then release our Leases so the next owners take over at once."""
        self._stop.set()
        self._wake.set()
        self._thread.join(3.0)
        self.responder.close()
        now = time.time()
        if self.api is None:
            log.info("LoadBalancer announcements stopped")
            return
        for name, record in (
            (E.agent_lease_name(self.node), self._heartbeat),
            (E.ALLOCATOR_LEASE, self._leader_record if self.leader else None),
        ):
            if record is None:
                continue
            try:
                self.api.write_lease(name, E.release(record, now_wall=now))
            except Exception as err:
                log.warning("could not release lease %s: %s", name, err)
        for w in self._watchers:
            w.interrupt()
        log.info("LoadBalancer announcements handed off")

    def report(self) -> dict[str, Any]:
        with self._lock:
            return self._report.as_json()

    # -- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK)
            self._wake.clear()
            if self._stop.is_set():
                break
            now = self._clock()
            try:
                ready = self._dataplane_ready()
                if self.local is not None:
                    self._heartbeat_ok_at = now
                    self._decisions = self.local.decisions
                    if ready:
                        self._announce(now)
                    continue
                if ready:
                    self._beat(now)
                self._elect(now)
                if all(w.synced.is_set() for w in self._watchers):
                    if self.leader:
                        self._allocate(now)
                    if ready:
                        self._announce(now)
            except Exception:
                log.exception("LoadBalancer controller step failed")
                self._stop.wait(1.0)

    def _dataplane_ready(self) -> bool:
        """Whether the dataplane has synced once (for good: a later failed sync leaves the rules
        that forward the addresses in place)."""
        if not self._was_ready and self._ready():
            self._was_ready = True
            log.info("dataplane synced: this node now takes part in LoadBalancer announcements")
        return self._was_ready

    def _beat(self, now: float) -> None:
        if now - self._heartbeat_ok_at < self.renew or now < self._beat_retry_at:
            return
        self._beat_retry_at = now + self.renew  # after a failure: no faster than renewals
        name = E.agent_lease_name(self.node)
        current = self._heartbeat
        try:
            if current is None:
                current = self.api.read_lease(name)
            wanted = E.claim(
                current, me=self.identity, duration=self.duration, now_wall=time.time()
            )
            self._heartbeat = self.api.write_lease(name, wanted)
            self._heartbeat_ok_at = now
        except Exception as err:
            from kproxy.kube.lbapi import Conflict

            self._heartbeat = None  # re-read next time
            if not isinstance(err, Conflict):
                log.warning("cannot renew this agent's lease %s: %s", name, err)

    def _elect(self, now: float) -> None:
        from kproxy.kube.lbapi import Conflict

        if self.leader and now - self._leader_renewed_at > self.duration:
            self._step_down("could not renew the allocator lease in time")
        if now < self._next_election:
            return
        self._next_election = now + self.renew
        _, _, _, leases = self.state.view()
        observed = leases.get(E.ALLOCATOR_LEASE)
        if not self.leader and not E.should_try(observed, me=self.identity, now=now):
            return
        current = self._leader_record if self.leader else (observed.record if observed else None)
        wanted = E.claim(current, me=self.identity, duration=self.duration, now_wall=time.time())
        try:
            self._leader_record = self.api.write_lease(E.ALLOCATOR_LEASE, wanted)
        except Conflict:
            if self.leader:
                self._step_down("another agent took the allocator lease")
            return
        except Exception as err:
            log.warning("allocator lease: %s", err)
            return
        self._leader_renewed_at = now
        if not self.leader:
            self.leader = True
            self._allocated_gen = -1
            self.metrics.lb_leader.set(1)
            log.info("this agent now allocates LoadBalancer addresses (leader)")

    def _step_down(self, why: str) -> None:
        self.leader = False
        self._leader_record = None
        self.metrics.lb_leader.set(0)
        log.warning("no longer the LoadBalancer allocator: %s", why)

    # -- allocation (leader only) ----------------------------------------------------------
    def _allocate(self, now: float) -> None:
        gen, services, _, _ = self.state.view()
        if gen == self._allocated_gen and now - self._allocated_at < REALLOCATE_EVERY:
            return
        self._allocated_gen, self._allocated_at = gen, now
        inputs = []
        for svc in services.values():
            written = self._written.get(svc.ref)
            rv = int(svc.resource_version) if svc.resource_version.isdigit() else 0
            if written is not None and rv < written[0]:
                svc = _with_ingress(svc, written[1])  # our patch has not come back yet
            inputs.append(svc)
        decisions = allocate(self.pools, inputs)
        self._decisions = decisions
        by_ref = {s.ref: s for s in inputs}
        for ref, decision in sorted(decisions.items()):
            svc = by_ref[ref]
            if decision.pending:
                if self._pending_logged.get(ref) != decision.pending:
                    self._pending_logged[ref] = decision.pending
                    log.warning(
                        "LoadBalancer %s stays pending: %s",
                        ref,
                        decision.pending,
                        extra={"service": str(ref), "reason": decision.pending},
                    )
                    self.metrics.lb_pending_total.inc()
                continue
            self._pending_logged.pop(ref, None)
            if tuple(svc.ingress) == decision.ips:
                continue
            self._patch(svc, decision.ips)
        for ref in list(self._written):
            if ref not in by_ref:
                self._written.pop(ref)
        for ref in list(self._pending_logged):
            if ref not in decisions:
                self._pending_logged.pop(ref)
        usage = pool_usage(self.pools, decisions)
        for text, (size, used) in usage.items():
            self.metrics.lb_pool_size.labels(text).set(size)
            self.metrics.lb_pool_used.labels(text).set(used)

    def _patch(self, svc: LBService, ips: tuple[str, ...]) -> None:
        from kproxy.kube.lbapi import Conflict

        try:
            rv = self.api.patch_ingress(
                svc.namespace, svc.name, ips, resource_version=svc.resource_version
            )
        except Conflict:
            self._allocated_gen = -1  # try again with what the watch brings
            return
        except Exception as err:
            log.warning("cannot write the LoadBalancer status of %s: %s", svc.ref, err)
            self._allocated_gen = -1
            return
        self._written[svc.ref] = (int(rv) if rv.isdigit() else 0, ips)
        self.metrics.lb_allocations_total.inc()
        if ips:
            log.info(
                "LoadBalancer %s: assigned %s (was %s)",
                svc.ref,
                ", ".join(ips),
                ", ".join(svc.ingress) or "pending",
                extra={"service": str(svc.ref), "addresses": list(ips)},
            )
        else:
            log.info(
                "LoadBalancer %s: released %s",
                svc.ref,
                ", ".join(svc.ingress),
                extra={"service": str(svc.ref), "released": list(svc.ingress)},
            )

    # -- announcements (every agent) -------------------------------------------------------
    def _alive(self, leases: dict[str, E.Observation], now: float) -> set[str]:
        out = set()
        for name, obs in leases.items():
            if name.startswith(E.AGENT_LEASE_PREFIX) and not obs.expired(now):
                out.add(name[len(E.AGENT_LEASE_PREFIX) :])
        return out

    def _announce(self, now: float) -> None:
        gen, services, nodes, leases = self.state.view()
        if self.local is not None:  # the agent is the cluster
            nodes = nodes or {self.node: NodeState(self.node)}
            leases = {E.ALLOCATOR_LEASE: E.Observation(E.LeaseRecord(self.node, 1), now)}
        healthy = now - self._heartbeat_ok_at <= self.duration
        alive = self._alive(leases, now)
        if healthy:
            alive.add(self.node)
        leader = leases.get(E.ALLOCATOR_LEASE)
        leader_name = leader.record.holder if leader is not None and not leader.expired(now) else ""
        key = (gen, frozenset(alive), leader_name, self._store_dirty, healthy)
        if key == self._announce_key and now - self._interfaces_at < 10.0:
            return
        if not healthy and self._announce_key is not None:
            return  # keep answering what we answered; see the module docstring
        self._announce_key = key
        snapshot = self._snapshot()
        self._store_dirty = False
        if now - self._interfaces_at >= 10.0 or not self._interfaces:
            from kproxy.backends.l2 import interface_map

            self._interfaces = interface_map()
            self._interfaces_at = now
        owners: dict[str, str | None] = {}
        rows: list[dict[str, Any]] = []
        for svc in sorted(services.values(), key=lambda s: s.ref):
            if not svc.ours:
                continue
            local_nodes = _local_endpoint_nodes(snapshot, svc.ref) if svc.external_local else None
            eligible = candidates(nodes, alive, local_endpoint_nodes=local_nodes)
            for ip in svc.ingress:
                if not self.pools.contains(ip):
                    continue
                owner = announcer(ip, eligible)
                if ip in owners and owners[ip] is not None:
                    owner = owners[ip]  # a shared address: the first service decides
                owners[ip] = owner
                rows.append({"address": ip, "service": str(svc.ref), "node": owner or ""})
        self._apply_owners(owners)
        pending = {
            str(ref): d.pending
            for ref, d in self._decisions.items()
            if d.pending and (self.leader or self.local)
        }
        usage = pool_usage(
            self.pools,
            {
                s.ref: Decision(ips=tuple(i for i in s.ingress if self.pools.contains(i)))
                for s in services.values()
                if s.ours
            },
        )
        with self._lock:
            self._report = Report(
                node=self.node, leader=leader_name, pools=usage, addresses=rows, pending=pending
            )

    def _apply_owners(self, owners: dict[str, str | None]) -> None:
        from kproxy.backends.l2 import interface_for

        mine: dict[str, str] = {}
        for ip, owner in owners.items():
            before = self._owners.get(ip)
            if owner != before and before is not None:
                log.info(
                    "LoadBalancer address %s moves from %s to %s",
                    ip,
                    before,
                    owner or "nobody",
                    extra={"address": ip, "from": before, "to": owner or ""},
                )
                if owner == self.node:
                    self.metrics.lb_failovers_total.inc()
            if owner != self.node:
                continue
            iface = interface_for(ip, self._interfaces)
            if iface is None:
                log.warning("LoadBalancer address %s: no interface here faces its subnet", ip)
                continue
            mine[ip] = iface
        gone = [ip for ip in self._owners if ip not in owners and self._owners[ip] == self.node]
        for ip in gone:
            log.info("LoadBalancer address %s released; no longer announced", ip)
        self._owners = owners
        if mine != self.responder.announced:
            self.responder.announce(mine)
        self.metrics.lb_announced.set(len(mine))

    def _announced(self, ip: str) -> None:
        self.metrics.lb_gratuitous_total.inc()
        fam = "ARP" if ipaddress.ip_address(ip).version == 4 else "NDP"
        log.info("announcing %s from this node (%s takeover announcement)", ip, fam)


def _with_ingress(svc: LBService, ips: tuple[str, ...]) -> LBService:
    from dataclasses import replace

    return replace(svc, ingress=ips)


def _local_endpoint_nodes(snapshot: Snapshot | None, ref: Ref) -> set[str]:
    if snapshot is None:
        return set()
    out: set[str] = set()
    for sl in snapshot.slices_for(ref):
        for ep in sl.endpoints:
            if ep.ready and ep.node_name:
                out.add(ep.node_name)
    return out


def strict_arp() -> None:
    """What MetalLB asks of kube-proxy in IPVS mode: addresses on kube-ipvs0 must not make the
    kernel answer ARP on other interfaces (arp_ignore=1), nor be used as ARP sources
    (arp_announce=2); only the elected node's responder answers for LoadBalancer addresses."""
    from kproxy.backends.netinfo import write_sysctl

    for name, value in (
        ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.all.arp_announce", "2"),
    ):
        if not write_sysctl(name, value):
            log.warning("could not set %s=%s (strict ARP)", name, value)
        else:
            log.info("strict ARP: %s=%s", name, value)
