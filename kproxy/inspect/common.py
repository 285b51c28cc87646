"""Getting a snapshot for the inspection commands, from manifests or from the API."""

from __future__ import annotations

import sys
import threading
from dataclasses import replace

from kproxy.config import Settings, base_options, node_name
from kproxy.kube.ingest import StoreSink
from kproxy.model.objects import NodeInfo
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Snapshot, Store


def load_snapshot(settings: Settings, *, timeout: float = 15.0) -> Snapshot:
    """The cluster state the agent would see: one list of every kind, no watch kept open."""
    store = Store()
    sink = StoreSink(store, node_name=node_name(settings))
    stop = threading.Event()
    if settings.manifests:
        from kproxy.kube.manifests import ManifestSource

        ManifestSource(sink=sink, directory=settings.manifests, stop=stop).load_once()
    else:
        from kproxy.kube.watch import KubeSource

        source = KubeSource(
            sink=sink,
            kubeconfig=settings.kubeconfig or None,
            master=settings.master or None,
            node_name=node_name(settings),
            stop=stop,
        )
        source.start()
        ok = source.wait_synced(timeout)
        stop.set()
        if not ok:
            print("kproxy: could not list Services/EndpointSlices in time", file=sys.stderr)
            raise SystemExit(1)
    return store.peek()


def offline_options(
    settings: Settings, *, family: int, node: NodeInfo | None = None
) -> ProxyOptions:
    """ProxyOptions without reading the host (render works anywhere, without root).

    The node's addresses are the ones the agent would find on its interfaces, as the cluster
    knows them: the Node object's InternalIP/ExternalIP addresses, plus --node-ip-override's,
    which (as in the agent) are also the primary addresses LoadBalancer source ranges test."""
    import ipaddress

    options = base_options(settings, family=family, node_name=node_name(settings))
    known = (node.addresses if node else ()) + (options.primary_ips or ())
    own = tuple(dict.fromkeys(ip for ip in known if ipaddress.ip_address(ip).version == family))
    return replace(options, node_ips=own)
