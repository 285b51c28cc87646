"""The manifest-directory source: Services, EndpointSlices and Nodes from YAML/JSON files.

`kproxy run --manifests DIR` needs no cluster. Every `*.yaml`, `*.yml` and `*.json` file directly
in DIR (or DIR itself, when it is a file) is read: multi-document YAML, and `kind: List` or
`kind: ServiceList`-style lists. Objects of kind Service, EndpointSlice and Node are kept,
everything else is ignored. A namespaced object without `metadata.namespace` is in "default",
as `kubectl apply` would put it.

Invariants:
- Whenever any file changed (polled: mtime, size, inode - so ConfigMap-mounted directories with
  their symlink swaps work too), the sink receives `replace` for all three kinds with the full
  set. Nothing is sent while nothing changed.
- A file that fails to parse is logged with its path and reason, and its previous content is
  kept until it parses again: a half-saved edit never removes services.
- An unreadable or missing directory is an error (logged, retried on the next poll), never an
  empty set.
- When two files define the same kind/namespace/name, the later file (in name order) wins and
  the duplicate is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from kproxy.errors import InputError
from kproxy.kube.sink import KINDS, RawObject, Sink

log = logging.getLogger("kproxy.kube")

SUFFIXES = (".yaml", ".yml", ".json")
RACY_NS = 2_000_000_000  # files modified this recently are compared by content too
_NAMESPACED = {"Service", "EndpointSlice"}
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(InputError):
    """A manifest file that cannot be used as a whole."""


@dataclass
class _File:
    signature: tuple[int, int, int]
    digest: bytes = b""
    objects: list[RawObject] = field(default_factory=list)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise ManifestError(str(err)) from err


def parse_manifest(data: bytes, *, json_only: bool = False) -> list[RawObject]:
    """The Service/EndpointSlice/Node objects in one file's bytes; ManifestError if unusable."""
    try:
        text = data.decode("utf-8")
        docs = [json.loads(text)] if json_only else list(yaml.load_all(text, Loader=_Loader))
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise ManifestError(str(err).replace("\n", " ")) from err
    objects: list[RawObject] = []
    pending: list[tuple[Any, str | None]] = [(doc, None) for doc in reversed(docs)]  # a stack
    while pending:
        doc, implied_kind = pending.pop()
        if doc is None:
            continue  # an empty document ("---" at the end)
        if not isinstance(doc, dict):
            raise ManifestError(f"a document is a {type(doc).__name__}, not a map")
        kind = doc.get("kind") or implied_kind
        if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
            item_kind = kind[: -len("List")] or None
            pending.extend((item, item_kind) for item in reversed(doc["items"]))
            continue
        if kind not in KINDS:
            continue
        obj = dict(doc)
        obj["kind"] = kind
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = {}
        meta = obj["metadata"] = dict(meta)
        if kind in _NAMESPACED and not meta.get("namespace"):
            meta["namespace"] = "default"
        objects.append(obj)
    return objects


def parse_manifest_file(path: str) -> list[RawObject]:
    """The Service/EndpointSlice/Node objects in one file; ManifestError when it cannot be read."""
    return parse_manifest(_read(path), json_only=path.endswith(".json"))


def _key(obj: RawObject) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (obj["kind"], str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class ManifestSource:
    """Polls a directory of manifests and feeds a `Sink`; see the module docstring."""

    def __init__(
        self,
        *,
        sink: Sink,
        directory: str,
        stop: threading.Event,
        poll_interval: float = 1.0,
    ) -> None:
        self._sink = sink
        self.directory = directory
        self._stop = stop
        self._poll_interval = poll_interval
        self._files: dict[str, _File] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._dir_error = ""
        self._thread = threading.Thread(target=self._run, name="kproxy-manifests", daemon=True)
        self._started = False

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def start(self) -> None:
        """Load now and then poll in a daemon thread until `stop` is set (idempotent)."""
        if not self._started:
            self._started = True
            self._thread.start()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def join(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.load_once()
            except Exception:  # a bug in the sink must not end polling
                log.exception("manifests: loading %s failed", self.directory)
            self._stop.wait(self._poll_interval)

    def _scan(self) -> dict[str, tuple[int, int, int]]:
        signatures = {}
        if os.path.isfile(self.directory):  # a single manifest file works as well
            st = os.stat(self.directory)
            return {self.directory: (st.st_mtime_ns, st.st_size, st.st_ino)}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES):
                    continue
                try:
                    st = entry.stat()  # follows symlinks (ConfigMap volumes)
                except OSError:
                    continue  # vanished, or a dangling link
                if entry.is_file():
                    signatures[entry.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return signatures

    def load_once(self) -> None:
        """Re-read changed files; if anything changed (or on the first load), replace all kinds."""
        with self._lock:
            try:
                signatures = self._scan()
            except OSError as err:
                if str(err) != self._dir_error:
                    log.error("manifests: cannot read directory %s: %s", self.directory, err)
                    self._dir_error = str(err)
                return
            if self._dir_error:
                log.info("manifests: directory %s is readable again", self.directory)
                self._dir_error = ""
            changed = self._refresh(signatures)
            if not changed and self._synced.is_set():
                return
            by_kind = self._merge()
            for kind in KINDS:
                self._sink.replace(kind, by_kind[kind])
            log.info(
                "manifests: %d services, %d endpoint slices, %d nodes from %d files in %s",
                len(by_kind["Service"]),
                len(by_kind["EndpointSlice"]),
                len(by_kind["Node"]),
                len(self._files),
                self.directory,
            )
            self._synced.set()

    def _refresh(self, signatures: dict[str, tuple[int, int, int]]) -> bool:
        changed = False
        for path in set(self._files) - set(signatures):
            log.info("manifests: %s removed", path)
            del self._files[path]
            changed = True
        now_ns = time.time_ns()
        for path, signature in signatures.items():
            known = self._files.get(path)
            # File times are coarse (a clock tick): a same-size rewrite within one tick keeps
            # the signature, so a recently modified file is compared by content as well.
            racy = now_ns - signature[0] < RACY_NS
            if known is not None and known.signature == signature and not racy:
                continue
            try:
                data = _read(path)
                digest = hashlib.sha256(data).digest()
                if known is not None and known.digest == digest:
                    known.signature = signature
                    continue
                objects = parse_manifest(data, json_only=path.endswith(".json"))
            except ManifestError as err:
                if known is None:
                    known = self._files[path] = _File(signature)
                if known.signature != signature or not known.digest:
                    log.error(
                        "manifests: skipping %s (keeping its previous content): %s", path, err
                    )
                known.signature = signature  # not re-parsed until it changes again
                known.digest = b"broken"
                continue
            self._files[path] = _File(signature, digest, objects)
            changed = True
        return changed

    def _merge(self) -> dict[str, list[RawObject]]:
        merged: dict[tuple[str, str, str], tuple[str, RawObject]] = {}
        for path in sorted(self._files):
            for obj in self._files[path].objects:
                key = _key(obj)
                if key in merged:
                    log.warning(
                        "manifests: %s %s/%s is defined in %s and %s; using %s",
                        key[0],
                        key[1],
                        key[2],
                        merged[key][0],
                        path,
                        path,
                    )
                merged[key] = (path, obj)
        by_kind: dict[str, list[RawObject]] = {kind: [] for kind in KINDS}
        for (kind, _, _), (_, obj) in merged.items():
            by_kind[kind].append(obj)
        return by_kind
