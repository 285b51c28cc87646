"""kube-proxy's health contract: /healthz and /livez, plus the /metrics endpoint.

`HealthState` follows kube-proxy's proxier health server: kproxy is healthy when no change is
queued, or the oldest queued change has waited less than `timeout` (2x the sync period). /healthz
is additionally unhealthy while this node is being deleted (so load balancers drain it); /livez
ignores that. Bodies are kube-proxy's JSON: lastUpdated, currentTime (and nodeEligible), plus
`unbound` ({"metrics 127.0.0.1:10249": "address already in use"}) while a listener of the agent
cannot bind its port; that alone does not make the proxy unhealthy (kproxy.runtime.listeners).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("kproxy.health")


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class HealthState:
    def __init__(
        self,
        *,
        timeout: float,
        clock: Callable[[], float] = time.time,
        unbound: Callable[[], dict[str, str]] = dict,
    ) -> None:
        self._lock = threading.Lock()
        self._unbound = unbound
        self._clock = clock
        self.timeout = timeout
        self.last_updated = 0.0
        self.oldest_queued = 0.0
        self.node_deleting = False

    def queued(self) -> None:
        with self._lock:
            if not self.oldest_queued:
                self.oldest_queued = self._clock()

    def updated(self) -> None:
        with self._lock:
            self.oldest_queued = 0.0
            self.last_updated = self._clock()

    def healthy(self) -> bool:
        with self._lock:
            return not self.oldest_queued or self._clock() < self.oldest_queued + self.timeout

    def body(self, *, with_node: bool) -> tuple[int, dict[str, object]]:
        healthy = self.healthy()
        now = self._clock()
        payload: dict[str, object] = {
            "lastUpdated": _rfc3339(self.last_updated) if self.last_updated else "",
            "currentTime": _rfc3339(now),
        }
        if with_node:
            payload["nodeEligible"] = not self.node_deleting
            healthy = healthy and not self.node_deleting
        unbound = self._unbound()
        if unbound:
            payload["unbound"] = unbound
        return (200 if healthy else 503), payload


Route = Callable[[], tuple[int, str, bytes]]


class HTTPEndpoint:
    """A small threaded HTTP server serving a fixed set of GET routes."""

    def __init__(self, address: str, routes: dict[str, Route], *, name: str) -> None:
        host, _, port = address.rpartition(":")
        self.name = name
        self._routes = routes
        handler = self._handler()
        self._server = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"http-{name}", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        routes = self._routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    status, ctype, body = 404, "text/plain", b"404 page not found\n"
                else:
                    status, ctype, body = route()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s %s", self.address_string(), format % args)

        return Handler

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        stop_serving(self._server)


def stop_serving(server: socketserver.TCPServer) -> None:
    """End `server`'s serve_forever loop (running in another thread) and close it. The loop
    notices a shutdown request only when its poll (every 0.5 s) returns: shutting the listening
    socket down makes the poll return at once."""
    stopper = threading.Thread(target=server.shutdown, name="stop-serving")
    stopper.start()
    with contextlib.suppress(OSError):
        server.socket.shutdown(socket.SHUT_RDWR)
    stopper.join()
    server.server_close()


def health_routes(state: HealthState) -> dict[str, Route]:
    def respond(with_node: bool) -> tuple[int, str, bytes]:
        status, payload = state.body(with_node=with_node)
        return status, "application/json", json.dumps(payload).encode()

    return {"/healthz": lambda: respond(True), "/livez": lambda: respond(False)}
