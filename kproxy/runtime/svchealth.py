"""Per-service health-check servers on `healthCheckNodePort` (kube-proxy's service health server,
pkg/proxy/healthcheck/service_health.go), so load balancers send external traffic only to nodes
that have a local endpoint of an `externalTrafficPolicy: Local` service.

For every proxied service with externalTrafficPolicy Local and a healthCheckNodePort, an HTTP
server listens on that port (on every address, or on the given ones) and answers any request,
whatever its path, with 200 when the service has at least one local *ready* endpoint and the
proxy itself is healthy, 503 otherwise. The body is kube-proxy's, byte for byte (tab-indented):

    {"service": {"namespace": NS, "name": NAME}, "localEndpoints": N, "serviceProxyHealthy": B}

N counts distinct local ready endpoint addresses over all ports and families of the service, as
kube-proxy's LocalReadyEndpoints does. Terminating endpoints are not counted even when they still
receive traffic through the terminating fallback (the decisions' `local` set): a node left
with only terminating endpoints must fail its check, so the load balancer drains it.

One thread multiplexes every listening socket; each accepted connection is answered by a short
thread and closed. A port that cannot be bound is logged (once per service and port) and retried
at the next sync; it never fails the sync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from kproxy.model.objects import Ref
from kproxy.model.view import ServicePortView

log = logging.getLogger("kproxy.svchealth")

ViewMap = Mapping[Ref, Sequence[ServicePortView]]
REQUEST_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """What one service needs: its health-check port and its local ready endpoint count."""

    port: int
    local_endpoints: int


def health_checks(*view_maps: ViewMap) -> dict[Ref, HealthCheck | None]:
    """The health check of every ref in `view_maps` (None: the ref needs no health server).

    Several maps (one per IP family) are merged per ref.
    """
    merged: dict[Ref, list[ServicePortView]] = {}
    for views in view_maps:
        for ref, port_views in views.items():
            merged.setdefault(ref, []).extend(port_views)
    return {ref: _health_check(port_views) for ref, port_views in merged.items()}


def _health_check(port_views: Sequence[ServicePortView]) -> HealthCheck | None:
    if not port_views:
        return None
    service = port_views[0].service
    port = port_views[0].decision.health_check_node_port
    if not port:
        return None
    local_ready = {
        e.ip
        for view in port_views
        for e in view.endpoints
        if e.is_local and (e.ready or service.publish_not_ready)
    }
    return HealthCheck(port=port, local_endpoints=len(local_ready))


def render_body(ref: Ref, local_endpoints: int, proxy_healthy: bool) -> bytes:
    """kube-proxy's response body (Go's dedented template: tab indentation, no final newline)."""
    payload = {
        "service": {"namespace": ref.namespace, "name": ref.name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    }
    return json.dumps(payload, indent="\t").encode()


@dataclass
class _Instance:
    """The listening sockets and current count of one service."""

    port: int
    local_endpoints: int
    sockets: list[socket.socket] = field(default_factory=list)


class ServiceHealthServer:
    """Opens, updates and closes the health-check listeners as services come and go.

    `bind_ip`: "" for every address (IPv6 and IPv4 when the host has IPv6), or one address or
    several (kube-proxy's --nodeport-addresses). `proxy_healthy` is asked on every request.
    """

    def __init__(
        self, *, bind_ip: str | Sequence[str] = "", proxy_healthy: Callable[[], bool]
    ) -> None:
        self._addresses = _bind_addresses(bind_ip)
        self._proxy_healthy = proxy_healthy
        self._lock = threading.Lock()
        self._services: dict[Ref, _Instance] = {}
        self._failed: set[tuple[Ref, int]] = set()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public API ------------------------------------------------------------------------------
    def sync(self, views: ViewMap, *more: ViewMap) -> None:
        """Make the listeners match exactly the services of `views` (pass one map per family)."""
        wanted = health_checks(views, *more)
        with self._lock:
            for ref in list(self._services):
                if wanted.get(ref) is None:
                    self._close(ref)
            self._failed = {(ref, port) for ref, port in self._failed if wanted.get(ref)}
        self._apply(wanted)

    def update(self, views: ViewMap, *more: ViewMap) -> None:
        """Like `sync`, for the refs in `views` only (a partial sync); other services stay."""
        self._apply(health_checks(views, *more))

    def stop(self) -> None:
        """Close every listener and stop serving."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for ref in list(self._services):
                self._close(ref)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def ports(self) -> dict[Ref, int]:
        """The services being served and their ports."""
        with self._lock:
            return {ref: inst.port for ref, inst in self._services.items()}

    def local_endpoints(self, ref: Ref) -> int | None:
        with self._lock:
            inst = self._services.get(ref)
            return None if inst is None else inst.local_endpoints

    # -- listeners -------------------------------------------------------------------------------
    def _apply(self, wanted: Mapping[Ref, HealthCheck | None]) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            for ref, check in wanted.items():
                inst = self._services.get(ref)
                if check is None:
                    if inst is not None:
                        self._close(ref)
                    continue
                if inst is not None and inst.port != check.port:
                    self._close(ref)
                    inst = None
                if inst is None:
                    inst = self._open(ref, check)
                    if inst is None:
                        continue
                inst.local_endpoints = check.local_endpoints
        self._ensure_thread()

    def _open(self, ref: Ref, check: HealthCheck) -> _Instance | None:
        inst = _Instance(port=check.port, local_endpoints=check.local_endpoints)
        try:
            for address in self._addresses:
                inst.sockets.append(_listen(address, check.port))
        except OSError as err:
            for sock in inst.sockets:
                sock.close()
            key = (ref, check.port)
            level = logging.DEBUG if key in self._failed else logging.ERROR
            self._failed.add(key)
            log.log(
                level,
                "cannot open health check port %d of service %s: %s",
                check.port,
                ref,
                err,
                extra={"service": str(ref), "port": check.port},
            )
            return None
        self._failed.discard((ref, check.port))
        for sock in inst.sockets:
            self._selector.register(sock, selectors.EVENT_READ, ref)
        self._services[ref] = inst
        log.info("opened health check port %d of service %s", check.port, ref)
        return inst

    def _close(self, ref: Ref) -> None:
        inst = self._services.pop(ref)
        for sock in inst.sockets:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        log.info("closed health check port %d of service %s", inst.port, ref)

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stopped.is_set():
            self._thread = threading.Thread(target=self._serve, name="svc-health", daemon=True)
            self._thread.start()

    # -- serving ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                events = self._selector.select(timeout=1.0)
            except (OSError, ValueError):
                if self._stopped.is_set():
                    return
                raise
            for key, _ in events:
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
                    continue
                try:
                    conn, peer = key.fileobj.accept()  # type: ignore[union-attr]
                except OSError:
                    continue  # closed meanwhile, or another accept won the connection
                threading.Thread(
                    target=self._answer, args=(conn, peer, key.data), daemon=True
                ).start()

    def _answer(self, conn: socket.socket, peer: object, ref: Ref) -> None:
        conn.setblocking(True)
        conn.settimeout(REQUEST_TIMEOUT)
        with contextlib.suppress(OSError), conn:
            # the handler only reads `.owner` and `.ref` from what http.server calls its server
            _Handler(conn, peer, _Context(self, ref))  # type: ignore[arg-type]

    def respond(self, ref: Ref) -> tuple[int, bytes]:
        """Status and body for a request to `ref`'s health check."""
        with self._lock:
            inst = self._services.get(ref)
            count = inst.local_endpoints if inst is not None else 0
        healthy = bool(self._proxy_healthy())
        status = 200 if count and healthy else 503
        return status, render_body(ref, count, healthy)


@dataclass(frozen=True, slots=True)
class _Context:
    """What a request handler needs (passed where http.server expects its server object)."""

    owner: ServiceHealthServer
    ref: Ref


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kproxy"
    sys_version = ""
    server: _Context  # type: ignore[assignment]

    def _reply(self, *, with_body: bool) -> None:
        status, body = self.server.owner.respond(self.server.ref)
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(with_body=True)

    def do_POST(self) -> None:
        self._reply(with_body=True)

    def do_HEAD(self) -> None:
        self._reply(with_body=False)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _bind_addresses(bind_ip: str | Sequence[str]) -> tuple[str, ...]:
    addresses: Iterable[str] = [bind_ip] if isinstance(bind_ip, str) else bind_ip
    out = tuple(dict.fromkeys(a.strip().strip("[]") for a in addresses))
    if not out or "" in out or "0.0.0.0" in out or "::" in out:
        return ("",)
    return out


def _listen(address: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket; "" means every address (dual-stack if possible)."""
    if address:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        bind: str = address
    else:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            bind = "::"
        except OSError:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            bind = "0.0.0.0"
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
