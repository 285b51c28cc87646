"""`kproxy run`: wires the model store, a source, the dataplane, DNS and the HTTP endpoints,
and runs the sync loop. The parts each own one job: kproxy.runtime.syncer (one sync and its
records), kproxy.runtime.followups (conntrack, health-check ports and gauges after a sync),
kproxy.runtime.dnswiring (the DNS server and its updater thread), kproxy.runtime.lb.

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
from kproxy.config import Settings, node_name
from kproxy.errors import DataplaneError
from kproxy.inspect.socketpath import STATE_VERSION, default_socket_path, netns_inode
from kproxy.kube.ingest import StoreSink
from kproxy.kube.sink import Source
from kproxy.metrics import Metrics
from kproxy.model.store import Store
from kproxy.runtime.dataplane import Plane, make_planes
from kproxy.runtime.followups import FollowUps
from kproxy.runtime.health import HealthState, HTTPEndpoint, Route, health_routes
from kproxy.runtime.inspectsock import InspectServer, configz_route, state_route
from kproxy.runtime.listeners import Listeners
from kproxy.runtime.runner import SyncLoop, SyncPlan
from kproxy.runtime.sdnotify import Notifier
from kproxy.runtime.syncer import Syncer

if TYPE_CHECKING:
    from kproxy.dns.server import DNSService
    from kproxy.runtime.dnswiring import DNSUpdater
    from kproxy.runtime.lb import LoadBalancerController, LocalPoolSink

log = logging.getLogger("kproxy")


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
        self._synced_once = False
        self._http: list[HTTPEndpoint] = []
        self._inspect: InspectServer | None = None
        self.planes: list[Plane] = []
        self.followups: FollowUps | None = None
        self.syncer: Syncer | None = None
        self.dns: DNSService | None = None
        self._dns_updater: DNSUpdater | None = None
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

    def _make_source(self, sink: StoreSink) -> Source:
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
        if self._dns_updater is not None:
            self._dns_updater.wake()

    def _tick(self) -> None:
        self.notifier.watchdog()
        node = self.store.peek().node
        self.health.node_deleting = bool(node and node.deleting)

    # -- syncing ---------------------------------------------------------------------------
    def _sync(self, plan: SyncPlan) -> tuple[bool, bool]:
        assert self.syncer is not None, "run() builds the syncer before the loop starts"
        return self.syncer.sync(plan)

    def _synced(self, services: int) -> None:
        self.health.updated()
        if not self._synced_once:
            self._synced_once = True
            self.notifier.ready()
            self.notifier.status(f"synced {services} services")

    def rejected_services(self) -> list[dict[str, object]]:
        """The services a proxier left out because the kernel tools refused their rules."""
        return self.syncer.rejected_services() if self.syncer is not None else []

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
            wanted=lambda: (self.syncer and self.syncer.wanted) or (self.store.peek(), 0.0),
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

    def _start_syncing(self) -> None:
        """The planes, what follows their syncs, and the syncer the loop calls."""
        s = self.settings
        self.planes = make_planes(s, node_name=self.node_name)
        self.followups = FollowUps(
            self.planes,
            node_name=self.node_name,
            metrics=self.metrics,
            conntrack_cleanup=s.conntrack_udp_cleanup,
            proxy_healthy=self.health.healthy,
        )
        self.syncer = Syncer(
            self.store,
            self.planes,
            metrics=self.metrics,
            after_sync=self.followups.after_sync,
            on_synced=self._synced,
            dns_service_ip=s.dns_service_ip if s.dns else "",
        )

    def _start_dns(self) -> None:
        if not self.settings.dns:
            return
        from kproxy.dns.server import DNSError
        from kproxy.runtime.dnswiring import DNSUpdater, make_dns

        dns = self.dns = make_dns(self.settings)
        updater = DNSUpdater(dns, self.store.peek, self.stop_event)

        def open_() -> None:
            dns.start()
            self._dns_updater = updater
            updater.start()

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
        """LoadBalancer address pools and layer-2 announcements (only with --lb-pool); strict
        ARP in IPVS mode with pools or --ipvs-strict-arp (before the first sync binds any
        address to kube-ipvs0)."""
        s = self.settings
        if s.proxy_mode == "ipvs" and (s.lb_pools or s.ipvs_strict_arp):
            from kproxy.runtime.lb import strict_arp

            strict_arp()
        if not s.lb_pools:
            return
        from kproxy.lb.pools import Pools
        from kproxy.metrics import LBMetrics
        from kproxy.runtime.lb import LoadBalancerController

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
            ready=lambda: self._synced_once,
        )
        self.store.subscribe(self.lb.store_changed)

    def run(self) -> int:
        memtrim.limit_arenas()
        self._install_signals()
        log.info(
            "kproxy starting",
            extra={"node": self.node_name, "mode": self.settings.proxy_mode},
        )
        try:
            self._start_syncing()
        except DataplaneError as err:  # e.g. a kernel without nf_tables
            log.error("cannot start the %s dataplane: %s", self.settings.proxy_mode, err)
            return 1
        self._make_lb()
        self._start_http()
        self._start_inspect()
        self._start_dns()
        self.source.start()
        if self.lb is not None:
            self.lb.start()
        while not self.stop_event.is_set():
            if self.source.wait_synced(1.0):
                break
            self.notifier.watchdog()
            log.info("waiting for the first list of Services and EndpointSlices")
        if not self.stop_event.is_set():
            if self._dns_updater is not None:
                self._dns_updater.wake()
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
        if self.followups is not None:
            self.followups.stop()
        if self.dns is not None:
            self.dns.stop()
        log.info("kproxy stopped; kernel rules left in place")
