"""The API edge of LoadBalancer support: the watches it needs, the conversions of their raw JSON,
the status patches and the Lease reads and writes. Nothing here decides anything (kproxy.lb
does); every call is one request through the official client with raw JSON bodies.

Watches (the same reflector loop as kproxy.kube.watch): every Service (converted at once to the
small `LBService`), every Node (to `NodeState`), and the Leases of one namespace.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kproxy.errors import SourceError
from kproxy.kube.sink import RawObject
from kproxy.kube.watch import CONNECT_TIMEOUT, _Watcher, load_client_configuration
from kproxy.lb.allocator import ANNOTATION_IPS, ANNOTATION_SHARE, LBService
from kproxy.lb.election import LeaseRecord
from kproxy.lb.select import EXCLUDE_LABEL, NodeState

log = logging.getLogger("kproxy.lb")

REQUEST_TIMEOUT = (CONNECT_TIMEOUT, 10.0)


class Conflict(SourceError):
    """The object changed since we read it (HTTP 409), or already exists on create."""


def parse_lb_service(obj: RawObject) -> LBService:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    annotations = meta.get("annotations") or {}
    requested: list[str] = []
    if spec.get("loadBalancerIP"):
        requested.append(str(spec["loadBalancerIP"]))
    requested += [p for p in str(annotations.get(ANNOTATION_IPS) or "").split(",") if p.strip()]
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    families = tuple(6 if f == "IPv6" else 4 for f in spec.get("ipFamilies") or ())
    return LBService(
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name") or ""),
        type=str(spec.get("type") or "ClusterIP"),
        lb_class=str(spec.get("loadBalancerClass") or ""),
        created=str(meta.get("creationTimestamp") or ""),
        requested=tuple(requested),
        sharing_key=str(annotations.get(ANNOTATION_SHARE) or ""),
        ports=tuple(
            (str(p.get("protocol") or "TCP"), int(p.get("port") or 0))
            for p in spec.get("ports") or ()
        ),
        families=families or (4,),
        family_policy=str(spec.get("ipFamilyPolicy") or "SingleStack"),
        external_local=spec.get("externalTrafficPolicy") == "Local",
        selector=tuple(sorted((spec.get("selector") or {}).items())),
        ingress=tuple(str(i["ip"]) for i in ingress if isinstance(i, dict) and i.get("ip")),
        resource_version=str(meta.get("resourceVersion") or ""),
    )


def parse_node_state(obj: RawObject) -> NodeState:
    meta = obj.get("metadata") or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    ready = [c for c in conditions if isinstance(c, dict) and c.get("type") == "Ready"]
    return NodeState(
        name=str(meta.get("name") or ""),
        ready=not ready or ready[0].get("status") == "True",
        deleting=bool(meta.get("deletionTimestamp")),
        excluded=EXCLUDE_LABEL in (meta.get("labels") or {}),
    )


def _data(resp: Any) -> RawObject:
    try:
        data: RawObject = json.loads(resp.data)
        return data
    finally:
        resp.release_conn()


class LBApi:
    """The requests; see the module docstring."""

    def __init__(self, *, kubeconfig: str | None, master: str | None, namespace: str) -> None:
        self.namespace = namespace
        self._api = client.ApiClient(
            load_client_configuration(kubeconfig=kubeconfig, master=master)
        )
        self._api.user_agent = "kproxy-lb"
        self.core = client.CoreV1Api(self._api)
        self.coordination: Any = client.CoordinationV1Api(self._api)  # raw dict bodies

    def patch_ingress(
        self, namespace: str, name: str, ips: tuple[str, ...], *, resource_version: str
    ) -> str:
        """Set status.loadBalancer.ingress to `ips` (a merge patch guarded by the
        resourceVersion we decided on); returns the new resourceVersion."""
        body: RawObject = {
            "metadata": {"resourceVersion": resource_version} if resource_version else {},
            "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in ips] or None}},
        }
        try:
            resp = self.core.patch_namespaced_service_status(
                name,
                namespace,
                body,
                _content_type="application/merge-patch+json",
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as err:
            if err.status == 409:
                raise Conflict(f"{namespace}/{name} changed meanwhile") from err
            raise
        return str((_data(resp).get("metadata") or {}).get("resourceVersion") or "")

    def read_lease(self, name: str) -> LeaseRecord | None:
        try:
            resp = self.coordination.read_namespaced_lease(
                name, self.namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return LeaseRecord.from_raw(_data(resp))

    def write_lease(self, name: str, record: LeaseRecord) -> LeaseRecord:
        """Create (no resourceVersion) or replace (guarded by it) a Lease; Conflict when
        someone else wrote it first."""
        body: RawObject = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": record.spec(),
        }
        try:
            if record.resource_version:
                body["metadata"]["resourceVersion"] = record.resource_version
                resp = self.coordination.replace_namespaced_lease(
                    name,
                    self.namespace,
                    body,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            else:
                resp = self.coordination.create_namespaced_lease(
                    self.namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
        except ApiException as err:
            if err.status in (409, 422):
                raise Conflict(f"lease {name} was written by someone else") from err
            raise
        return LeaseRecord.from_raw(_data(resp))

    def watchers(
        self, sink: Any, *, stop: threading.Event, backoff_max: float = 10.0
    ) -> list[_Watcher]:
        """List/watch loops for Services, Nodes and this namespace's Leases into `sink`."""
        ns = self.namespace
        calls: dict[str, Callable[..., Any]] = {
            "Service": self.core.list_service_for_all_namespaces,
            "Node": self.core.list_node,
            "Lease": lambda **kw: self.coordination.list_namespaced_lease(ns, **kw),
        }
        return [
            _Watcher(
                kind=kind,
                call=call,
                sink=sink,
                stop=stop,
                backoff_initial=0.2,
                backoff_max=backoff_max,
            )
            for kind, call in calls.items()
        ]
