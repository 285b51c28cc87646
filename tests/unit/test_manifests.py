"""ManifestSource: a directory of YAML/JSON manifests feeding a sink."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
import yaml

from kproxy.kube.manifests import ManifestSource
from tests.support.fakeapi import RecordingSink, wait_until
from tests.support.objects import make_node_obj, make_service_obj, make_slice_obj

EXAMPLES = Path(__file__).resolve().parents[2] / "kproxy" / "examples"


def _yaml(*docs: object) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def _source(directory: Path, **kwargs: float) -> tuple[ManifestSource, RecordingSink]:
    sink = RecordingSink()
    return ManifestSource(
        sink=sink, directory=str(directory), stop=threading.Event(), **kwargs
    ), sink


def test_multi_document_file(tmp_path: Path) -> None:
    web = make_service_obj("default", "web")
    del web["metadata"]["namespace"]  # defaults to "default"
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}
    text = _yaml(
        web,
        make_slice_obj("shop", "web-1", "web", ["10.244.1.11"]),
        deployment,
        make_node_obj("node-a"),
    )
    (tmp_path / "lab.yaml").write_text(text + "---\n")  # a trailing empty document
    source, sink = _source(tmp_path)

    source.load_once()

    assert source.synced
    assert sink.replaces("Service") == [["default/web"]]
    assert sink.replaces("EndpointSlice") == [["shop/web-1"]]
    assert sink.replaces("Node") == [["node-a"]]
    svc = sink.get("Service", "default/web")
    assert svc is not None and svc["metadata"]["namespace"] == "default"
    node = sink.get("Node", "node-a")
    assert node is not None and "namespace" not in node["metadata"]


def test_list_kinds_and_json(tmp_path: Path) -> None:
    listed = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [make_service_obj("a", "one"), make_slice_obj("a", "one-x", "one", ["10.0.0.1"])],
    }
    two = make_service_obj("a", "two")
    del two["kind"]  # items of a typed list carry no kind, as the API returns them
    typed = {"apiVersion": "v1", "kind": "ServiceList", "items": [two]}
    (tmp_path / "list.yml").write_text(_yaml(listed))
    (tmp_path / "typed.json").write_text(json.dumps(typed))
    (tmp_path / "notes.txt").write_text(_yaml(make_service_obj("a", "ignored")))
    (tmp_path / ".hidden.yaml").write_text(_yaml(make_service_obj("a", "hidden")))
    source, sink = _source(tmp_path)

    source.load_once()

    assert sink.replaces("Service") == [["a/one", "a/two"]]
    assert sink.replaces("EndpointSlice") == [["a/one-x"]]
    loaded = sink.get("Service", "a/two")
    assert loaded is not None and loaded["kind"] == "Service"


def test_changes_are_detected_and_replace_everything(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text(_yaml(make_service_obj("default", "web")))
    source, sink = _source(tmp_path)
    source.load_once()
    source.load_once()  # nothing changed: nothing sent
    assert len(sink.replaces("Service")) == 1

    first.write_text(_yaml(make_service_obj("default", "web", type="NodePort")))
    source.load_once()
    web = sink.get("Service", "default/web")
    assert web is not None and web["spec"]["type"] == "NodePort"

    second = tmp_path / "b.yaml"
    second.write_text(_yaml(make_service_obj("default", "db")))
    source.load_once()
    assert sink.replaces("Service")[-1] == ["default/db", "default/web"]

    first.unlink()
    source.load_once()
    assert sink.replaces("Service")[-1] == ["default/db"]
    assert len(sink.replaces("Service")) == 4
    assert len(sink.replaces("EndpointSlice")) == 4  # every kind, every time


def test_same_size_rewrite_within_one_clock_tick_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(_yaml(make_service_obj("default", "aaa")))
    source, sink = _source(tmp_path)
    source.load_once()
    stat = path.stat()

    path.write_text(_yaml(make_service_obj("default", "bbb")))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    source.load_once()

    assert sink.names("Service") == {"default/bbb"}


def test_broken_file_is_skipped_and_its_previous_content_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "good.yaml"
    flaky = tmp_path / "flaky.yaml"
    good.write_text(_yaml(make_service_obj("default", "web")))
    flaky.write_text(_yaml(make_service_obj("default", "db")))
    (tmp_path / "broken.yaml").write_text("kind: Service\nmetadata: {name: [unclosed\n")
    source, sink = _source(tmp_path)

    with caplog.at_level(logging.ERROR, logger="kproxy.kube"):
        source.load_once()
    assert sink.names("Service") == {"default/web", "default/db"}
    assert any(str(tmp_path / "broken.yaml") in r.getMessage() for r in caplog.records)

    caplog.clear()
    flaky.write_text("kind: Service\n  bad indentation: [\n")  # a half-saved edit
    with caplog.at_level(logging.ERROR, logger="kproxy.kube"):
        source.load_once()
        source.load_once()
    assert sink.names("Service") == {"default/web", "default/db"}
    assert [r.getMessage().count(str(flaky)) for r in caplog.records] == [1]  # logged once

    flaky.write_text(_yaml(make_service_obj("default", "db2")))
    source.load_once()
    assert sink.names("Service") == {"default/web", "default/db2"}


def test_a_document_that_is_not_a_map_breaks_only_its_file(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(_yaml(make_service_obj("default", "web")))
    (tmp_path / "scalar.yaml").write_text(_yaml(make_service_obj("default", "x"), "just text"))
    source, sink = _source(tmp_path)
    source.load_once()
    assert sink.names("Service") == {"default/web"}


def test_duplicates_later_file_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "1.yaml").write_text(
        _yaml(make_service_obj("default", "web", clusterIP="10.96.0.1"))
    )
    (tmp_path / "2.yaml").write_text(
        _yaml(make_service_obj("default", "web", clusterIP="10.96.0.2"))
    )
    source, sink = _source(tmp_path)
    with caplog.at_level(logging.WARNING, logger="kproxy.kube"):
        source.load_once()
    web = sink.get("Service", "default/web")
    assert web is not None and web["spec"]["clusterIP"] == "10.96.0.2"
    assert sink.replaces("Service") == [["default/web"]]
    assert any("default/web" in r.getMessage() for r in caplog.records)


def test_missing_directory_is_an_error_not_an_empty_set(tmp_path: Path) -> None:
    directory = tmp_path / "later"
    source, sink = _source(directory)
    source.load_once()
    assert not source.synced
    assert sink.calls == []

    directory.mkdir()
    source.load_once()
    assert source.synced
    assert sink.replaces("Service") == [[]]  # an empty directory is a real empty set


def test_a_single_file_path_works(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text(_yaml(make_service_obj("default", "web")))
    source, sink = _source(path)
    source.load_once()
    assert sink.names("Service") == {"default/web"}


def test_polling_thread_follows_changes_and_stops(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(_yaml(make_service_obj("default", "web")))
    sink = RecordingSink()
    stop = threading.Event()
    source = ManifestSource(sink=sink, directory=str(tmp_path), stop=stop, poll_interval=0.05)
    source.start()
    try:
        assert source.wait_synced(5)
        path.write_text(_yaml(make_service_obj("default", "api")))
        assert wait_until(lambda: sink.names("Service") == {"default/api"})
    finally:
        stop.set()
    assert source.join(1.0)


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="no bundled examples")
def test_bundled_examples_load(tmp_path: Path) -> None:
    source, sink = _source(EXAMPLES)
    source.load_once()
    assert sink.names("Service")
    assert sink.names("EndpointSlice")
