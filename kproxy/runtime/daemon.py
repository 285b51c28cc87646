"""`kproxy run`: wires the model store, a source, the dataplane, DNS and the HTTP endpoints.

Threads: the source's watcher threads feed the store; a DNS updater thread pushes snapshots to
the DNS server (debounced); the HTTP servers run in their own threads; the sync loop runs in the
main thread. Signal handlers only record the request (stop, resync); the loop acts on it.
Stopping never touches the kernel rules: a restart reconciles instead of flushing.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

from kproxy import memtrim
from kproxy.backends.base import DriftCheck, SyncError, SyncResult
from kproxy.backends.conntrack import ConntrackCleaner
from kproxy.config import Settings, node_name
from kproxy.inspect.socketpath import STATE_VERSION, default_socket_path, netns_inode
from kproxy.kube.ingest import StoreSink
from kproxy.metrics import Metrics
from kproxy.model.objects import UDP, Ref
from kproxy.model.store import Changes, Snapshot, Store, without_proxy_for
from kproxy.model.view import ServicePortView, build_views
from kproxy.render.conntrack import StaleFlowPlan, plan_stale_flows
from kproxy.runtime.dataplane import Plane, make_planes
from kproxy.runtime.health import HealthState, HTTPEndpoint, Route, health_routes
from kproxy.runtime.inspectsock import InspectServer, configz_route, state_route
from kproxy.runtime.listeners import Listeners
from kproxy.runtime.runner import SyncLoop, SyncPlan
from kproxy.runtime.sdnotify import Notifier
from kproxy.runtime.svchealth import ServiceHealthServer

if TYPE_CHECKING:
    from kproxy.dns.server import DNSService
    from kproxy.runtime.lb import LoadBalancerController, LocalPoolSink

log = logging.getLogger("kproxy")


def views_kept(views: tuple[ServicePortView, ...]) -> bool:
    """Whether the daemon keeps a service's views between syncs: only what the work after a
    sync reads again later (UDP ports for stale conntrack entries; local traffic policies for
    the no-local-endpoint gauges and health-check ports). A plain TCP service with cluster
    policies needs none, and at 10k services x 10 endpoints all views are ~15 MB."""
    return any(
        v.protocol == UDP or v.decision.internal_local or v.decision.external_local for v in views
    )


class Daemon:
    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.node_name = node_name(settings)
        self.metrics = metrics or Metrics()
        self.stop_event = threading.Event()
        self.store = Store()
        self.listeners = Listeners(self.stop_event)
        self.health = HealthState(
            timeout=2 * max(settings.sync_period, 1.0), unbound=self.listeners.unbound
        )
        self.notifier = Notifier()
        self._dns_wake = threading.Event()
        self._synced_once = False
        self._http: list[HTTPEndpoint] = []
        self._inspect: InspectServer | None = None
        self._wanted: tuple[Snapshot, float] | None = None  # last snapshot handed to the planes
        self.planes: list[Plane] = []
        self._views: dict[int, dict[Ref, tuple[ServicePortView, ...]]] = {}
        self._cleaner: ConntrackCleaner | None = None
        self._conntrack_retry = False
        self._pending_lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self.service_health: ServiceHealthServer | None = None
        self.dns: DNSService | None = None
        self.lb: LoadBalancerController | None = None
        self._local_lb: LocalPoolSink | None = None
        self.loop = SyncLoop(
            sync=self._sync,
            min_interval=settings.min_sync_period,
            max_interval=settings.sync_period,
            full_interval=settings.full_sync_period,
            stop=self.stop_event,
            tick=self._tick,
            tick_interval=self._tick_interval(),
        )
        sink = StoreSink(
            self.store,
            node_name=self.node_name,
            on_invalid=lambda kind: self.metrics.invalid_objects.labels(kind).inc(),
            on_event=self._on_event,
        )
        self.source = self._make_source(sink)
        self.store.subscribe(self._on_change)

    # -- construction ----------------------------------------------------------------------
    def _tick_interval(self) -> float:
        wd = self.notifier.watchdog_interval()
        return min(5.0, wd / 2) if wd else 5.0

    def _make_source(self, sink: StoreSink) -> object:
        s = self.settings
        if s.manifests:
            from kproxy.kube.manifests import ManifestSource

            if s.lb_pools:  # this agent allocates LoadBalancer addresses itself
                from kproxy.lb.pools import Pools
                from kproxy.runtime.lb import LocalPoolSink

                self._local_lb = LocalPoolSink(sink, Pools.parse(s.lb_pools))
                return ManifestSource(
                    sink=self._local_lb, directory=s.manifests, stop=self.stop_event
                )
            return ManifestSource(sink=sink, directory=s.manifests, stop=self.stop_event)
        from kproxy.kube.watch import KubeSource

        return KubeSource(
            sink=sink,
            kubeconfig=s.kubeconfig or None,
            master=s.master or None,
            node_name=self.node_name,
            stop=self.stop_event,
        )

    # -- events ----------------------------------------------------------------------------
    def _on_event(self, kind: str) -> None:
        """Count watch events the way kube-proxy counts changes (pending until the next sync)."""
        with self._pending_lock:
            self._pending[kind] = self._pending.get(kind, 0) + 1
        if kind == "EndpointSlice":
            self.metrics.endpoint_changes_total.inc()
            self.metrics.endpoint_changes_pending.inc()
        elif kind == "Service":
            self.metrics.service_changes_total.inc()
            self.metrics.service_changes_pending.inc()

    def _on_change(self) -> None:
        self.health.queued()
        self.metrics.last_queued.set(time.time())
        self.loop.request()
        self._dns_wake.set()

    def _tick(self) -> None:
        self.notifier.watchdog()
        node = self.store.peek().node
        self.health.node_deleting = bool(node and node.deleting)

    def _dns_updater(self) -> None:
        assert self.dns is not None
        while not self.stop_event.is_set():
            if not self._dns_wake.wait(1.0):
                continue
            self._dns_wake.clear()
            try:
                self.dns.update(self.store.peek())
            except Exception:
                log.exception("DNS index update failed")
            self.stop_event.wait(0.05)  # debounce bursts of events

    # -- syncing ---------------------------------------------------------------------------
    def _all_checkable(self) -> bool:
        return all(isinstance(p.proxier, DriftCheck) for p in self.planes)

    def _drift(self) -> str | None:
        """The periodic check: does any plane's kernel state differ from what it wrote?"""
        for plane in self.planes:
            if not isinstance(plane.proxier, DriftCheck):
                continue
            try:
                found = plane.proxier.drift()
            except Exception as err:  # a check that cannot run is treated as drift
                log.exception("drift check of IPv%d rules failed", plane.family)
                found = f"check failed: {err}"
            if found:
                return f"IPv{plane.family}: {found}"
        return None

    def _sync(self, plan: SyncPlan) -> tuple[bool, bool]:
        snapshot, changes = self.store.take()
        with self._pending_lock:
            self._pending.clear()
        self.metrics.endpoint_changes_pending.set(0)
        self.metrics.service_changes_pending.set(0)
        if self.settings.dns and self.settings.dns_service_ip:
            snapshot = without_proxy_for(snapshot, self.settings.dns_service_ip)
        full, reason = plan.full, plan.reason
        started = time.monotonic()
        if not full and changes.node_changed:
            full, reason = True, "node"
        if not full and plan.check and not self._all_checkable():
            # a proxier without a cheap drift check keeps the old rule: the periodic sync
            # rewrites everything (nftables until it implements DriftCheck)
            full, reason = True, "periodic"
        if not full and plan.check:
            drift = self._drift()
            if drift:
                self.metrics.drift_detected.inc()
                log.warning("kproxy's rules were changed from outside (%s): full resync", drift)
                full, reason = True, "tampered"
        if full:
            changes = Changes(
                services=changes.services,
                node_changed=True,
                full=True,
                trigger_times=changes.trigger_times,
                queued_at=changes.queued_at,
            )
        self._wanted = (snapshot, time.time())
        results: list[SyncResult] = []
        ok = True
        for plane in self.planes:
            try:
                results.append(plane.proxier.sync(snapshot, changes, full=full))
            except SyncError as err:
                ok = False
                log.error("sync of IPv%d rules failed: %s", plane.family, err)
            except Exception:
                ok = False
                log.exception("sync of IPv%d rules failed", plane.family)
        elapsed = time.monotonic() - started
        self.metrics.rejected_services.set(len(self.rejected_services()))
        if not ok:
            self.metrics.sync_failures.inc()
            self.metrics.restore_failures.inc()
            return False, full
        if not full and any(r.full for r in results):
            full, reason = True, "proxier"  # the proxier found it had to rewrite everything
        self._record(snapshot, changes, results, elapsed=elapsed, full=full, reason=reason)
        self._after_sync(snapshot, changes, full=full)
        if full:
            memtrim.trim()  # the full render's text is gone: give its pages back
        return True, full

    def rejected_services(self) -> list[dict[str, object]]:
        """The services a proxier left out because the kernel tools refused their rules."""
        out: list[dict[str, object]] = []
        for plane in self.planes:
            for ref, bad in getattr(plane.proxier, "rejected", {}).items():
                out.append({"service": str(ref), "family": plane.family, "error": bad.error})
        return out

    def _after_sync(self, snapshot: Snapshot, changes: Changes, *, full: bool) -> None:
        """Stale UDP conntrack cleanup and health-check ports, from the views that changed."""
        changed: list[dict[Ref, tuple[ServicePortView, ...]]] = []
        plan: StaleFlowPlan | None = None
        # after a failed cleanup, reconcile every UDP frontend (previous={}) on the next sync
        reconcile, self._conntrack_retry = self._conntrack_retry, False
        for plane in self.planes:
            known = self._views.setdefault(plane.family, {})
            whole = full or reconcile
            refs = set(snapshot.services) | set(known) if whole else set(changes.services)
            current = dict(
                build_views(snapshot, family=plane.family, node_name=self.node_name, refs=refs)
            )
            previous = {} if reconcile else {ref: known.get(ref, ()) for ref in refs}
            for ref, views in current.items():
                if views_kept(views):
                    known[ref] = views
                else:
                    known.pop(ref, None)
            changed.append(current)
            if self.settings.conntrack_udp_cleanup:
                step = plan_stale_flows(previous, current, nodeport_ips=plane.options.nodeport_ips)
                plan = step if plan is None else plan.merged(step)
        if plan is not None and not plan.empty and self._cleaner is not None:
            try:
                self.metrics.conntrack_deleted.inc(self._cleaner.apply(plan))
            except Exception:
                self._conntrack_retry = True
                log.exception("stale UDP conntrack cleanup failed; retrying with the next sync")
        self._count_no_local_endpoints()
        if self.service_health is not None:
            if full:
                self.service_health.sync(*(self._views.get(p.family, {}) for p in self.planes))
            else:
                self.service_health.update(*changed)

    def _record(
        self,
        snapshot: Snapshot,
        changes: Changes,
        results: list[SyncResult],
        *,
        elapsed: float,
        full: bool,
        reason: str,
    ) -> None:
        m = self.metrics
        m.sync_duration.observe(elapsed)
        (m.sync_full_duration if full else m.sync_partial_duration).observe(elapsed)
        (m.sync_full if full else m.sync_partial).labels(reason).inc()
        now = time.time()
        m.last_sync.set(now)
        for trigger in changes.trigger_times:
            if trigger <= now:
                m.network_programming.observe(now - trigger)
        m.services.set(len(snapshot.services))
        tables: dict[str, int] = {}
        for r in results:
            for table, count in r.rules.items():
                tables[table] = tables.get(table, 0) + count
        for table, count in tables.items():
            m.rules.labels(table).set(count)
        self.health.updated()
        written = sum(r.services_written for r in results)
        log.info(
            "synced %s in %.1f ms: %s sync (%s), %d services, %d changed, %d written",
            "all rules" if full else "changes",
            elapsed * 1000,
            "full" if full else "partial",
            reason,
            len(snapshot.services),
            len(changes.services),
            written,
            extra={
                "duration_ms": round(elapsed * 1000, 2),
                "full": full,
                "reason": reason,
                "services": len(snapshot.services),
                "changed": len(changes.services),
                "written": written,
            },
        )
        if not self._synced_once:
            self._synced_once = True
            self.notifier.ready()
            self.notifier.status(f"synced {len(snapshot.services)} services")

    # -- lifecycle -------------------------------------------------------------------------
    def _install_signals(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, stopping (rules stay in place)", signal.Signals(signum).name)
            self.stop_event.set()
            self.loop.request()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            log.info("received SIGHUP, full resync requested")
            self.loop.request(full=True, reason="requested")

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_stop)
            signal.signal(signal.SIGINT, on_stop)
            signal.signal(signal.SIGHUP, on_hup)

    def _start_http(self) -> None:
        s = self.settings
        if s.healthz_bind_address:
            self._serve_http("healthz", s.healthz_bind_address, health_routes(self.health))
        if s.metrics_bind_address:
            routes = health_routes(self.health)
            routes["/metrics"] = lambda: (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.exposition(),
            )
            routes["/configz"] = configz_route(s)
            describers = [p.proxier.describe for p in self.planes if hasattr(p.proxier, "describe")]
            if describers:  # userspace mode: the listeners and the next endpoint of each
                routes["/userspace"] = lambda: (
                    200,
                    "application/json",
                    json.dumps([row for d in describers for row in d()]).encode(),
                )
            if self.lb is not None:
                lb = self.lb
                routes["/lb"] = lambda: (200, "application/json", json.dumps(lb.report()).encode())
            self._serve_http("metrics", s.metrics_bind_address, routes)

    def _serve_http(self, name: str, address: str, routes: dict[str, Route]) -> None:
        def open_() -> None:
            endpoint = HTTPEndpoint(address, routes, name=name)
            endpoint.start()
            self._http.append(endpoint)

        port = address.rpartition(":")[2]
        self.listeners.start(
            name, address, open_, hint=f"is kube-proxy still running? `ss -ltnp sport = :{port}`"
        )

    def _start_inspect(self) -> None:
        """The wanted state for `kproxy status`/`explain` (kproxy.runtime.inspectsock)."""
        routes = state_route(
            settings=self.settings,
            node_name=self.node_name,
            planes=lambda: self.planes,
            wanted=lambda: self._wanted or (self.store.peek(), 0.0),
            unbound=self.listeners.unbound,
            rejected=self.rejected_services,
        )
        describers = [p.proxier.describe for p in self.planes if hasattr(p.proxier, "describe")]
        if describers:  # userspace mode: its proxy's listeners (kproxy.inspect.userspace)
            routes["/v1/userspace"] = lambda: {
                "version": STATE_VERSION,
                "netns": netns_inode(),
                "listeners": [r for d in describers for r in d()],
            }
        server = InspectServer(default_socket_path(), routes)
        self._inspect = server
        self.listeners.start(
            "the inspection socket",
            str(server.path),
            server.start,
            hint="another kproxy agent runs in this network namespace",
        )

    def _count_no_local_endpoints(self) -> None:
        """kube-proxy's serviceNoLocalEndpointsTotal{internal,external}."""
        internal = external = 0
        for known in self._views.values():
            for views in known.values():
                for v in views:
                    d = v.decision
                    if d.local:
                        continue
                    if d.internal_local:
                        internal += 1
                    if d.external_local and d.has_external:
                        external += 1
        self.metrics.no_local_endpoints.labels("internal").set(internal)
        self.metrics.no_local_endpoints.labels("external").set(external)

    def _start_conntrack(self) -> None:
        if not self.settings.conntrack_udp_cleanup:
            return
        try:
            self._cleaner = ConntrackCleaner()
        except Exception as err:
            log.warning("stale UDP conntrack cleanup disabled: %s", err)

    def _start_service_health(self) -> None:
        ips = [ip for p in self.planes if p.options.nodeport_ips for ip in p.options.nodeport_ips]
        self.service_health = ServiceHealthServer(
            bind_ip=ips or "", proxy_healthy=self.health.healthy
        )

    def _start_dns(self) -> None:
        if not self.settings.dns:
            return
        from kproxy.dns.server import DNSError
        from kproxy.runtime.dnswiring import make_dns

        dns = self.dns = make_dns(self.settings)

        def open_() -> None:
            dns.start()
            threading.Thread(target=self._dns_updater, name="dns-updater", daemon=True).start()
            self._dns_wake.set()

        # a taken :53 (systemd-resolved, another DNS server) must not stop the proxying: the
        # address is retried in the background like the HTTP ports
        self.listeners.start(
            "DNS",
            ", ".join(self.settings.dns_listen),
            open_,
            hint="systemd-resolved or another DNS server listens there? `ss -lunp sport = :53`",
            catch=(DNSError, OSError),
        )

    def _make_lb(self) -> None:
        """LoadBalancer address pools and layer-2 announcements (only with --lb-pool)."""
        s = self.settings
        if not s.lb_pools:
            return
        from kproxy.lb.pools import Pools
        from kproxy.metrics import LBMetrics
        from kproxy.runtime.lb import LoadBalancerController, strict_arp

        if s.proxy_mode == "ipvs":
            strict_arp()
        self.lb = LoadBalancerController(
            pools=Pools.parse(s.lb_pools),
            node_name=self.node_name,
            kubeconfig=s.kubeconfig or None,
            master=s.master or None,
            namespace=s.lb_lease_namespace,
            lease_duration=int(s.lb_lease_duration),
            snapshot=self.store.peek,
            metrics=LBMetrics(self.metrics.registry),
            stop=threading.Event(),
            local=self._local_lb,
        )
        self.store.subscribe(self.lb.store_changed)

    def run(self) -> int:
        memtrim.limit_arenas()
        self._install_signals()
        log.info(
            "kproxy starting",
            extra={"node": self.node_name, "mode": self.settings.proxy_mode},
        )
        self.planes = make_planes(self.settings, node_name=self.node_name)
        self._start_conntrack()
        self._start_service_health()
        self._make_lb()
        self._start_http()
        self._start_inspect()
        self._start_dns()
        self.source.start()  # type: ignore[attr-defined]
        if self.lb is not None:
            self.lb.start()
        while not self.stop_event.is_set():
            if self.source.wait_synced(1.0):  # type: ignore[attr-defined]
                break
            self.notifier.watchdog()
            log.info("waiting for the first list of Services and EndpointSlices")
        if not self.stop_event.is_set():
            self._dns_wake.set()
            self.loop.run()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        self.notifier.stopping()
        self.stop_event.set()
        if self.lb is not None:
            self.lb.stop()  # first: the next owners take over while we finish stopping
        for endpoint in self._http:
            endpoint.stop()
        if self._inspect is not None:
            self._inspect.stop()
        if self.service_health is not None:
            self.service_health.stop()
        if self.dns is not None:
            self.dns.stop()
        log.info("kproxy stopped; kernel rules left in place")
