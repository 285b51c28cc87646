"""Where `kproxy status` and `kproxy explain` get the wanted state and the settings from.

By default from the running agent, over its inspection socket (kproxy.runtime.inspectsock; where
it lives: kproxy.inspect.socketpath): the
snapshot it last handed to the dataplane and the settings it runs with, so the commands need no
flags on a node where `kproxy run` runs, whatever its source (manifests, kubeconfig, in-cluster,
systemd flags). Flags naming a source (--manifests, --kubeconfig, --master, --config) switch to
reading that source directly (offline use, or another view of the cluster); any other flag given
overrides the agent's setting of the same name.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from kproxy.config import Settings, resolve, validate
from kproxy.errors import SourceError
from kproxy.inspect.socketpath import STATE_VERSION, default_socket_path, netns_inode
from kproxy.model.codec import decode, decode_snapshot, paused_gc
from kproxy.model.store import Snapshot

SOURCE_FLAGS = ("manifests", "kubeconfig", "master", "config")
TIMEOUT = 30.0


class NoAgent(SourceError, RuntimeError):
    """No agent answers on the inspection socket (the message is one line for the user)."""


@dataclass(frozen=True, slots=True)
class Wanted:
    settings: Settings
    snapshot: Snapshot | None  # None: not loaded yet (source flags: loaded on demand)
    origin: str  # "the running agent (/run/kproxy/kproxy.sock)" or "--manifests DIR", ...
    agent: dict[str, Any] | None = None  # the agent's document without its snapshot


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("kproxy", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def fetch(path: Path, route: str = "/v1/state", *, timeout: float = TIMEOUT) -> dict[str, Any]:
    """GET `route` from the agent's socket at `path`; NoAgent when nobody answers there."""
    conn = _UnixHTTPConnection(str(path), timeout)
    try:
        conn.request("GET", route)
        res = conn.getresponse()
        body = res.read()
    except FileNotFoundError:
        raise NoAgent(f"no running kproxy agent found (no socket {path})") from None
    except PermissionError:
        why = "permission denied (run as root)"
        raise NoAgent(f"cannot read the agent's socket {path}: {why}") from None
    except (ConnectionRefusedError, ConnectionResetError):
        why = f"{path} is left from a stopped one"
        raise NoAgent(f"no running kproxy agent found ({why})") from None
    except (OSError, http.client.HTTPException) as err:
        raise NoAgent(f"the kproxy agent at {path} did not answer: {err}") from None
    finally:
        conn.close()
    if res.status != 200:
        raise NoAgent(f"the kproxy agent at {path} answered HTTP {res.status}")
    with paused_gc():
        doc: dict[str, Any] = json.loads(body)
    if doc.get("version") != STATE_VERSION:
        raise NoAgent(
            f"the kproxy agent at {path} speaks state version {doc.get('version')}, this "
            f"command {STATE_VERSION}: run the same kproxy version"
        )
    own = netns_inode()
    if own and doc.get("netns") and doc["netns"] != own:
        raise NoAgent(f"the kproxy agent at {path} runs in another network namespace")
    return doc


def source_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, name, None) for name in SOURCE_FLAGS)


def from_agent(args: argparse.Namespace, *, path: Path | None = None) -> Wanted:
    """The agent's wanted state, with the flags given on the command line laid over its
    settings."""
    where = path or default_socket_path()
    doc = fetch(where)
    settings = decode(Settings, doc.get("settings", {}))
    names = {f.name for f in fields(Settings)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    settings = validate(replace(settings, **given))
    with paused_gc():
        snapshot = decode_snapshot(doc.get("snapshot", {}))
    rest = {k: v for k, v in doc.items() if k != "snapshot"}
    return Wanted(settings, snapshot, f"the running agent ({where})", rest)


def from_flags(args: argparse.Namespace) -> Wanted:
    settings = resolve(args)
    if settings.manifests:
        origin = f"--manifests {settings.manifests}"
    elif settings.kubeconfig:
        origin = f"--kubeconfig {settings.kubeconfig}"
    elif settings.master:
        origin = f"--master {settings.master}"
    else:
        origin = f"--config {settings.config}"
    return Wanted(settings, None, origin)


def wanted(args: argparse.Namespace) -> Wanted:
    """The source flags' state when given, else the running agent's (NoAgent when none)."""
    return from_flags(args) if source_given(args) else from_agent(args)


def snapshot_of(w: Wanted) -> Snapshot:
    """The wanted snapshot: the agent's, or one list of the source the flags name."""
    if w.snapshot is not None:
        return w.snapshot
    from kproxy.inspect.common import load_snapshot
    from kproxy.model.store import without_proxy_for

    snapshot = load_snapshot(w.settings)
    if w.settings.dns and w.settings.dns_service_ip:  # as the agent syncs it
        snapshot = without_proxy_for(snapshot, w.settings.dns_service_ip)
    return snapshot


def for_command(args: argparse.Namespace, command: str, *, required: bool) -> Wanted | None:
    """`wanted(args)` for a subcommand, errors as one line on stderr. Without an agent and
    without source flags: exit 2 when `required`, else None (the command goes on without)."""
    from kproxy.config import ConfigError

    try:
        return wanted(args)
    except ConfigError as err:
        print(f"kproxy {command}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except NoAgent as err:
        if required:
            print(
                f"kproxy {command}: {err}; start `kproxy run` on this node, or name the "
                "source: --manifests DIR or --kubeconfig FILE",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
        print(
            f"kproxy {command}: {err}: showing the kernel's rules only (--manifests DIR or "
            "--kubeconfig FILE adds the wanted state)",
            file=sys.stderr,
        )
        return None


@dataclass(frozen=True, slots=True)
class WantedPort:
    """What the wanted state says about one destination IP:port/protocol."""

    service: str  # kube-proxy's port name, ns/svc:port
    kind: str  # cluster IP, external IP, loadbalancer IP, nodePort
    endpoints: tuple[str, ...]  # ip:port the traffic should reach (after the traffic policies)


def wanted_port(
    snapshot: Snapshot,
    *,
    node_name: str,
    ip: str,
    port: int,
    protocol: str,
    node_addresses: frozenset[str] | set[str],
) -> WantedPort | None:
    """The service port that owns `ip:port/protocol` in `snapshot`, with its wanted endpoints."""
    from kproxy.model.objects import ip_family
    from kproxy.model.view import service_views

    family = ip_family(ip)
    proto = protocol.upper()
    zone = snapshot.node.zone if snapshot.node else ""
    local = ip in node_addresses
    for ref, svc in snapshot.services.items():
        if not svc.proxied or not any(
            p.protocol == proto and (p.port == port or (local and p.node_port == port))
            for p in svc.ports
        ):
            continue
        views = service_views(
            svc, snapshot.slices_for(ref), family=family, node_name=node_name, node_zone=zone
        )
        for v in views:
            if v.protocol != proto:
                continue
            kind = ""
            if v.port.port == port:
                if ip == v.cluster_ip:
                    kind = "cluster IP"
                elif ip in v.external_ips:
                    kind = "external IP"
                elif ip in v.load_balancer_ips:
                    kind = "loadbalancer IP"
            if not kind and local and v.node_port == port:
                kind = "nodePort"
            if not kind:
                continue
            eps = v.decision.internal if kind == "cluster IP" else v.decision.external
            return WantedPort(v.name, kind, tuple(e.hostport for e in eps))
    return None
