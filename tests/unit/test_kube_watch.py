"""KubeSource against the fake apiserver, through the real `kubernetes` client and a kubeconfig."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest

from kproxy.kube.watch import KubeConfigError, KubeSource, _lines
from tests.support.fakeapi import (
    FakeApiServer,
    RecordingSink,
    fake_apiserver_fixture,  # noqa: F401
    wait_until,
)
from tests.support.objects import make_node_obj, make_service_obj, make_slice_obj

NODE = "node-a"
SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
NODES = "/api/v1/nodes"
WATCHED = (SERVICES, SLICES, NODES)

StartSource = Callable[..., tuple[KubeSource, RecordingSink]]


@pytest.fixture
def start_source(fake_apiserver: FakeApiServer, tmp_path: object) -> Iterator[StartSource]:
    """Starts KubeSources (fast backoff) against the fake apiserver; stops them afterwards."""
    started: list[tuple[KubeSource, threading.Event]] = []
    kubeconfig = fake_apiserver.write_kubeconfig(f"{tmp_path}/kubeconfig")

    def start(**kwargs: object) -> tuple[KubeSource, RecordingSink]:
        sink = RecordingSink()
        stop = threading.Event()
        options: dict[str, object] = {
            "kubeconfig": kubeconfig,
            "master": None,
            "node_name": NODE,
            "backoff_initial": 0.05,
            "backoff_max": 0.4,
        }
        options.update(kwargs)
        source = KubeSource(sink=sink, stop=stop, **options)  # type: ignore[arg-type]
        source.start()
        started.append((source, stop))
        assert source.wait_synced(10), "the source never synced"
        # the watches are open too, so later changes are events, not part of a list
        assert wait_until(lambda: all(fake_apiserver.open_watches(p) for p in WATCHED))
        return source, sink

    yield start
    for source, stop in started:
        stop.set()
        assert source.join(3), "watcher threads did not stop"


def _populate(server: FakeApiServer) -> None:
    server.upsert(make_service_obj("default", "web"))
    server.upsert(make_service_obj("db", "mysql", ports=[{"name": "sql", "port": 3306}]))
    server.upsert(make_slice_obj("default", "web-abc", "web", ["10.244.1.11", "10.244.1.12"]))
    server.upsert(make_node_obj(NODE, ["192.168.50.10"]))
    server.upsert(make_node_obj("node-b", ["192.168.50.11"]))


def _server_refs(server: FakeApiServer, kind: str) -> set[str]:
    """What the fake apiserver holds now, in RecordingSink's ref form."""
    return {RecordingSink.ref(o) for o in server.objects(kind)}


def test_initial_list_is_delivered_with_replace(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    _populate(fake_apiserver)
    source, sink = start_source()

    assert source.synced
    assert sink.replaces("Service") == [["db/mysql", "default/web"]]
    assert sink.replaces("EndpointSlice") == [["default/web-abc"]]
    assert sink.replaces("Node") == [[NODE]]  # only this node: fieldSelector
    web = sink.get("Service", "default/web")
    assert web is not None and web["kind"] == "Service" and web["spec"]["ports"][0]["port"] == 80
    node_lists = [q for path, q in fake_apiserver.request_log if path == NODES]
    assert node_lists and all(q["fieldSelector"] == f"metadata.name={NODE}" for q in node_lists)


def test_watch_events_are_applied_in_order(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    _populate(fake_apiserver)
    _, sink = start_source()

    fake_apiserver.upsert(make_service_obj("default", "api"))
    fake_apiserver.upsert(make_service_obj("default", "api", type="NodePort"))
    fake_apiserver.delete("Service", "default", "web")
    fake_apiserver.upsert(make_slice_obj("default", "api-1", "api", ["10.244.2.5"]))

    assert wait_until(lambda: len(sink.events("Service")) == 3 and sink.events("EndpointSlice"))
    assert sink.events("Service") == [
        ("ADDED", "default/api"),
        ("MODIFIED", "default/api"),
        ("DELETED", "default/web"),
    ]
    assert sink.names("Service") == {"default/api", "db/mysql"}
    api = sink.get("Service", "default/api")
    assert api is not None and api["spec"]["type"] == "NodePort"
    assert sink.events("EndpointSlice") == [("ADDED", "default/api-1")]
    assert len(sink.replaces("Service")) == 1  # no relist for plain events


def test_node_watch_sees_only_this_node(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    _populate(fake_apiserver)
    _, sink = start_source()

    fake_apiserver.upsert(make_node_obj("node-b", ["192.168.50.99"]))
    fake_apiserver.upsert(make_node_obj(NODE, ["192.168.50.20"]))

    assert wait_until(lambda: sink.events("Node"))
    time.sleep(0.1)
    assert sink.events("Node") == [("MODIFIED", NODE)]
    node = sink.get("Node", NODE)
    assert node is not None and node["status"]["addresses"][0]["address"] == "192.168.50.20"


def test_missing_node_is_an_empty_set_not_an_error(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    source, sink = start_source()
    assert sink.replaces("Node") == [[]]
    assert source.status()["Node"].errors == 0
    fake_apiserver.upsert(make_node_obj(NODE))
    assert wait_until(lambda: sink.events("Node") == [("ADDED", NODE)])


def test_ended_stream_resumes_from_last_resource_version_without_relist(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    _populate(fake_apiserver)
    source, sink = start_source()
    fake_apiserver.upsert(make_service_obj("default", "api"))
    assert wait_until(lambda: "default/api" in sink.names("Service"))
    last_rv = source.status()["Service"].resource_version

    fake_apiserver.close_watches()
    assert wait_until(lambda: fake_apiserver.watches[SERVICES] >= 2)
    fake_apiserver.upsert(make_service_obj("default", "after"))

    assert wait_until(lambda: "default/after" in sink.names("Service"))
    assert fake_apiserver.lists[SERVICES] == 1
    assert len(sink.replaces("Service")) == 1
    watches = [q for p, q in fake_apiserver.request_log if p == SERVICES and "watch" in q]
    assert watches[1]["resourceVersion"] == last_rv
    assert all(q["allowWatchBookmarks"] == "true" for q in watches)


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
def test_compaction_gives_410_and_a_relist_with_the_full_set(
    fake_apiserver: FakeApiServer, start_source: StartSource, as_http: bool
) -> None:
    fake_apiserver.expired_as_http_status = as_http
    _populate(fake_apiserver)
    source, sink = start_source()
    fake_apiserver.upsert(make_service_obj("default", "api"))
    assert wait_until(lambda: "default/api" in sink.names("Service"))

    fake_apiserver.compact()
    fake_apiserver.close_watches()

    assert wait_until(lambda: len(sink.replaces("Service")) == 2)
    assert set(sink.replaces("Service")[-1]) == _server_refs(fake_apiserver, "Service")
    assert wait_until(lambda: len(sink.replaces("EndpointSlice")) == 2)
    assert fake_apiserver.lists[SERVICES] == 2
    # and the new watch works
    fake_apiserver.upsert(make_service_obj("default", "later"))
    assert wait_until(lambda: "default/later" in sink.names("Service"))
    assert source.status()["Service"].errors == 0


def test_apiserver_down_then_up_keeps_state_and_resumes(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    _populate(fake_apiserver)
    source, sink = start_source()
    fake_apiserver.upsert(make_service_obj("default", "api"))
    assert wait_until(lambda: "default/api" in sink.names("Service"))
    last_rv = source.status()["Service"].resource_version
    before = sink.names("Service")
    seen = len(fake_apiserver.request_log)

    fake_apiserver.stop()
    assert wait_until(lambda: source.status()["Service"].errors >= 3)
    assert sink.names("Service") == before  # last known state kept
    fake_apiserver.upsert(make_service_obj("default", "while-down"))
    fake_apiserver.delete("Service", "default", "web")
    fake_apiserver.start()

    assert wait_until(lambda: "default/while-down" in sink.names("Service"))
    assert wait_until(lambda: "default/web" not in sink.names("Service"))
    assert all(refs for refs in sink.replaces("Service"))  # never an empty replace
    assert fake_apiserver.lists[SERVICES] == 1  # history covered the outage: no relist
    assert source.status()["Service"].last_error == ""
    resumed = [q for p, q in fake_apiserver.request_log[seen:] if p == SERVICES]
    assert resumed[0]["resourceVersion"] == last_rv  # from the last event, not the stream start


def test_apiserver_down_across_compaction_relists_on_return(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    _populate(fake_apiserver)
    source, sink = start_source()

    fake_apiserver.stop()
    assert wait_until(lambda: source.status()["EndpointSlice"].errors >= 2)
    fake_apiserver.delete("EndpointSlice", "default", "web-abc")
    fake_apiserver.upsert(make_slice_obj("default", "web-new", "web", ["10.244.1.13"]))
    fake_apiserver.compact()
    fake_apiserver.start()

    assert wait_until(lambda: sink.names("EndpointSlice") == {"default/web-new"})
    assert sink.replaces("EndpointSlice") == [["default/web-abc"], ["default/web-new"]]
    assert sink.events("EndpointSlice") == []


def test_backoff_grows_and_is_capped(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    source, _ = start_source(backoff_initial=0.1, backoff_max=0.2)
    fake_apiserver.stop()
    started = time.monotonic()
    time.sleep(1.0)
    attempts = source.status()["Service"].errors
    elapsed = time.monotonic() - started
    # 0.1 then 0.2 (capped, +-20% jitter): never more than one attempt per 0.08 s
    assert 2 <= attempts <= elapsed / 0.08 + 1
    fake_apiserver.start()


def test_bookmarks_keep_the_resource_version_fresh(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    _populate(fake_apiserver)
    fake_apiserver.history_limit = 3
    source, sink = start_source()

    def churn_other_kind() -> None:  # moves the global resourceVersion past the window
        for i in range(5):
            fake_apiserver.upsert(
                make_node_obj(f"other-{i}", [f"192.168.60.{len(sink.calls) + i}"])
            )

    churn_other_kind()
    fake_apiserver.send_bookmarks()
    current = str(fake_apiserver.resource_version)
    assert wait_until(lambda: source.status()["Service"].resource_version == current)
    fake_apiserver.close_watches()
    assert wait_until(lambda: fake_apiserver.watches[SERVICES] >= 2)
    time.sleep(0.1)
    assert fake_apiserver.lists[SERVICES] == 1  # resumed from the bookmark: no 410

    churn_other_kind()  # this time without a bookmark: the held version falls out of the window
    fake_apiserver.close_watches()
    assert wait_until(lambda: len(sink.replaces("Service")) == 2)
    assert fake_apiserver.lists[SERVICES] == 2


def test_server_errors_on_list_are_retried(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    _populate(fake_apiserver)
    fake_apiserver.fail_next(4, code=500)
    source, sink = start_source()
    status = source.status()
    assert sum(s.errors for s in status.values()) == 4
    assert sink.names("Service") == {"default/web", "db/mysql"}
    assert all(len(r) == 1 for r in map(sink.replaces, ("Service", "EndpointSlice", "Node")))


def test_failed_watch_request_resumes_without_relist(
    fake_apiserver: FakeApiServer, start_source: StartSource
) -> None:
    _populate(fake_apiserver)
    source, sink = start_source()
    fake_apiserver.fail_next(3, code=503)
    fake_apiserver.close_watches()
    assert wait_until(lambda: sum(s.errors for s in source.status().values()) == 3)
    fake_apiserver.upsert(make_service_obj("default", "api"))
    assert wait_until(lambda: "default/api" in sink.names("Service"))
    assert all(fake_apiserver.lists[path] == 1 for path in WATCHED)


class FlakySink(RecordingSink):
    """Raises on the first apply: a bug on the consumer's side."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    def apply(self, kind: str, event_type: str, obj: dict[str, object]) -> None:
        if not self.raised:
            self.raised = True
            raise RuntimeError("consumer bug")
        super().apply(kind, event_type, obj)


def test_a_failing_sink_leads_to_a_relist(
    fake_apiserver: FakeApiServer, tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    _populate(fake_apiserver)
    sink = FlakySink()
    stop = threading.Event()
    source = KubeSource(
        sink=sink,
        kubeconfig=fake_apiserver.write_kubeconfig(f"{tmp_path}/kc"),
        master=None,
        node_name=NODE,
        stop=stop,
        backoff_initial=0.05,
    )
    source.start()
    try:
        assert source.wait_synced(10)
        assert wait_until(lambda: fake_apiserver.open_watches(SERVICES) == 1)
        fake_apiserver.upsert(make_service_obj("default", "api"))
        # the event was lost inside the sink: a relist brings the sink up to date
        assert wait_until(lambda: len(sink.replaces("Service")) == 2)
        assert "default/api" in sink.names("Service")
        assert any("consumer bug" in r.getMessage() for r in caplog.records)
    finally:
        stop.set()
        assert source.join(2)


def test_large_lists_are_paged(fake_apiserver: FakeApiServer, start_source: StartSource) -> None:
    for i in range(1100):
        fake_apiserver.upsert(make_service_obj(f"ns{i % 7}", f"svc-{i}"))
    _, sink = start_source()
    assert fake_apiserver.lists[SERVICES] == 3
    assert len(sink.replaces("Service")) == 1
    assert len(sink.replaces("Service")[0]) == 1100


class MidListSink(RecordingSink):
    """Calls `interfere` after reading the first Service of the first list: the next page
    request then fails (or finds its continue token expired)."""

    def __init__(self, interfere: Callable[[], None]) -> None:
        super().__init__()
        self.interfere = interfere
        self.raised: BaseException | None = None

    def replace(self, kind: str, objects: Iterable[dict[str, object]]) -> None:
        if kind == "Service" and self.interfere is not None:
            interfere, self.interfere = self.interfere, None  # type: ignore[assignment]
            it = iter(objects)
            next(it)
            interfere()
            try:
                for _ in it:  # raises: the page after the interference does not come
                    pass
            except Exception as err:
                self.raised = err
                raise
        super().replace(kind, objects)


def _down_briefly(server: FakeApiServer) -> None:
    server.stop()
    threading.Timer(0.3, server.start).start()


@pytest.mark.parametrize("interference", ["down", "expire"], ids=["relist", "unpaged"])
def test_a_list_failing_mid_way_changes_nothing_then_completes(
    fake_apiserver: FakeApiServer, tmp_path: object, interference: str
) -> None:
    for i in range(1100):
        fake_apiserver.upsert(make_service_obj(f"ns{i % 7}", f"svc-{i}"))
    if interference == "down":
        interfere: Callable[[], None] = lambda: _down_briefly(fake_apiserver)  # noqa: E731
    else:
        interfere = fake_apiserver.compact
    sink = MidListSink(interfere)
    stop = threading.Event()
    source = KubeSource(
        sink=sink,
        kubeconfig=fake_apiserver.write_kubeconfig(f"{tmp_path}/kc"),
        master=None,
        node_name=NODE,
        stop=stop,
        backoff_initial=0.05,
    )
    source.start()
    try:
        assert source.wait_synced(10)
        assert sink.raised is not None  # reading the first list stopped part-way
        # one replace, with everything: never a partial set
        assert [len(r) for r in sink.replaces("Service")] == [1100]
        if interference == "expire":  # page 1, page 2's token gets 410, one unpaged list
            assert fake_apiserver.lists[SERVICES] == 3
        else:  # page 1, (page 2 refused: the server was down), all 3 pages again
            assert fake_apiserver.lists[SERVICES] == 4
    finally:
        stop.set()
        assert source.join(2)


def test_master_url_without_auth(tmp_path: object) -> None:
    server = FakeApiServer(token=None)
    server.start()
    stop = threading.Event()
    try:
        server.upsert(make_service_obj("default", "web"))
        sink = RecordingSink()
        source = KubeSource(
            sink=sink, kubeconfig=None, master=server.url, node_name=NODE, stop=stop
        )
        source.start()
        assert source.wait_synced(10)
        assert sink.names("Service") == {"default/web"}
    finally:
        stop.set()
        server.stop()


def test_wrong_token_never_syncs_and_says_why(tmp_path: object) -> None:
    server = FakeApiServer(token="right")
    server.start()
    stop = threading.Event()
    try:
        server.token = "wrong"
        kubeconfig = server.write_kubeconfig(f"{tmp_path}/kc")
        server.token = "right"
        source = KubeSource(
            sink=RecordingSink(), kubeconfig=kubeconfig, master=None, node_name=NODE, stop=stop
        )
        source.start()
        assert not source.wait_synced(0.5)
        assert "401" in source.status()["Service"].last_error
    finally:
        stop.set()
        server.stop()


def test_unusable_configuration_is_a_clear_error(tmp_path: object) -> None:
    stop = threading.Event()
    with pytest.raises(KubeConfigError):
        KubeSource(
            sink=RecordingSink(),
            kubeconfig=f"{tmp_path}/missing",
            master=None,
            node_name=NODE,
            stop=stop,
        )
    with pytest.raises(KubeConfigError):  # not in a pod, no --master
        KubeSource(sink=RecordingSink(), kubeconfig=None, master=None, node_name=NODE, stop=stop)


@pytest.mark.parametrize("down", [False, True], ids=["watching", "backing-off"])
def test_stop_ends_threads_promptly(
    fake_apiserver: FakeApiServer, tmp_path: object, down: bool
) -> None:
    kubeconfig = fake_apiserver.write_kubeconfig(f"{tmp_path}/kc")
    stop = threading.Event()
    source = KubeSource(
        sink=RecordingSink(),
        kubeconfig=kubeconfig,
        master=None,
        node_name=NODE,
        stop=stop,
        backoff_initial=30,
        backoff_max=30,
    )
    source.start()
    assert source.wait_synced(10)
    assert wait_until(lambda: fake_apiserver.open_watches() == 3)
    if down:
        fake_apiserver.stop()
        assert wait_until(lambda: all(s.errors >= 1 for s in source.status().values()))

    started = time.monotonic()
    stop.set()
    assert source.join(2.0)
    assert time.monotonic() - started < 1.5
    if not down:
        assert wait_until(lambda: fake_apiserver.open_watches() == 0)


@pytest.mark.parametrize(
    "chunks",
    [
        [b'{"a":1}\n{"b":2}\n'],
        [b'{"a"', b":1}\n", b'{"b":2}', b"\n"],
        [b'{"a":1}\n{"b"', b":2}"],  # no final newline
        [b"\n", b'{"a":1}', b"\n\n", b'{"b":2}\n'],
    ],
    ids=["one-chunk", "split-everywhere", "no-final-newline", "blank-lines"],
)
def test_watch_lines_survive_any_chunking(chunks: list[bytes]) -> None:
    assert list(_lines(iter(chunks))) == [b'{"a":1}', b'{"b":2}']


def test_feeds_the_model_store_end_to_end(fake_apiserver: FakeApiServer, tmp_path: object) -> None:
    from kproxy.kube.ingest import StoreSink
    from kproxy.model.objects import Ref
    from kproxy.model.store import Store

    _populate(fake_apiserver)
    store = Store()
    stop = threading.Event()
    source = KubeSource(
        sink=StoreSink(store, node_name=NODE),
        kubeconfig=fake_apiserver.write_kubeconfig(f"{tmp_path}/kc"),
        master=None,
        node_name=NODE,
        stop=stop,
    )
    source.start()
    try:
        assert source.wait_synced(10)
        snap = store.peek()
        assert set(snap.services) == {Ref("default", "web"), Ref("db", "mysql")}
        web_slices = snap.slices_for(Ref("default", "web"))
        assert [e.address for sl in web_slices for e in sl.endpoints] == [
            "10.244.1.11",
            "10.244.1.12",
        ]
        assert snap.node is not None and snap.node.name == NODE

        fake_apiserver.delete("Service", "db", "mysql")
        assert wait_until(lambda: Ref("db", "mysql") not in store.peek().services)
    finally:
        stop.set()
        assert source.join(2)


_IMPORTS_PROBE = """
import sys, threading
from kproxy.kube.watch import KubeSource
from tests.support.fakeapi import RecordingSink
sink, stop = RecordingSink(), threading.Event()
source = KubeSource(sink=sink, kubeconfig=sys.argv[1], master=None, node_name="node-a", stop=stop)
source.start()
assert source.wait_synced(10), "never synced"
print(sorted(sink.names("Service")))
print(sorted(m for m in sys.modules if m.startswith("kubernetes.client.api.")))
stop.set()
source.join(3)
"""


def test_lists_and_watches_without_the_generated_api_modules(
    fake_apiserver: FakeApiServer, tmp_path: object
) -> None:
    """The generated CoreV1Api/DiscoveryV1Api modules import ~260 model classes (22 MB of RSS)
    that kproxy never builds: the source issues its GETs through the ApiClient itself."""
    import subprocess
    import sys

    _populate(fake_apiserver)
    kubeconfig = fake_apiserver.write_kubeconfig(f"{tmp_path}/kubeconfig")
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, kubeconfig],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out[0] == str(["db/mysql", "default/web"]), out  # it listed
    assert out[1] == "[]", out[1]
