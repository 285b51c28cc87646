"""The work after a sync that landed, from the views of the services that changed: stale UDP
conntrack entries deleted, the health-check ports of services with a local external traffic
policy opened or closed, and kube-proxy's no-local-endpoint gauges.

Previous and current views come from one `ViewTracker` per IP family (kproxy.model.tracker), which
keeps between syncs only the services this work reads again (`views_kept`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from kproxy.backends.conntrack import ConntrackCleaner
from kproxy.metrics import Metrics
from kproxy.model.objects import UDP, Ref, Service
from kproxy.model.store import Changes, Snapshot
from kproxy.model.tracker import Views, ViewTracker
from kproxy.render.conntrack import StaleFlowPlan, plan_stale_flows
from kproxy.runtime.dataplane import Plane
from kproxy.runtime.svchealth import ServiceHealthServer

log = logging.getLogger("kproxy")


def views_kept(views: Views) -> bool:
    """Whether a service's views are kept between syncs: only what the work after a sync reads
    again later (UDP ports for stale conntrack entries; local traffic policies for the
    no-local-endpoint gauges and health-check ports). A plain TCP service with cluster
    policies needs none, and at 10k services x 10 endpoints all views are ~15 MB."""
    return any(
        v.protocol == UDP or v.decision.internal_local or v.decision.external_local for v in views
    )


def views_may_be_kept(service: Service) -> bool:
    """`views_kept`, told from the Service alone (its views have the same ports and policies):
    the tracker builds no views of the other services unless it remembers them."""
    return (
        service.internal_policy_local
        or service.external_policy_local
        or any(p.protocol == UDP for p in service.ports)
    )


class FollowUps:
    """Runs after every successful sync, in the sync loop's thread."""

    def __init__(
        self,
        planes: Sequence[Plane],
        *,
        node_name: str,
        metrics: Metrics,
        conntrack_cleanup: bool,
        proxy_healthy: Callable[[], bool],
    ) -> None:
        self.planes = list(planes)
        self.metrics = metrics
        self.trackers = {
            p.family: ViewTracker(
                family=p.family,
                node_name=node_name,
                keep=views_kept,
                relevant=views_may_be_kept,
            )
            for p in self.planes
        }
        self.conntrack_cleanup = conntrack_cleanup
        self._cleaner: ConntrackCleaner | None = None
        self._conntrack_retry = False
        if conntrack_cleanup:
            try:
                self._cleaner = ConntrackCleaner()
            except Exception as err:
                log.warning("stale UDP conntrack cleanup disabled: %s", err)
        ips = [ip for p in self.planes if p.options.nodeport_ips for ip in p.options.nodeport_ips]
        self.service_health = ServiceHealthServer(bind_ip=ips or "", proxy_healthy=proxy_healthy)

    def after_sync(self, snapshot: Snapshot, changes: Changes, full: bool) -> None:
        """Stale UDP conntrack cleanup and health-check ports, from the views that changed."""
        changed: list[Mapping[Ref, Views]] = []
        plan: StaleFlowPlan | None = None
        # after a failed cleanup, reconcile every UDP frontend (previous={}) on the next sync
        reconcile, self._conntrack_retry = self._conntrack_retry, False
        for plane in self.planes:
            step = self.trackers[plane.family].advance(
                snapshot, None if full or reconcile else changes.services, forget=reconcile
            )
            changed.append(step.current)
            if self.conntrack_cleanup:
                flows = plan_stale_flows(
                    step.previous, step.current, nodeport_ips=plane.options.nodeport_ips
                )
                plan = flows if plan is None else plan.merged(flows)
        if plan is not None and not plan.empty and self._cleaner is not None:
            try:
                self.metrics.conntrack_deleted.inc(self._cleaner.apply(plan))
            except Exception:
                self._conntrack_retry = True
                log.exception("stale UDP conntrack cleanup failed; retrying with the next sync")
        self._count_no_local_endpoints()
        if full:
            self.service_health.sync(*(t.known for t in self.trackers.values()))
        else:
            self.service_health.update(*changed)

    def _count_no_local_endpoints(self) -> None:
        """kube-proxy's serviceNoLocalEndpointsTotal{internal,external}."""
        internal = external = 0
        for tracker in self.trackers.values():
            for views in tracker.known.values():
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

    def stop(self) -> None:
        self.service_health.stop()
