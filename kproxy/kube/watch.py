"""The Kubernetes API source: list+watch of Services, EndpointSlices and this node's Node.

One daemon thread per kind runs the reflector loop kube-proxy's informers run:

1. list (paged) and hand the complete set to `Sink.replace`; remember the list's resourceVersion;
2. watch from that resourceVersion with bookmarks and a jittered `timeoutSeconds`; every event
   goes to `Sink.apply`, and every event or BOOKMARK moves the remembered resourceVersion on;
3. when a stream ends, watch again from the remembered resourceVersion (no list);
4. on 410 Gone (an HTTP 410 or an ERROR event with code 410) list again (step 1);
5. on any other failure (refused, reset, timeout, 5xx, ...) wait a capped exponential backoff
   with jitter and resume from the remembered resourceVersion. The sink keeps the last known
   state meanwhile: an error never produces a `replace`, let alone an empty one.

Speed: requests go through the official client's `ApiClient` (its kubeconfig, auth, TLS and
REST layer) as raw GETs of the collection paths (`ListWatch`), the way the generated
`CoreV1Api`/`DiscoveryV1Api` methods issue them with `_preload_content=False`; responses are
parsed with `json.loads` into plain dicts. The client's generated model classes are never built,
nor even imported: the generated API modules import ~260 of them (22 MB of RSS).

Stopping: when the `stop` event is set, a closer thread shuts down the sockets of the responses
the watchers are reading, so the threads exit at once instead of at the next event or timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from kproxy.errors import KubeConfigError
from kproxy.kube.sink import RawObject, Sink

log = logging.getLogger("kproxy.kube")

LIST_PAGE_SIZE = 500
LIST_READ_TIMEOUT = 120.0
CONNECT_TIMEOUT = 5.0
MIN_WATCH_TIMEOUT = 300  # seconds; each watch asks for 1-2x this, as client-go's reflector does
SHORT_STREAM = 1.0  # streams this short and empty, twice in a row, are paced (no hot loop)
_API_VERSIONS = {
    "Service": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "Node": "v1",
    "Lease": "coordination.k8s.io/v1",  # kproxy.kube.lbapi
}


class _Gone(Exception):
    """The resourceVersion we hold has expired (410): list again."""


class _StatusError(Exception):
    """The server said something we cannot use (an ERROR event other than 410, bad JSON)."""


class _ContinueExpired(Exception):
    """The continue token of a paged list expired (410): list again, unpaged."""


class _SinkError(Exception):
    """The sink raised: a bug on the consumer's side. We list again after the backoff."""


def load_client_configuration(*, kubeconfig: str | None, master: str | None) -> Any:
    """A `kubernetes.client.Configuration`, resolved as kube-proxy (client-go) does.

    --kubeconfig (with --master overriding its server), else --master alone (no auth), else the
    in-cluster service account. (An explicit --master wins over the in-cluster account, as in
    client-go's BuildConfigFromFlags.)
    """
    cfg = client.Configuration()
    try:
        # each loader imported only when used: kube_config brings requests and oauthlib (~7 MB),
        # which the in-cluster account and --master do not need (kproxy/deferinit.py)
        if kubeconfig:
            from kubernetes.config.kube_config import load_kube_config

            load: Any = load_kube_config
            load(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
        elif not master:
            from kubernetes.config.incluster_config import load_incluster_config

            load = load_incluster_config
            load(client_configuration=cfg)
    except (ConfigException, OSError, ValueError, TypeError, KeyError) as err:
        where = kubeconfig or "the in-cluster service account"
        raise KubeConfigError(f"cannot load {where}: {err}") from err
    if master:
        cfg.host = master if "://" in master else f"http://{master}"
    cfg.retries = False  # the watch loop owns retries and backoff
    # Detect a silently dead apiserver within about a minute on idle watch streams.
    cfg.socket_options = [
        *urllib3.connection.HTTPConnection.default_socket_options,
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
    ]
    return cfg


class ListWatch:
    """The list/watch GET of one collection, raw: the response is the urllib3 response.

    Called with the generated methods' keywords (`limit`, `_continue`, `watch`,
    `resource_version`, `allow_watch_bookmarks`, `timeout_seconds`, `field_selector`,
    `_request_timeout`), it builds the request with `ApiClient.param_serialize` (host, default
    headers, the bearer token) and sends it with `ApiClient.call_api` (the REST layer), as the
    generated method does with `_preload_content=False`: a non-2xx answer raises `ApiException`.
    A client too old for `param_serialize` gets the generated API method (`fallback`).
    """

    _QUERY = {
        "allow_watch_bookmarks": "allowWatchBookmarks",
        "_continue": "continue",
        "field_selector": "fieldSelector",
        "limit": "limit",
        "resource_version": "resourceVersion",
        "timeout_seconds": "timeoutSeconds",
        "watch": "watch",
    }

    def __init__(
        self,
        api: Any,
        path: str,
        fallback: Callable[[], Callable[..., Any]],
        **fixed: Any,
    ) -> None:
        self._api = api
        self._path = path
        self._fixed = fixed
        self._fallback = fallback

    def __call__(self, *, _request_timeout: Any = None, **params: Any) -> Any:
        params.pop("_preload_content", None)  # always raw
        params = {**self._fixed, **params}
        if not hasattr(self._api, "param_serialize"):  # kubernetes < the pydantic generator
            call = self._fallback()
            return call(_preload_content=False, _request_timeout=_request_timeout, **params)
        query = [(self._QUERY[k], v) for k, v in params.items() if v is not None]
        request = self._api.param_serialize(
            method="GET",
            resource_path=self._path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        resp = self._api.call_api(*request, _request_timeout=_request_timeout)
        if not 200 <= resp.status <= 299:
            resp.read()
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        return resp.response


def list_watch_calls(api: Any, node_name: str) -> dict[str, ListWatch]:
    """The list/watch call of each kind kproxy follows (Node: only this node's)."""

    def core() -> Any:
        return client.CoreV1Api(api)

    return {
        "Service": ListWatch(
            api, "/api/v1/services", lambda: core().list_service_for_all_namespaces
        ),
        "EndpointSlice": ListWatch(
            api,
            "/apis/discovery.k8s.io/v1/endpointslices",
            lambda: client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
        ),
        "Node": ListWatch(
            api,
            "/api/v1/nodes",
            lambda: core().list_node,
            field_selector=f"metadata.name={node_name}",
        ),
    }


@dataclass
class KindStatus:
    """What one kind's watcher has done, for status pages and metrics."""

    kind: str
    synced: bool = False
    resource_version: str = ""
    lists: int = 0
    watches: int = 0
    events: int = 0
    errors: int = 0
    last_error: str = ""


def _interrupt(resp: Any) -> None:
    """Unblock a thread reading `resp` (a urllib3 response) by shutting its socket down."""
    try:
        resp.shutdown()  # urllib3 >= 2.3
        return
    except Exception:
        pass
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a byte stream into non-empty lines (one JSON watch event each)."""
    pending: list[bytes] = []
    for chunk in chunks:
        pending.append(chunk)
        if b"\n" not in chunk:
            continue
        parts = b"".join(pending).split(b"\n")
        pending = [parts.pop()]
        yield from (p for p in parts if p.strip())
    rest = b"".join(pending)
    if rest.strip():
        yield rest


def _status_text(status: Any) -> str:
    if not isinstance(status, dict):
        return repr(status)
    return f"{status.get('code')} {status.get('reason')}: {status.get('message')}"


class _Pages:
    """The items of one (paged) list, fetched page by page while they are iterated.

    Iterating yields each item once, dropping the page's references as it goes; a failure to
    fetch a page is remembered in `error` and raised from the iteration. `done` is set once the
    last page was read, `resource_version` then holds the list's.
    """

    def __init__(self, watcher: _Watcher, limit: int | None) -> None:
        self._watcher = watcher
        self._limit = limit
        self.error: BaseException | None = None
        self.done = False
        self.count = 0
        self.resource_version = ""

    def __iter__(self) -> Iterator[RawObject]:
        kind = self._watcher.kind
        api_version = _API_VERSIONS[kind]
        token: str | None = None
        while True:
            try:
                page = self._watcher.fetch_page(self._limit, token)
            except BaseException as err:
                self.error = err
                raise
            items: list[RawObject] = page["items"]
            meta = page.get("metadata") or {}
            del page
            token = meta.get("continue") or None
            items.reverse()
            while items:
                item = items.pop()
                if isinstance(item, dict):
                    item.setdefault("kind", kind)
                    item.setdefault("apiVersion", api_version)
                self.count += 1
                yield item
            if token is None:
                self.resource_version = str(meta.get("resourceVersion") or "")
                self.done = True
                return


class _Watcher:
    """The list/watch loop of one kind, in its own thread."""

    def __init__(
        self,
        *,
        kind: str,
        call: Callable[..., Any],
        sink: Sink,
        stop: threading.Event,
        backoff_initial: float,
        backoff_max: float,
    ) -> None:
        self.kind = kind
        self._call = call
        self._sink = sink
        self._stop = stop
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self.status = KindStatus(kind)
        self._failures = 0
        self._short_streams = 0
        self._rv: str | None = None  # None: list before watching
        self.synced = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None
        self.thread = threading.Thread(target=self._run, name=f"kproxy-watch-{kind}", daemon=True)

    # -- stopping --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reading(self, resp: Any, *, reuse: bool) -> Iterator[Any]:
        """Make `resp` interruptible by `stop` while the caller reads it.

        The connection goes back to the pool only when `reuse` and the body was read without
        error; a watch stream or a failed read closes it (it may hold unread bytes).
        """
        with self._lock:
            self._response = resp
        if self._stop.is_set():
            _interrupt(resp)
        ok = False
        try:
            yield resp
            ok = True
        finally:
            with self._lock:
                self._response = None
            if not (ok and reuse):
                with contextlib.suppress(Exception):
                    resp.close()
            resp.release_conn()

    def interrupt(self) -> None:
        with self._lock:
            resp = self._response
        if resp is not None:
            _interrupt(resp)

    # -- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._rv is None:
                    self._list()
                started = time.monotonic()
                events = self._watch()
                self._failures = 0
                if events == 0 and time.monotonic() - started < SHORT_STREAM:
                    self._short_stream()
                else:
                    self._short_streams = 0
                log.debug("%s: watch ended; resuming at resourceVersion %s", self.kind, self._rv)
            except _Gone as err:
                log.info("%s: %s; listing again", self.kind, err)
                self._rv = None
            except Exception as err:  # every failure is retried; none may end the thread
                if self._stop.is_set():
                    break
                if isinstance(err, ApiException) and err.status == 410 and self._rv is not None:
                    log.info(
                        "%s: resourceVersion %s expired (HTTP 410); listing again",
                        self.kind,
                        self._rv,
                    )
                    self._rv = None
                    continue
                self._failed(err)
        log.debug("%s: watcher stopped", self.kind)

    def _failed(self, err: Exception) -> None:
        """Log and count a failure and wait out the backoff.

        Transport and server errors keep the resourceVersion (the next watch resumes from it);
        anything else - a bug in us or in the sink - forgets it, since we cannot tell what the
        sink holds: the next attempt lists again.
        """
        self._failures += 1
        self.status.errors += 1
        self.status.last_error = _describe(err)
        delay = self._backoff(self._failures)
        expected = isinstance(
            err, (ApiException, urllib3.exceptions.HTTPError, OSError, _StatusError, ValueError)
        )
        log.log(
            logging.WARNING if expected else logging.ERROR,
            "%s: %s failed (%s); retrying in %.1fs (attempt %d)",
            self.kind,
            "list" if self._rv is None else f"watch from resourceVersion {self._rv}",
            self.status.last_error,
            delay,
            self._failures,
            exc_info=not expected,
        )
        if not expected:
            self._rv = None
        self._stop.wait(delay)

    def _short_stream(self) -> None:
        """An empty stream that ended at once. The first one is normal (an apiserver restart
        closes every stream); from the second in a row on, back off so we never spin."""
        self._short_streams += 1
        if self._short_streams == 1:
            return
        delay = self._backoff(self._short_streams - 1)
        log.log(
            logging.WARNING if self._short_streams >= 3 else logging.DEBUG,
            "%s: %d watch streams in a row ended at once without events; next in %.1fs",
            self.kind,
            self._short_streams,
            delay,
        )
        self._stop.wait(delay)

    def _recovered(self, what: str) -> None:
        if self._failures:
            log.info("%s: %s again after %d failed attempts", self.kind, what, self._failures)
            self.status.last_error = ""

    def _backoff(self, failures: int) -> float:
        delay = min(self._backoff_max, self._backoff_initial * 2 ** min(failures - 1, 30))
        return float(delay * random.uniform(0.8, 1.2))

    def _list(self) -> None:
        """List everything (paged), hand it to the sink, remember the list's resourceVersion.

        The pages are decoded one at a time while the sink consumes them (`Sink.replace` takes
        an iterable), so at most one page of raw JSON is alive: at 10k services x 10 endpoints
        the whole list decodes into ~200 MB of dicts, which would stay the process's RSS. A
        page that fails makes the iteration raise inside `replace`; the sink then changes
        nothing, and the failure is handled here like any failed list.
        """
        limit: int | None = LIST_PAGE_SIZE
        while True:
            pages = _Pages(self, limit)
            try:
                self._sink.replace(self.kind, pages)
            except Exception as err:
                if pages.error is None:
                    raise _SinkError(f"sink.replace failed: {err!r}") from err
            if isinstance(pages.error, _ContinueExpired):  # the snapshot expired mid-list
                log.info("%s: list continue token expired; listing unpaged", self.kind)
                limit = None
                continue
            if pages.error is not None:
                raise pages.error
            if not pages.done:
                raise _SinkError("sink.replace returned before reading the whole list")
            break
        rv = pages.resource_version
        self._rv = rv
        first = not self.synced.is_set()
        self.status.lists += 1
        self.status.resource_version = rv
        self.status.synced = True
        self.synced.set()
        self._recovered("listed")
        self._failures = 0
        log.log(
            logging.DEBUG if first else logging.INFO,
            "%s: listed %d objects at resourceVersion %s",
            self.kind,
            pages.count,
            rv,
        )

    def fetch_page(self, limit: int | None, token: str | None) -> dict[str, Any]:
        """One page of a (paged) list, decoded."""
        try:
            resp = self._call(
                limit=limit,
                _continue=token,
                _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT, LIST_READ_TIMEOUT),
            )
        except ApiException as err:
            if err.status == 410 and token:
                raise _ContinueExpired(str(err)) from err
            raise
        with self._reading(resp, reuse=True):
            page = json.loads(resp.data)
        if self._stop.is_set():
            raise _StatusError("stopping")
        if not isinstance(page, dict) or not isinstance(page.get("items"), list):
            raise _StatusError(f"unexpected list response: {str(page)[:200]}")
        return page

    def _watch(self) -> int:
        """Watch from the remembered resourceVersion until the stream ends; returns how many
        events (bookmarks included) arrived. Every event moves the resourceVersion on."""
        rv = self._rv
        timeout = int(MIN_WATCH_TIMEOUT * random.uniform(1.0, 2.0))
        resp = self._call(
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT, timeout + 30),
        )
        self._recovered(f"watching from resourceVersion {rv}")
        self.status.watches += 1
        events = 0
        with self._reading(resp, reuse=False):
            chunks = resp.read_chunked() if resp.chunked else resp.stream(65536)
            for line in _lines(chunks):
                if self._stop.is_set():
                    break
                try:
                    event = json.loads(line)
                except ValueError as err:
                    raise _StatusError(f"undecodable watch event {line[:200]!r}: {err}") from err
                etype = event.get("type")
                obj = event.get("object")
                if not isinstance(obj, dict):
                    raise _StatusError(f"watch event without an object: {line[:200]!r}")
                if etype == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone(f"resourceVersion {rv} expired ({_status_text(obj)})")
                    raise _StatusError(f"watch error: {_status_text(obj)}")
                events += 1
                self._failures = 0  # the stream works: the next failure starts a new backoff
                if etype in ("ADDED", "MODIFIED", "DELETED"):
                    obj.setdefault("kind", self.kind)
                    obj.setdefault("apiVersion", _API_VERSIONS[self.kind])
                    self.status.events += 1
                    try:
                        self._sink.apply(self.kind, etype, obj)
                    except Exception as err:
                        raise _SinkError(f"sink.apply failed: {err!r}") from err
                elif etype != "BOOKMARK":
                    log.warning("%s: ignoring watch event of type %r", self.kind, etype)
                    continue
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                self._rv = self.status.resource_version = rv
        return events


def _describe(err: BaseException) -> str:
    if isinstance(err, ApiException):
        if err.status == 0:
            return str(err.reason or "request failed")
        reason = err.reason or ""
        try:
            body = json.loads(err.body) if err.body else {}
        except (TypeError, ValueError):
            body = {}
        detail = body.get("message") if isinstance(body, dict) else None
        return f"HTTP {err.status} {reason}" + (f": {detail}" if detail else "")
    return f"{type(err).__name__}: {err}"


class KubeSource:
    """Lists and watches the apiserver and feeds a `Sink`; see the module docstring."""

    def __init__(
        self,
        *,
        sink: Sink,
        kubeconfig: str | None,
        master: str | None,
        node_name: str,
        stop: threading.Event,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self._stop = stop
        self._api = client.ApiClient(
            load_client_configuration(kubeconfig=kubeconfig, master=master)
        )
        self._api.user_agent = "kproxy"
        calls = list_watch_calls(self._api, node_name)
        self._watchers = [
            _Watcher(
                kind=kind,
                call=call,
                sink=sink,
                stop=stop,
                backoff_initial=backoff_initial,
                backoff_max=backoff_max,
            )
            for kind, call in calls.items()
        ]
        self._closer = threading.Thread(target=self._close_on_stop, name="kproxy-watch-closer")
        self._closer.daemon = True
        self._started = False

    @property
    def host(self) -> str:
        return str(self._api.configuration.host)

    def start(self) -> None:
        """Start one watcher thread per kind (idempotent)."""
        if self._started:
            return
        self._started = True
        for watcher in self._watchers:
            watcher.thread.start()
        self._closer.start()

    def _close_on_stop(self) -> None:
        self._stop.wait()
        for watcher in self._watchers:
            watcher.interrupt()

    @property
    def synced(self) -> bool:
        """True once every kind has been listed (and handed to the sink) at least once."""
        return all(w.synced.is_set() for w in self._watchers)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for watcher in self._watchers:
            if not watcher.synced.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def status(self) -> dict[str, KindStatus]:
        """A copy of each kind's counters and last error."""
        return {w.kind: KindStatus(**vars(w.status)) for w in self._watchers}

    def join(self, timeout: float) -> bool:
        """Wait for the watcher threads to end (after `stop` is set); True when all did."""
        deadline = time.monotonic() + timeout
        for watcher in self._watchers:
            if watcher.thread.is_alive():
                watcher.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(w.thread.is_alive() for w in self._watchers)
