"""A real HTTP server speaking the Kubernetes list/watch protocol, for tests; also the writes
kproxy makes (Service status patches, Lease create/replace; see `FakeApiServer.write`).

The official `kubernetes` client reaches it through a kubeconfig (`write_kubeconfig`) or a plain
URL (`url`, with `token=None`). Nothing is mocked: requests cross a real TCP socket, watch streams
are chunked HTTP/1.1 responses of JSON lines, exactly what the apiserver sends.

Semantics kept from the apiserver:
- one global, monotonically increasing resourceVersion (like etcd's revision);
- list: `{kind: XList, apiVersion, metadata: {resourceVersion}, items}`; `limit`/`continue`
  paging over a snapshot; an unknown or expired continue token is 410 Expired;
- watch: events after the given resourceVersion, then blocks for new ones until `timeoutSeconds`;
  `resourceVersion` "" or "0" starts with synthetic ADDED events for the current objects;
- an event history window: watching from a resourceVersion older than the window yields an
  ERROR event carrying a Status with code 410 (reason Expired, "too old resource version");
- BOOKMARK events (only with `allowWatchBookmarks=true`), periodically and on `send_bookmarks()`;
- field selectors (`metadata.name`, `metadata.namespace`) and label selectors (=, ==, !=, exists).

Test controls (Python methods, thread-safe): `upsert`, `delete`, `compact`, `close_watches`,
`send_bookmarks`, `fail_next`, `stop`/`start` (unreachable, then back on the same port), and
request counters (`requests`, `lists`, `watches`, keyed by URL path).

`netns=` creates the listening socket inside a named network namespace (the server still runs
in the test process), so an agent started in that namespace reaches it on its loopback.

Also here: `RecordingSink` (a Sink that records calls and keeps state), `wait_until`, and the
pytest fixtures `fake_apiserver` and `fake_kubeconfig`. The fixture functions are named
`*_fixture` (with `name=`) so that importing them into a test module or conftest.py does not
shadow the fixture arguments (ruff F811):
`from tests.support.fakeapi import fake_apiserver_fixture, fake_kubeconfig_fixture  # noqa: F401`
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import itertools
import json
import os
import re
import select
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

RawObject = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    kind: str
    prefix: str
    plural: str
    namespaced: bool
    api_version: str


RESOURCES = {
    "Service": Resource("Service", "/api/v1", "services", True, "v1"),
    "EndpointSlice": Resource(
        "EndpointSlice",
        "/apis/discovery.k8s.io/v1",
        "endpointslices",
        True,
        "discovery.k8s.io/v1",
    ),
    "Node": Resource("Node", "/api/v1", "nodes", False, "v1"),
    "Lease": Resource(
        "Lease", "/apis/coordination.k8s.io/v1", "leases", True, "coordination.k8s.io/v1"
    ),
}
_BY_PATH = {(r.prefix, r.plural): r for r in RESOURCES.values()}
_ROUTE = re.compile(
    r"^(?P<prefix>/api/v1|/apis/discovery\.k8s\.io/v1|/apis/coordination\.k8s\.io/v1)"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?"
    r"(?:/(?P<sub>status))?$"
)
_GROUPS = ("discovery.k8s.io/v1", "coordination.k8s.io/v1")
_TRUE = ("true", "True", "1")


def status_obj(code: int, reason: str, message: str) -> RawObject:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    kind: str
    namespace: str
    name: str
    labels: dict[str, str]
    data: bytes  # the object's JSON


def _parse_selector(text: str) -> list[tuple[str, str, str | None]]:
    """'a=b,c!=d,e,!f' -> [(key, op, value)] with op in = != exists !exists."""
    terms: list[tuple[str, str, str | None]] = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in raw:
            key, value = raw.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "=" in raw:
            key, value = raw.replace("==", "=").split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif raw.startswith("!"):
            terms.append((raw[1:].strip(), "!exists", None))
        else:
            terms.append((raw, "exists", None))
    return terms


def _matches(terms: list[tuple[str, str, str | None]], values: dict[str, str]) -> bool:
    for key, op, value in terms:
        have = values.get(key)
        if (
            (op == "=" and have != value)
            or (op == "!=" and have == value)
            or (op == "exists" and have is None)
            or (op == "!exists" and have is not None)
        ):
            return False
    return True


@dataclass(frozen=True)
class _Query:
    resource: Resource
    namespace: str | None
    fields: list[tuple[str, str, str | None]]
    labels: list[tuple[str, str, str | None]]

    def matches(self, kind: str, namespace: str, name: str, labels: dict[str, str]) -> bool:
        if kind != self.resource.kind:
            return False
        if self.namespace is not None and namespace != self.namespace:
            return False
        fields = {"metadata.name": name, "metadata.namespace": namespace}
        return _matches(self.fields, fields) and _matches(self.labels, labels)


def _setns(netns: str) -> None:
    path = netns if "/" in netns else f"/run/netns/{netns}"
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeApiServer


class FakeApiServer:
    """The fake apiserver; see the module docstring. Not started until `start()`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = "kproxy-test-token",
        history_limit: int = 10_000,
        bookmark_interval: float = 10.0,
        netns: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self.netns = netns
        #: when True, a too-old watch is answered with HTTP 410 instead of an ERROR event
        self.expired_as_http_status = False
        self._cond = threading.Condition()
        self._rv = 1
        self._floor = 0  # a watch from a resourceVersion below this is 410 Gone
        self._objects: dict[tuple[str, str, str], RawObject] = {}
        self._history: list[_Event] = []  # replaced (never edited in place) when trimmed
        self._watch_gen = 0
        self._bookmark_gen = 0
        self._continues: dict[str, tuple[int, list[RawObject], _Query]] = {}
        self._failures: list[int] = []
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._tokens = itertools.count(1)
        self._active: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.lists: Counter[str] = Counter()
        self.watches: Counter[str] = Counter()
        #: (method, kind, subresource) -> accepted writes
        self.writes: Counter[tuple[str, str, str]] = Counter()
        self.request_log: list[tuple[str, dict[str, str]]] = []

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen (again) on the same host and port, and serve in a background thread."""
        if self._server is not None:
            return

        def create() -> _HTTPServer:  # a socket belongs to the netns it is created in
            if self.netns:
                _setns(self.netns)
            server = _HTTPServer((self.host, self.port), _Handler)
            server.fake = self
            return server

        if self.netns:  # setns changes only the calling thread: use a throwaway one
            made: list[_HTTPServer | BaseException] = []

            def run() -> None:
                try:
                    made.append(create())
                except BaseException as err:
                    made.append(err)

            helper = threading.Thread(target=run)
            helper.start()
            helper.join()
            if isinstance(made[0], BaseException):
                raise made[0]
            server = made[0]
        else:
            server = create()
        self.port = server.server_address[1]
        with self._cond:
            self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and drop every open connection (clients see the server vanish)."""
        with self._cond:
            server, self._server = self._server, None
            conns = list(self._conns)
            self._cond.notify_all()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    # -- object store ----------------------------------------------------------------------
    def _record(self, event_type: str, obj: RawObject) -> None:
        meta = obj["metadata"]
        event = _Event(
            rv=self._rv,
            type=event_type,
            kind=obj["kind"],
            namespace=meta.get("namespace", ""),
            name=meta["name"],
            labels=dict(meta.get("labels") or {}),
            data=json.dumps(obj, separators=(",", ":")).encode(),
        )
        self._history.append(event)
        limit = max(self.history_limit, 0)
        if len(self._history) > limit:  # the window is exact; the list is trimmed lazily
            self._floor = max(self._floor, self._history[len(self._history) - limit - 1].rv)
        if len(self._history) > 2 * limit:
            # a new list: running watchers finish reading the old one first
            self._history = self._history[len(self._history) - limit :]
        self._cond.notify_all()

    def upsert(self, obj: RawObject) -> RawObject:
        """Create or update an object (kind from obj["kind"]); returns the stored copy."""
        stored = self._copy(obj)
        res = RESOURCES[stored["kind"]]
        stored.setdefault("apiVersion", res.api_version)
        meta = stored.setdefault("metadata", {})
        if res.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (res.kind, meta.get("namespace", ""), meta["name"])
        with self._cond:
            old = self._objects.get(key)
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            if old is not None:
                meta["uid"] = old["metadata"]["uid"]
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            else:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault(
                    "creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                )
            self._objects[key] = stored
            self._record("MODIFIED" if old is not None else "ADDED", stored)
        return self._copy(stored)

    def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Delete an object; False when it did not exist."""
        ns = (namespace or "default") if RESOURCES[kind].namespaced else ""
        with self._cond:
            old = self._objects.pop((kind, ns, name), None)
            if old is None:
                return False
            self._rv += 1
            gone = self._copy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record("DELETED", gone)
        return True

    def get(self, kind: str, namespace: str | None, name: str) -> RawObject | None:
        ns = (namespace or "default") if RESOURCES[kind].namespaced else ""
        with self._cond:
            obj = self._objects.get((kind, ns, name))
            return None if obj is None else self._copy(obj)

    def write(
        self,
        method: str,
        kind: str,
        namespace: str | None,
        name: str | None,
        body: RawObject,
        *,
        subresource: str = "",
        content_type: str = "",
    ) -> tuple[int, RawObject]:
        """A client's write, with the apiserver's answers: POST creates (409 AlreadyExists),
        PUT replaces (404 NotFound, 409 Conflict when metadata.resourceVersion is stale), PATCH
        merges (RFC 7386 merge patch; strategic merge is treated alike - the fields kproxy
        patches are atomic lists) with the same resourceVersion precondition. On the `status`
        subresource only .status changes, as the apiserver keeps the spec."""
        res = RESOURCES[kind]
        ns = (namespace or "default") if res.namespaced else ""
        if "json-patch" in content_type:
            return 415, status_obj(415, "UnsupportedMediaType", "JSON patch is not supported")
        if not isinstance(body, dict):
            return 400, status_obj(400, "BadRequest", "the body must be an object")
        name = name or str((body.get("metadata") or {}).get("name") or "")
        if not name:
            return 422, status_obj(422, "Invalid", "metadata.name is required")
        key = (kind, ns, name)
        with self._cond:
            old = self._objects.get(key)
            if method == "POST":
                if old is not None:
                    return 409, status_obj(409, "AlreadyExists", f'{res.plural} "{name}" exists')
                new = self._copy(body)
            else:
                if old is None:
                    return 404, status_obj(404, "NotFound", f'{res.plural} "{name}" not found')
                wanted_rv = str((body.get("metadata") or {}).get("resourceVersion") or "")
                if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
                    msg = (
                        f'Operation cannot be fulfilled on {res.plural} "{name}": the object '
                        "has been modified; please apply your changes to the latest version"
                    )
                    return 409, status_obj(409, "Conflict", msg)
                new = _merge_patch(self._copy(old), body) if method == "PATCH" else self._copy(body)
                if subresource == "status":
                    kept = self._copy(old)
                    kept["status"] = new.get("status") or {}
                    new = kept
            new["kind"] = kind
            new["apiVersion"] = res.api_version
            new.setdefault("metadata", {})["name"] = name
            if res.namespaced:
                new["metadata"]["namespace"] = ns
            self.writes[(method, kind, subresource)] += 1
        return (201 if method == "POST" else 200), self.upsert(new)

    def objects(self, kind: str) -> list[RawObject]:
        """Copies of every stored object of `kind`, sorted by namespace and name."""
        with self._cond:
            return [self._copy(o) for (k, _, _), o in sorted(self._objects.items()) if k == kind]

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    @property
    def floor(self) -> int:
        """Watches from a resourceVersion below this get 410 Gone."""
        with self._cond:
            return self._floor

    # -- test controls ---------------------------------------------------------------------
    def compact(self) -> None:
        """Drop the event history (and continue tokens), as etcd compaction does.

        The revision moves on (an unrelated write), so every client that resumes a watch from a
        resourceVersion it saw before gets 410 Gone and has to list again. Streams already open
        keep running and lose nothing.
        """
        with self._cond:
            self._rv += 1
            self._floor = self._rv
            self._history = []
            self._continues.clear()
            self._cond.notify_all()

    def close_watches(self) -> None:
        """End every open watch stream normally (as the apiserver does at timeoutSeconds)."""
        with self._cond:
            self._watch_gen += 1
            self._cond.notify_all()

    def send_bookmarks(self) -> None:
        """Make every open watch that allows bookmarks send one (after its pending events)."""
        with self._cond:
            self._bookmark_gen += 1
            self._cond.notify_all()

    def fail_next(self, count: int, code: int = 500) -> None:
        """Answer the next `count` API requests (not /version or discovery) with `code`."""
        with self._cond:
            self._failures.extend([code] * count)

    def open_watches(self, path: str | None = None) -> int:
        """How many watch streams are open now (on `path`, or on any)."""
        with self._cond:
            if path is None:
                return sum(self._active.values())
            return self._active[path]

    def write_kubeconfig(self, path: str) -> str:
        """Write a kubeconfig pointing at this server (bearer token when set); returns path."""
        user: RawObject = {"token": self.token} if self.token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        with open(path, "w") as fh:
            json.dump(config, fh, indent=2)
        return path

    # -- serving (called by _Handler threads) ------------------------------------------------
    @staticmethod
    def _copy(obj: RawObject) -> RawObject:
        copied: RawObject = json.loads(json.dumps(obj))
        return copied

    def _take_failure(self) -> int | None:
        with self._cond:
            return self._failures.pop(0) if self._failures else None

    def _list(self, query: _Query, limit: int, token: str) -> tuple[int, RawObject]:
        with self._cond:
            if token:
                entry = self._continues.pop(token, None)
                if entry is None:
                    return 410, status_obj(410, "Expired", "the continue token has expired")
                rv, items, query = entry
            else:
                rv = self._rv
                items = [
                    o
                    for (kind, ns, name), o in sorted(self._objects.items())
                    if query.matches(kind, ns, name, o["metadata"].get("labels") or {})
                ]
            meta: RawObject = {"resourceVersion": str(rv)}
            if limit and len(items) > limit:
                next_token = f"c{next(self._tokens)}"
                self._continues[next_token] = (rv, items[limit:], query)
                items = items[:limit]
                meta["continue"] = next_token
                meta["remainingItemCount"] = len(self._continues[next_token][1])
        res = query.resource
        return 200, {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": meta,
            "items": items,
        }

    def _bookmark(self, res: Resource, rv: int) -> bytes:
        obj = {
            "kind": res.kind,
            "apiVersion": res.api_version,
            "metadata": {"resourceVersion": str(rv)},
        }
        return json.dumps({"type": "BOOKMARK", "object": obj}).encode()

    def _watch(
        self,
        query: _Query,
        *,
        start: int | None,
        bookmarks: bool,
        deadline: float,
        begin: Callable[[], None],
        write: Callable[[bytes], None],
        alive: Callable[[], bool],
        path: str,
    ) -> None:
        """Stream events to `write(line_bytes)` until deadline, close_watches() or stop().

        The starting point is fixed (and the watch counted in `open_watches`) before `begin()`
        sends the response headers, so a client that saw the headers cannot miss an event.
        """
        with self._cond:
            self._active[path] += 1
        try:
            self._stream(
                query,
                start=start,
                bookmarks=bookmarks,
                deadline=deadline,
                begin=begin,
                write=write,
                alive=alive,
            )
        finally:
            with self._cond:
                self._active[path] -= 1

    def _stream(
        self,
        query: _Query,
        *,
        start: int | None,
        bookmarks: bool,
        deadline: float,
        begin: Callable[[], None],
        write: Callable[[bytes], None],
        alive: Callable[[], bool],
    ) -> None:
        res = query.resource
        with self._cond:
            gen, bm_gen = self._watch_gen, self._bookmark_gen
            history = self._history
            if start is None:  # "" or "0": synthetic ADDED for what exists now
                pos = self._rv
                initial = [
                    json.dumps({"type": "ADDED", "object": o}).encode()
                    for (kind, ns, name), o in sorted(self._objects.items())
                    if query.matches(kind, ns, name, o["metadata"].get("labels") or {})
                ]
            elif start < self._floor:
                msg = f"too old resource version: {start} ({self._floor})"
                error = {"type": "ERROR", "object": status_obj(410, "Expired", msg)}
                initial, pos = [json.dumps(error).encode()], -1
            else:
                pos, initial = start, []
        begin()
        for data in initial:
            write(data)
        if pos < 0:
            return
        next_bookmark = time.monotonic() + self.bookmark_interval
        while True:
            lines: list[bytes] = []
            with self._cond:
                while not lines:
                    now = time.monotonic()
                    if self._server is None or self._watch_gen != gen or now >= deadline:
                        return
                    if history is not self._history and (not history or history[-1].rv <= pos):
                        history = self._history  # drained the old list: move to the new one
                    first = bisect.bisect_right(history, pos, key=lambda e: e.rv)
                    pending = history[first : first + 1000]
                    if pending:
                        pos = pending[-1].rv
                        lines = [
                            b'{"type":"%s","object":%s}' % (e.type.encode(), e.data)
                            for e in pending
                            if query.matches(e.kind, e.namespace, e.name, e.labels)
                        ]
                        continue
                    if history is self._history:
                        pos = max(pos, self._rv)  # caught up with everything, incl. compactions
                    if bookmarks and (self._bookmark_gen != bm_gen or now >= next_bookmark):
                        bm_gen = self._bookmark_gen
                        next_bookmark = now + self.bookmark_interval
                        lines = [self._bookmark(res, pos)]
                        break
                    if not alive():
                        return
                    self._cond.wait(min(deadline - now, max(next_bookmark - now, 0.01), 0.2))
            for data in lines:
                write(data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.fake._cond:
            self.server.fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.server.fake._cond:
            self.server.fake._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send_json(self, code: int, obj: RawObject) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _begin_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _client_connected(self) -> bool:
        """False once the client closed its side (as the apiserver notices a gone watcher)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def _chunk(self, data: bytes) -> None:
        data += b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        watch = query.get("watch") in _TRUE
        with fake._cond:
            fake.requests[path] += 1
            (fake.watches if watch else fake.lists)[path] += 1
            fake.request_log.append((path, query))
        try:
            self._serve(fake, path, query, watch)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_POST(self) -> None:
        self._write("POST")

    def do_PUT(self) -> None:
        self._write("PUT")

    def do_PATCH(self) -> None:
        self._write("PATCH")

    def _write(self, method: str) -> None:
        fake = self.server.fake
        path = urlsplit(self.path).path.rstrip("/") or "/"
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        with fake._cond:
            fake.requests[path] += 1
            fake.request_log.append((path, {"method": method}))
        if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
            self._send_json(401, status_obj(401, "Unauthorized", "Unauthorized"))
            return
        match = _ROUTE.match(path)
        res = _BY_PATH.get((match["prefix"], match["plural"])) if match else None
        if match is None or res is None or (match["ns"] and not res.namespaced):
            self._send_json(404, status_obj(404, "NotFound", f"the server could not find {path}"))
            return
        if (method == "POST") == bool(match["name"]):
            self._send_json(405, status_obj(405, "MethodNotAllowed", f"{method} {path}"))
            return
        failure = fake._take_failure()
        if failure is not None:
            self._send_json(failure, status_obj(failure, "InternalError", "injected failure"))
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send_json(400, status_obj(400, "BadRequest", "the body is not JSON"))
            return
        code, obj = fake.write(
            method,
            res.kind,
            match["ns"],
            match["name"],
            body,
            subresource=match["sub"] or "",
            content_type=self.headers.get("Content-Type", ""),
        )
        self._send_json(code, obj)

    def _serve(self, fake: FakeApiServer, path: str, query: dict[str, str], watch: bool) -> None:
        if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
            self._send_json(401, status_obj(401, "Unauthorized", "Unauthorized"))
            return
        if path == "/version":
            self._send_json(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake"})
            return
        if path in ("/api", "/apis", "/api/v1") or path[len("/apis/") :] in _GROUPS:
            self._send_json(200, _discovery(path, f"{fake.host}:{fake.port}"))
            return
        match = _ROUTE.match(path)
        res = _BY_PATH.get((match["prefix"], match["plural"])) if match else None
        if match is None or res is None or (match["ns"] and not res.namespaced):
            self._send_json(404, status_obj(404, "NotFound", f"the server could not find {path}"))
            return
        failure = fake._take_failure()
        if failure is not None:
            self._send_json(failure, status_obj(failure, "InternalError", "injected failure"))
            return
        if match["name"]:
            obj = fake.get(res.kind, match["ns"], match["name"])
            if obj is None:
                self._send_json(404, status_obj(404, "NotFound", f"{match['name']} not found"))
            else:
                self._send_json(200, obj)
            return
        q = _Query(
            res,
            match["ns"],
            _parse_selector(query.get("fieldSelector", "")),
            _parse_selector(query.get("labelSelector", "")),
        )
        if not watch:
            code, body = fake._list(q, int(query.get("limit") or 0), query.get("continue", ""))
            self._send_json(code, body)
            return
        raw_rv = query.get("resourceVersion", "")
        if raw_rv not in ("", "0") and not raw_rv.isdigit():
            self._send_json(400, status_obj(400, "BadRequest", f"invalid resourceVersion {raw_rv}"))
            return
        start = int(raw_rv) if raw_rv not in ("", "0") else None
        floor = fake.floor
        if fake.expired_as_http_status and start is not None and start < floor:
            msg = f"too old resource version: {start} ({floor})"
            self._send_json(410, status_obj(410, "Expired", msg))
            return
        timeout = float(query.get("timeoutSeconds") or 1800)
        fake._watch(
            q,
            start=start,
            bookmarks=query.get("allowWatchBookmarks") in _TRUE,
            deadline=time.monotonic() + timeout,
            begin=self._begin_stream,
            write=self._chunk,
            alive=self._client_connected,
            path=path,
        )
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        # Like the apiserver, keep the connection for the next request after a stream ended
        # (a client that reuses it must not hit a closing socket); drop it when stopping.
        self.close_connection = not fake.running or not self._client_connected()


def _discovery(path: str, address: str) -> RawObject:
    if path == "/api":
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
        }
    if path == "/apis":
        groups = []
        for gv in _GROUPS:
            version = {"groupVersion": gv, "version": "v1"}
            groups.append(
                {"name": gv.split("/")[0], "versions": [version], "preferredVersion": version}
            )
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    group_version = "v1" if path == "/api/v1" else path[len("/apis/") :]
    resources = [
        {
            "name": r.plural,
            "singularName": r.kind.lower(),
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["get", "list", "watch", "create", "update", "patch"],
        }
        for r in RESOURCES.values()
        if r.api_version == group_version
    ]
    return {"kind": "APIResourceList", "groupVersion": group_version, "resources": resources}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge_patch(target.get(key), value)
    return target


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, step: float = 0.01) -> bool:
    """Poll `predicate` until it is truthy or `timeout` passes; returns its last truthiness."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


class RecordingSink:
    """A `kproxy.kube.sink.Sink` that records every call and keeps the resulting state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[str, str, Any]] = []  # ("replace", kind, [refs]) / (type, kind, ref)
        self.state: dict[str, dict[str, RawObject]] = {k: {} for k in RESOURCES}

    @staticmethod
    def ref(obj: RawObject) -> str:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace")
        return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))

    def replace(self, kind: str, objects: Iterable[RawObject]) -> None:
        objects = list(objects)  # read once (the API source decodes pages as they are read)
        with self._lock:
            self.calls.append(("replace", kind, sorted(self.ref(o) for o in objects)))
            self.state[kind] = {self.ref(o): o for o in objects}

    def apply(self, kind: str, event_type: str, obj: RawObject) -> None:
        with self._lock:
            self.calls.append((event_type, kind, self.ref(obj)))
            if event_type == "DELETED":
                self.state[kind].pop(self.ref(obj), None)
            else:
                self.state[kind][self.ref(obj)] = obj

    def names(self, kind: str) -> set[str]:
        with self._lock:
            return set(self.state[kind])

    def get(self, kind: str, ref: str) -> RawObject | None:
        with self._lock:
            return self.state[kind].get(ref)

    def replaces(self, kind: str) -> list[list[str]]:
        """The refs of every `replace` of `kind`, in call order."""
        with self._lock:
            return [list(c[2]) for c in self.calls if c[0] == "replace" and c[1] == kind]

    def events(self, kind: str) -> list[tuple[str, str]]:
        """(event type, ref) of every `apply` of `kind`, in call order."""
        with self._lock:
            return [(c[0], c[2]) for c in self.calls if c[0] != "replace" and c[1] == kind]


@pytest.fixture(name="fake_apiserver")
def fake_apiserver_fixture() -> Iterator[FakeApiServer]:
    """A started FakeApiServer on 127.0.0.1 (random port), stopped after the test."""
    server = FakeApiServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="fake_kubeconfig")
def fake_kubeconfig_fixture(fake_apiserver: FakeApiServer, tmp_path: Any) -> str:
    """Path of a kubeconfig for `fake_apiserver`."""
    return fake_apiserver.write_kubeconfig(str(tmp_path / "kubeconfig"))
