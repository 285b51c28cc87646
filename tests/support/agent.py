"""Running the real `kproxy run` inside a lab node namespace, against a fake apiserver.

`Agent` is a real kproxy process (python3 -m kproxy run ...) in a node namespace; the fake
apiserver serves from the lab's fabric namespace so every node reaches it. Tests drive the API
and assert with real traffic.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kproxy.lab.netlab import FABRIC_IP, Lab, Node
from kproxy.lab.nsexec import helper_env, module_argv
from kproxy.lab.traffic import http_get
from tests.support.fakeapi import FakeApiServer

CLUSTER_CIDR = "10.244.0.0/16"


def node_obj(node: Node, *, zone: str = "", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": node.name, "labels": {}}
    if zone:
        meta["labels"]["topology.kubernetes.io/zone"] = zone
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": meta,
        "status": {"addresses": [{"type": "InternalIP", "address": node.ip}]},
    }


class Agent:
    def __init__(
        self,
        lab: Lab,
        node: Node,
        kubeconfig: str,
        *,
        extra: Sequence[str] = (),
        dns: bool = False,
    ) -> None:
        self.lab = lab
        self.node = node
        self.kubeconfig = kubeconfig
        self.extra = list(extra)
        self.dns = dns
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = lab.workdir / f"kproxy-{node.name}.log"
        self.starts = 0
        self.env: dict[str, str] = {}  # added to the agent's environment

    def source_args(self) -> list[str]:
        """Where the agent reads the cluster from (subclasses: manifests)."""
        return ["--kubeconfig", self.kubeconfig]

    def argv(self) -> list[str]:
        args = [
            "run",
            *self.source_args(),
            "--hostname-override",
            self.node.name,
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--iptables-min-sync-period",
            "0s",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "-v",
            "-v",
        ]
        if not self.dns:
            args.append("--no-dns")
        return module_argv("kproxy", *args, *self.extra)

    def start(self, *, wait: bool = True) -> None:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {self.starts}\n".encode())
            log.flush()
            self.proc = self.lab.spawn(
                self.node.ns,
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=helper_env(self.env),
            )
        if wait:
            self.wait_ready()

    def healthz(self, path: str = "/healthz") -> tuple[bool, dict[str, Any]]:
        res = http_get(self.node.ns, "127.0.0.1", 10256, timeout=1.0, path=path)
        if not res.ok:
            return False, {}
        body = res.body
        try:
            return True, json.loads(body[body.index("{") :])
        except ValueError:
            return True, {}

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until /healthz reports a sync (lastUpdated). Each /healthz request is a probe
        process in the node namespace, so it is asked only once this start's first sync is in
        the log (a file read), not while the agent is still starting up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"kproxy exited early:\n{self.log()}")
            if SYNC_LINE.search(self.log_of_this_start()):
                ok, body = self.healthz()
                if ok and body.get("lastUpdated"):
                    return
            time.sleep(0.05)
        raise AssertionError(f"kproxy did not sync within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"kproxy did not stop on {sig}:\n{self.log()}") from None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def log_of_this_start(self) -> str:
        """The log written since the last start (the whole file holds every start's)."""
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""
        return text.rpartition(f"---- start {self.starts}\n")[2]

    def save(self, table: str = "nat", *, binary: str = "iptables-save") -> str:
        return self.lab.run(
            self.node.ns, [binary, "-t", table], capture_output=True, text=True
        ).stdout

    @property
    def mode(self) -> str:
        """The --proxy-mode this agent runs with."""
        args = self.extra
        for i, arg in enumerate(args[:-1]):
            if arg == "--proxy-mode":
                return args[i + 1]
        return "iptables"

    def ruleset(self) -> str:
        """What the agent's mode programmed, as its tools print it: `nft list table` of both
        kube-proxy tables in nftables mode, iptables-save's nat and filter tables otherwise."""
        if self.mode == "nftables":
            return "".join(
                self.lab.run(
                    self.node.ns,
                    ["nft", "list", "table", family, "kube-proxy"],
                    capture_output=True,
                    text=True,
                ).stdout
                for family in ("ip", "ip6")
            )
        return self.save("nat") + self.save("filter")

    def metrics(self) -> str:
        res = http_get(self.node.ns, "127.0.0.1", 10249, timeout=2.0, path="/metrics")
        return res.body if res.ok else ""


SYNC_LINE = re.compile(r"synced (all rules|changes) in [\d.]+ ms: .*?(\d+) changed, (\d+) written")


def syncs(agent: Agent) -> list[tuple[bool, int, int]]:
    """(full, changed, written) of every sync in the agent's whole log, oldest first (across
    restarts)."""
    try:
        text = Path(agent.log_path).read_text(errors="replace")
    except OSError:
        return []
    return [(m[0] == "all rules", int(m[1]), int(m[2])) for m in SYNC_LINE.findall(text)]


def eventually(check: Callable[[], Any], *, timeout: float = 5.0, step: float = 0.05) -> Any:
    """Retry `check` until it returns a truthy value (returned) or raises no AssertionError."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value or value is None:
                return value
        except AssertionError as err:
            last = err
        if time.monotonic() > deadline:
            if last is not None:
                raise last
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)


@contextlib.contextmanager
def serve_cluster_api(lab: Lab) -> Iterator[tuple[FakeApiServer, str]]:
    """A fake apiserver listening in the lab's fabric namespace (reachable from every node),
    holding one Node object per lab node; yields it and the path of a kubeconfig for it."""
    api = FakeApiServer(host=FABRIC_IP, netns=lab.fabric_ns)
    api.start()
    for node in lab.nodes:
        api.upsert(node_obj(node))
    kubeconfig = api.write_kubeconfig(str(lab.workdir / "kubeconfig"))
    try:
        yield api, kubeconfig
    finally:
        api.stop()


@pytest.fixture
def cluster_api(lab: Lab) -> Iterator[tuple[FakeApiServer, str]]:
    """A fake apiserver listening in the lab's fabric namespace (reachable from every node)."""
    with serve_cluster_api(lab) as served:
        yield served


@pytest.fixture
def cluster_api2(lab2: Lab) -> Iterator[tuple[FakeApiServer, str]]:
    """`cluster_api` for the two-node lab `lab2`."""
    with serve_cluster_api(lab2) as served:
        yield served


def start_agents(
    lab: Lab, kubeconfig: str, *, extra: Sequence[str] = (), timeout: float = 30.0
) -> list[Agent]:
    """Start one agent per lab node, all at once, and wait until each has synced; in node
    order. The lab's teardown kills them."""
    agents = [Agent(lab, node, kubeconfig, extra=extra) for node in lab.nodes]
    for agent in agents:
        agent.start(wait=False)
    for agent in agents:
        agent.wait_ready(timeout)
    return agents


def http_json(
    ns: str, ip: str, port: int, *, path: str = "/", timeout: float = 1.0
) -> tuple[int, dict[str, Any]]:
    """GET ip:port/path from `ns`: (HTTP status, the JSON body). Status 0 when no HTTP answer
    came back (refused, timeout, ...); the body is {} when it is not JSON."""
    res = http_get(ns, ip, port, timeout=timeout, path=path)
    if res.ok:
        status = 200
    elif res.error_kind == "http" and res.error.startswith("HTTP "):
        status = int(res.error.split()[1])
    else:
        return 0, {}
    try:
        body = json.loads(res.body)
    except ValueError:
        body = {}
    return status, body if isinstance(body, dict) else {}
