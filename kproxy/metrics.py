"""Prometheus metrics, named after kube-proxy's (kubeproxy_* -> kproxy_*) so dashboards carry over.

All collectors live on one `CollectorRegistry` per daemon (injected, so tests can run several
daemons in one process without clashes).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

_SYNC_BUCKETS = (
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.024,
    2.048,
    4.096,
    8.192,
    16.384,
)
_NPL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram(
            "kproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            registry=r,
            buckets=_SYNC_BUCKETS,
        )
        self.sync_full_duration = Histogram(
            "kproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            registry=r,
            buckets=_SYNC_BUCKETS,
        )
        self.sync_partial_duration = Histogram(
            "kproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            registry=r,
            buckets=_SYNC_BUCKETS,
        )
        # which syncs happened and why (full: startup, retry, requested, resync, tampered,
        # node; partial: change, periodic); the duration histograms above time them
        self.sync_full = Counter(
            "kproxy_sync_full_proxy_rules",
            "Full syncs (every service rewritten), by trigger",
            ["reason"],
            registry=r,
        )
        self.sync_partial = Counter(
            "kproxy_sync_partial_proxy_rules",
            "Partial syncs (only what changed), by trigger",
            ["reason"],
            registry=r,
        )
        self.drift_detected = Counter(
            "kproxy_sync_proxy_rules_drift_detected",
            "Periodic checks that found kproxy's rules changed from outside (a full sync follows)",
            registry=r,
        )
        self.network_programming = Histogram(
            "kproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds (from the EndpointSlice "
            "last-change-trigger-time to the rules being in the kernel)",
            registry=r,
            buckets=_NPL_BUCKETS,
        )
        self.last_sync = Gauge(
            "kproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            registry=r,
        )
        self.last_queued = Gauge(
            "kproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            registry=r,
        )
        self.endpoint_changes_pending = Gauge(
            "kproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            registry=r,
        )
        self.endpoint_changes_total = Counter(
            "kproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            registry=r,
        )
        self.service_changes_pending = Gauge(
            "kproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            registry=r,
        )
        self.service_changes_total = Counter(
            "kproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            registry=r,
        )
        self.restore_failures = Counter(
            "kproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            registry=r,
        )
        self.sync_failures = Counter(
            "kproxy_sync_proxy_rules_failures",
            "Cumulative failed syncs of any mode",
            registry=r,
        )
        self.rules = Gauge(
            "kproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kproxy",
            ["table"],
            registry=r,
        )
        self.no_local_endpoints = Gauge(
            "kproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy"],
            registry=r,
        )
        self.conntrack_deleted = Counter(
            "kproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by the stale-UDP cleanup",
            registry=r,
        )
        self.invalid_objects = Counter(
            "kproxy_invalid_objects",
            "Kubernetes objects skipped because they are invalid",
            ["kind"],
            registry=r,
        )
        self.rejected_services = Gauge(
            "kproxy_sync_rejected_services",
            "Services left unprogrammed because iptables-restore refused their rules",
            registry=r,
        )
        self.services = Gauge(
            "kproxy_services",
            "Services in the model",
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class LBMetrics:
    """LoadBalancer pools and layer-2 announcements (kproxy.runtime.lb); only registered when
    address pools are configured."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.lb_pool_size = Gauge(
            "kproxy_lb_pool_addresses",
            "Addresses in a LoadBalancer pool range",
            ["pool"],
            registry=r,
        )
        self.lb_pool_used = Gauge(
            "kproxy_lb_pool_addresses_used",
            "Addresses of a LoadBalancer pool range assigned to services",
            ["pool"],
            registry=r,
        )
        self.lb_leader = Gauge(
            "kproxy_lb_allocator_leader", "1 while this agent is the address allocator", registry=r
        )
        self.lb_allocations_total = Counter(
            "kproxy_lb_status_writes_total",
            "LoadBalancer status writes (assignments and releases) by this agent",
            registry=r,
        )
        self.lb_pending_total = Counter(
            "kproxy_lb_pending_total", "Times a LoadBalancer service was left pending", registry=r
        )
        self.lb_announced = Gauge(
            "kproxy_lb_announced_addresses", "Addresses this node answers ARP/NDP for", registry=r
        )
        self.lb_replies = Counter(
            "kproxy_lb_neighbor_replies_total",
            "ARP replies (family 4) and Neighbor Advertisements (family 6) sent",
            ["family"],
            registry=r,
        )
        self.lb_gratuitous_total = Counter(
            "kproxy_lb_takeover_announcements_total",
            "Addresses this node took over and announced (gratuitous ARP / unsolicited NA)",
            registry=r,
        )
        self.lb_failovers_total = Counter(
            "kproxy_lb_failovers_total",
            "Addresses that moved to this node from another announcing node",
            registry=r,
        )
