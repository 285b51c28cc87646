"""The running agent's inspection endpoint: a root-only unix socket serving its wanted state.

`kproxy status` and `kproxy explain` need what the agent syncs (the Services/EndpointSlices/Node
snapshot it handed to the dataplane) and the settings it runs with (mode, node name, cluster CIDRs,
masquerade bit, node addresses...). Instead of making the user repeat every `kproxy run` flag,
the agent serves them here, and the commands read this socket by default.

Why a unix socket and not kube-proxy's /configz on the metrics port: the state holds every
Service and endpoint of the cluster, and the metrics port is often bound to 0.0.0.0 for
Prometheus; a socket file in a root-only directory (/run/kproxy 0700, socket 0600) is readable
by root only, is never on the network, and needs no port (it cannot clash with kube-proxy).
The settings alone, which kube-proxy does publish, are also on /configz of the metrics port.

One socket per network namespace: kproxy programs the namespace it runs in, so the name follows
it: /run/kproxy/kproxy.sock in the host's namespace, /run/kproxy/netns-NAME.sock inside a
namespace made by `ip netns add NAME` (labs, tests). The document carries the namespace's inode
so a command can tell it reached the agent of its own namespace.

HTTP/1.0 over the socket (`curl --unix-socket /run/kproxy/kproxy.sock http://kproxy/v1/state`):
GET /v1/state (versioned JSON, built on request: nothing is precomputed per sync) and
GET /v1/settings.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kproxy
from kproxy.config import Settings
from kproxy.inspect.socketpath import STATE_VERSION, netns_inode
from kproxy.model.codec import encode, encode_snapshot, paused_gc
from kproxy.model.store import Snapshot
from kproxy.runtime.health import Route, stop_serving

if TYPE_CHECKING:
    from kproxy.runtime.dataplane import Plane

log = logging.getLogger("kproxy.inspect")

Document = Callable[[], dict[str, object]]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


class InspectServer:
    """Serves `routes` (path -> document builder) as JSON over a unix socket at `path`."""

    def __init__(self, path: Path, routes: dict[str, Document]) -> None:
        self.path = Path(path)
        self._routes = routes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (raises OSError, e.g. EADDRINUSE while another agent serves the same path)
        and serve in a thread."""
        self._prepare()
        server = _Server(str(self.path), self._handler(), bind_and_activate=False)
        try:
            server.server_bind()
            os.chmod(self.path, 0o600)
            server.server_activate()
        except OSError:
            server.server_close()
            raise
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="inspect-socket", daemon=True
        )
        self._thread.start()
        log.info("serving the wanted state for kproxy status/explain on %s", self.path)

    def _prepare(self) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(directory, 0o700)
        if not self.path.exists() and not self.path.is_symlink():
            return
        # a socket file left by an agent that died: remove it; a live one: refuse to steal it
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, "address already in use (another kproxy agent serves it)")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        routes = self._routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    status, body = 404, b'{"error": "not found"}\n'
                else:
                    try:
                        with paused_gc():
                            doc = json.dumps(route(), separators=(",", ":")).encode()
                        status, body = 200, doc
                    except Exception:
                        log.exception("building %s for the inspection socket failed", self.path)
                        status, body = 500, b'{"error": "internal error"}\n'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def address_string(self) -> str:
                return "unix"

            def log_message(self, format: str, *args: object) -> None:
                log.debug("inspect socket: %s", format % args)

        return Handler

    def stop(self) -> None:
        if self._server is None:
            return
        stop_serving(self._server)
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._server = None


# -- the documents -------------------------------------------------------------------------------
def state_route(
    *,
    settings: Settings,
    node_name: str,
    planes: Callable[[], Sequence[Plane]],
    wanted: Callable[[], tuple[Snapshot, float]],
    unbound: Callable[[], dict[str, str]],
    rejected: Callable[[], list[dict[str, object]]] = list,
) -> dict[str, Document]:
    """/v1/state and /v1/settings of the agent: built on each request from the objects the
    agent holds anyway (the snapshot is immutable, so no lock and no copy)."""

    def header() -> dict[str, object]:
        return {
            "version": STATE_VERSION,
            "kproxy": kproxy.__version__,
            "pid": os.getpid(),
            "netns": netns_inode(),
            "node_name": node_name,
            "mode": settings.proxy_mode,
            "settings": encode(settings),
            "planes": [{"family": p.family, "options": encode(p.options)} for p in planes()],
            "unbound": unbound(),
            "rejected": rejected(),  # services whose rules iptables refused (left out)
        }

    def state() -> dict[str, object]:
        doc = header()
        snapshot, synced_at = wanted()
        doc["synced_at"] = synced_at
        doc["snapshot"] = encode_snapshot(snapshot)
        return doc

    return {"/v1/state": state, "/v1/settings": header}


def _go_duration(seconds: float) -> str:
    """Seconds as Go's time.Duration prints them: 30s, 1m0s, 1h0m0s, 500ms."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    frac = seconds - whole
    text = f"{secs + frac:g}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def configz(settings: Settings) -> dict[str, object]:
    """kube-proxy's /configz body: {"kubeproxy.config.k8s.io": KubeProxyConfiguration} with the
    settings in effect (kproxy's own under "kproxy")."""
    from kproxy.config import API_VERSION, KIND, OPTIONS, parse_duration

    config: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND}
    for opt in OPTIONS:
        if not opt.file_path:
            continue
        value: Any = getattr(settings, opt.attr)
        if opt.parse is parse_duration:
            value = _go_duration(value)
        elif isinstance(value, tuple):
            value = list(value)
        where = config
        *parents, last = opt.file_path.split(".")
        for key in parents:
            where = where.setdefault(key, {})
        where[last] = value
    return {"kubeproxy.config.k8s.io": config}


def configz_route(settings: Settings) -> Route:
    body = json.dumps(configz(settings), indent=2).encode() + b"\n"
    return lambda: (200, "application/json", body)
