"""A throwaway Kubernetes-like cluster built from network namespaces.

Owns the topology: namespace names, addresses, links, routes and the processes started inside.
Used by the integration tests and by ``kproxy demo``. Everything goes through the ``ip`` command
(iproute2), one ``ip -batch`` per namespace, so what the lab does can be read and replayed by hand.

Topology (N is the 1-based node number)::

    fabric ns:  bridge br0 192.168.50.1/24 [fd00:50::1/64]; pod CIDRs via their node; no
                forwarding (a dead end). Shared control-plane servers (a fake apiserver) listen
                here: every node, the client and every pod reach 192.168.50.1
    client ns:  eth0 192.168.50.2/24 [fd00:50::2]; pod CIDRs via their node; default via node 1
    node N ns:  eth0 192.168.50.(10+N)/24 [fd00:50::(10+N)]; default via the fabric;
                other nodes' pod CIDRs via those nodes; ip_forward=1; rp_filter=0;
                per pod: veth "vpodK" holding 10.244.N.1/32 [fd00:10:244:N::1/128] and a /32
                route to the pod
    pod ns:     eth0 10.244.N.(10+K)/32 [fd00:10:244:N::(10+K)/128];
                10.244.N.1 on-link, default via 10.244.N.1 (routed pods, no bridge)

Invariants:
- every namespace name starts with the lab's random prefix, so parallel labs never collide;
- every packet between pods, nodes and the client crosses a node's netfilter hooks;
- the node's default route gives Service VIPs a route for locally generated traffic; packets
  that nothing DNATs die silently in the fabric namespace;
- ``teardown()`` is idempotent, kills every process in the lab's namespaces (tracked or not) and
  deletes the namespaces; it also runs at interpreter exit if nobody called it;
- a lab whose process was killed outright leaves a record in its workdir, and
  :func:`cleanup_stale` deletes such leftovers (never a live process's lab).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from kproxy.errors import KproxyError
from kproxy.lab.nsexec import IP, helper_env, ns_argv

UNDERLAY_PREFIX = "192.168.50"
UNDERLAY_PREFIX6 = "fd00:50:"
FABRIC_IP = "192.168.50.1"
FABRIC_IP6 = "fd00:50::1"
CLIENT_IP = "192.168.50.2"
CLIENT_IP6 = "fd00:50::2"
MAX_PODS_PER_NODE = 240
MAX_NODES = 200
OWNER_FILE = "kproxy-lab.json"

_NAME_RE = re.compile(r"[^a-z0-9-]+")


class LabError(KproxyError, RuntimeError):
    """The lab could not be built or used."""


class LabCommandError(subprocess.CalledProcessError):
    """A command run by the lab failed; the message includes its stderr."""

    def __str__(self) -> str:
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        detail = f": {err.strip()}" if err else ""
        return f"{super().__str__()}{detail}"


@dataclass(frozen=True)
class Node:
    """A node namespace. `index` is its position in ``Lab.nodes``; `number` (index + 1) is the N
    in its addresses."""

    index: int
    number: int
    name: str
    ns: str
    ip: str
    ip6: str | None
    pod_cidr: str
    pod_cidr6: str | None
    gateway: str
    gateway6: str | None
    iface: str = "eth0"

    @property
    def ips(self) -> tuple[str, ...]:
        return (self.ip,) if self.ip6 is None else (self.ip, self.ip6)

    @property
    def pod_cidrs(self) -> tuple[str, ...]:
        return (self.pod_cidr,) if self.pod_cidr6 is None else (self.pod_cidr, self.pod_cidr6)


@dataclass(frozen=True)
class Pod:
    """A pod namespace routed through `node` by the veth `host_iface` (in the node namespace)."""

    name: str
    ns: str
    node: Node
    ordinal: int
    ip: str
    ip6: str | None
    host_iface: str
    iface: str = "eth0"

    @property
    def ips(self) -> tuple[str, ...]:
        return (self.ip,) if self.ip6 is None else (self.ip, self.ip6)


@dataclass(frozen=True)
class Client:
    """The namespace outside the cluster CIDR, on the nodes' underlay."""

    name: str
    ns: str
    ip: str
    ip6: str | None
    iface: str = "eth0"

    @property
    def ips(self) -> tuple[str, ...]:
        return (self.ip,) if self.ip6 is None else (self.ip, self.ip6)


PodCounts = int | Sequence[int] | Mapping[int, int]


class Lab:
    """A set of namespaces forming nodes, pods and a client. Build it with :meth:`create`."""

    def __init__(self, *, prefix: str, ipv6: bool) -> None:
        self.prefix = prefix
        self.ipv6 = ipv6
        self.fabric_ns = f"{prefix}-fabric"
        self.fabric_ip = FABRIC_IP
        self.fabric_ip6 = FABRIC_IP6 if ipv6 else None
        self.client = Client(
            name="client",
            ns=f"{prefix}-client",
            ip=CLIENT_IP,
            ip6=CLIENT_IP6 if ipv6 else None,
        )
        self.nodes: list[Node] = []
        self.pods: list[Pod] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
        self.timings: dict[str, float] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._logs: dict[int, Path] = {}
        self._namespaces: list[str] = []
        self._next_ordinal: dict[int, int] = {}
        self._torn_down = False
        self._script_seq = 0
        atexit.register(self.teardown)

    # ------------------------------------------------------------------ building

    @classmethod
    def create(
        cls,
        *,
        nodes: int = 1,
        pods_per_node: PodCounts = 0,
        ipv6: bool = False,
        prefix: str = "kpl",
    ) -> Lab:
        """Build `nodes` nodes, the client and the fabric, plus `pods_per_node` pods (an int for
        every node, a sequence per node index, or a mapping node index -> count)."""
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be in 1..{MAX_NODES}")
        counts = _pod_counts(pods_per_node, nodes)
        lab = cls(prefix=f"{_safe_name(prefix)}{secrets.token_hex(3)}", ipv6=ipv6)
        started = time.monotonic()
        try:
            lab._build(nodes, counts)
        except BaseException:
            lab.teardown()
            raise
        lab.timings["create"] = time.monotonic() - started
        return lab

    def _build(self, node_count: int, counts: Sequence[int]) -> None:
        self.nodes = [self._make_node(i) for i in range(node_count)]
        pods = [
            self._make_pod(node, None) for node in self.nodes for _ in range(counts[node.index])
        ]
        self._add_namespaces([self.fabric_ns, self.client.ns, *(n.ns for n in self.nodes)])
        self._add_namespaces([p.ns for p in pods])
        self._set_sysctls(pods)
        self._batch_all([(self.fabric_ns, self._fabric_script())])
        self._batch_all(
            [(n.ns, self._node_script(n, [p for p in pods if p.node == n])) for n in self.nodes]
        )
        self._batch_all(
            [(self.client.ns, self._client_script()), (self.fabric_ns, self._fabric_routes())]
            + [(p.ns, self._pod_script(p)) for p in pods]
        )
        self.pods.extend(pods)

    def add_pod(self, node_index: int, name: str | None = None) -> Pod:
        """Add one pod namespace to node `node_index` (0-based) and return it."""
        self._check_alive()
        pod = self._make_pod(self.nodes[node_index], name)
        self._add_namespaces([pod.ns])
        self._set_sysctls([pod], nodes=False)
        self._batch_all([(pod.node.ns, "\n".join(_pod_host_lines(pod)))])
        self._batch_all([(pod.ns, self._pod_script(pod))])
        self.pods.append(pod)
        return pod

    def remove_pod(self, pod: Pod) -> None:
        """Kill the pod's processes and delete its namespace and veth."""
        self._check_alive()
        kill_namespace_processes([pod.ns])
        self._ip(["-n", pod.node.ns, "link", "del", pod.host_iface], check=False)
        self._ip(["netns", "del", pod.ns], check=False)
        self._namespaces.remove(pod.ns)
        self._write_owner()
        self.pods.remove(pod)

    def _make_node(self, index: int) -> Node:
        n = index + 1
        return Node(
            index=index,
            number=n,
            name=f"node{n}",
            ns=f"{self.prefix}-node{n}",
            ip=f"{UNDERLAY_PREFIX}.{10 + n}",
            ip6=f"{UNDERLAY_PREFIX6}:{10 + n}" if self.ipv6 else None,
            pod_cidr=f"10.244.{n}.0/24",
            pod_cidr6=f"fd00:10:244:{n:x}::/64" if self.ipv6 else None,
            gateway=f"10.244.{n}.1",
            gateway6=f"fd00:10:244:{n:x}::1" if self.ipv6 else None,
        )

    def _make_pod(self, node: Node, name: str | None) -> Pod:
        k = self._next_ordinal.get(node.index, 1)
        if k > MAX_PODS_PER_NODE:
            raise LabError(f"{node.name} already has {MAX_PODS_PER_NODE} pods")
        self._next_ordinal[node.index] = k + 1
        name = name or f"{node.name}-pod{k}"
        ns = f"{self.prefix}-{_safe_name(name)}"
        if ns in self._namespaces or any(p.ns == ns for p in self.pods):
            raise LabError(f"pod name {name!r} is already used in this lab")
        return Pod(
            name=name,
            ns=ns,
            node=node,
            ordinal=k,
            ip=f"10.244.{node.number}.{10 + k}",
            ip6=f"fd00:10:244:{node.number:x}::{10 + k}" if self.ipv6 else None,
            host_iface=f"vpod{k}",
        )

    def _fabric_script(self) -> str:
        lines = [
            "link set lo up",
            "link add br0 type bridge",
            f"addr add {FABRIC_IP}/24 dev br0",
        ]
        if self.ipv6:
            lines.append(f"addr add {FABRIC_IP6}/64 dev br0 nodad")
        lines.append("link set br0 up")
        ports = [(f"n{n.number}", n.ns) for n in self.nodes] + [("client", self.client.ns)]
        for port, peer_ns in ports:
            lines += [
                f"link add {port} type veth peer name eth0 netns {peer_ns}",
                f"link set {port} master br0",
                f"link set {port} up",
            ]
        return "\n".join(lines)

    def _fabric_routes(self) -> str:
        lines = []
        for node in self.nodes:
            lines.append(f"route add {node.pod_cidr} via {node.ip}")
            if node.pod_cidr6 and node.ip6:
                lines.append(f"route add {node.pod_cidr6} via {node.ip6}")
        return "\n".join(lines)

    def _node_script(self, node: Node, pods: Iterable[Pod]) -> str:
        lines = [
            "link set lo up",
            f"addr add {node.ip}/24 dev eth0",
        ]
        if node.ip6:
            lines.append(f"addr add {node.ip6}/64 dev eth0 nodad")
        lines += ["link set eth0 up", f"route add default via {FABRIC_IP}"]
        if self.ipv6:
            lines.append(f"route add ::/0 via {FABRIC_IP6}")
        for other in self.nodes:
            if other != node:
                lines.append(f"route add {other.pod_cidr} via {other.ip}")
                if other.pod_cidr6 and other.ip6:
                    lines.append(f"route add {other.pod_cidr6} via {other.ip6}")
        for pod in pods:
            lines += _pod_host_lines(pod)
        return "\n".join(lines)

    def _pod_script(self, pod: Pod) -> str:
        node = pod.node
        lines = [
            "link set lo up",
            f"addr add {pod.ip}/32 dev eth0",
        ]
        if pod.ip6:
            lines.append(f"addr add {pod.ip6}/128 dev eth0 nodad")
        lines += [
            "link set eth0 up",
            f"route add {node.gateway} dev eth0 scope link",
            f"route add default via {node.gateway} dev eth0",
        ]
        if node.gateway6:
            lines += [
                f"route add {node.gateway6} dev eth0",
                f"route add ::/0 via {node.gateway6} dev eth0",
            ]
        return "\n".join(lines)

    def _client_script(self) -> str:
        c = self.client
        lines = ["link set lo up", f"addr add {c.ip}/24 dev eth0"]
        if c.ip6:
            lines.append(f"addr add {c.ip6}/64 dev eth0 nodad")
        lines.append("link set eth0 up")
        for node in self.nodes:
            lines.append(f"route add {node.pod_cidr} via {node.ip}")
            if node.pod_cidr6 and node.ip6:
                lines.append(f"route add {node.pod_cidr6} via {node.ip6}")
        lines.append(f"route add default via {self.nodes[0].ip}")
        if self.ipv6 and self.nodes[0].ip6:
            lines.append(f"route add ::/0 via {self.nodes[0].ip6}")
        return "\n".join(lines)

    def _add_namespaces(self, names: Sequence[str]) -> None:
        # Record first: a half-built lab must still be torn down completely.
        self._namespaces.extend(names)
        self._write_owner()
        self._batch_all([(None, "\n".join(f"netns add {ns}" for ns in names))])

    def _write_owner(self) -> None:
        """Record owner process and namespaces, so :func:`cleanup_stale` can find leaked labs."""
        data = {
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "namespaces": self._namespaces,
        }
        tmp = self.workdir / f"{OWNER_FILE}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.workdir / OWNER_FILE)

    def _set_sysctls(self, pods: Sequence[Pod], *, nodes: bool = True) -> None:
        settings: dict[str, list[str]] = {}
        no_dad = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        if nodes:
            for node in self.nodes:
                settings[node.ns] = [
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ]
                if self.ipv6:
                    settings[node.ns] += ["net.ipv6.conf.all.forwarding=1", *no_dad]
            if self.ipv6:
                settings[self.client.ns] = list(no_dad)
                settings[self.fabric_ns] = list(no_dad)
        if self.ipv6:
            # Set before the veths exist: new links copy the namespace's "default" settings, so
            # no address (link-local included) sits in DAD's tentative state for a second.
            for pod in pods:
                settings[pod.ns] = list(no_dad)
        self._wait_all([_start(ns_argv(ns, ["sysctl", "-qw", *v])) for ns, v in settings.items()])

    def _batch_all(self, scripts: Sequence[tuple[str | None, str]]) -> None:
        """Run one ``ip -batch`` per (namespace, script), all at once, and wait for them."""
        running = []
        for ns, script in scripts:
            self._script_seq += 1
            path = self.workdir / f"{self._script_seq:03d}-{ns or 'root'}.ip"
            path.write_text(script + "\n")
            running.append(_start([IP, *(["-n", ns] if ns else []), "-batch", str(path)]))
        self._wait_all(running)

    @staticmethod
    def _wait_all(running: Sequence[tuple[list[str], subprocess.Popen[str]]]) -> None:
        errors = []
        for argv, proc in running:
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                errors.append(LabCommandError(proc.returncode, argv, None, err))
        if errors:
            raise errors[0]

    def _ip(self, args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [IP, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            raise LabCommandError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    # ------------------------------------------------------------------ using

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace this lab created (and has not deleted)."""
        return tuple(self._namespaces)

    def pods_on(self, node: Node | int) -> list[Pod]:
        index = node if isinstance(node, int) else node.index
        return [p for p in self.pods if p.node.index == index]

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(name)

    def describe(self) -> str:
        """A few lines naming every namespace and address (for humans: demo, test failures)."""
        fabric = " ".join(filter(None, (self.fabric_ip, self.fabric_ip6)))
        lines = [f"fabric   {self.fabric_ns}: {fabric}"]
        lines.append(f"client   {self.client.ns}: {' '.join(self.client.ips)}")
        for node in self.nodes:
            lines.append(
                f"{node.name:<8} {node.ns}: {' '.join(node.ips)} pods {' '.join(node.pod_cidrs)}"
            )
            for pod in self.pods_on(node):
                lines.append(f"  pod {pod.name} {pod.ns}: {' '.join(pod.ips)} via {pod.host_iface}")
        return "\n".join(lines)

    def add_route(self, ns: str, dst: str, via: str) -> None:
        """``ip route replace dst via via`` in `ns` (e.g. a LoadBalancer IP towards a node)."""
        self._ip(["-n", ns, "route", "replace", dst, "via", via])

    def run(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run `argv` in namespace `ns` and wait. Defaults: text output captured, check=True
        (raising :class:`LabCommandError` with stderr), timeout 60 s, the environment of
        ``nsexec.helper_env``; `kw` overrides them and is passed to :func:`subprocess.run`."""
        self._check_alive()
        full = ns_argv(ns, argv)
        check = kw.pop("check", True)
        kw.setdefault("timeout", 60)
        kw.setdefault("text", True)
        kw.setdefault("env", helper_env())
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.run(full, check=False, **kw)
        if check and proc.returncode != 0:
            raise LabCommandError(proc.returncode, full, proc.stdout, proc.stderr)
        return proc

    def spawn(
        self, ns: str, argv: Sequence[str], *, log: str | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        """Start `argv` in namespace `ns` in its own process group; it is killed on teardown.

        Unless `kw` sets stdout, stdout and stderr go to a log file in :attr:`workdir` (named
        after `log`, or the namespace and program); read it with :meth:`read_log`. The
        environment reaches this package's helper modules (see ``nsexec.helper_env``).
        """
        self._check_alive()
        full = ns_argv(ns, argv)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        kw.setdefault("env", helper_env())
        log_file: IO[bytes] | None = None
        path: Path | None = None
        if "stdout" not in kw:
            stem = _safe_name(log or f"{ns}-{Path(argv[0]).name}")
            path = self.workdir / f"{stem}-{len(self._procs)}.log"
            log_file = path.open("wb")
            kw["stdout"] = log_file
            kw.setdefault("stderr", subprocess.STDOUT)
        try:
            proc = subprocess.Popen(full, **kw)
        finally:
            if log_file is not None:
                log_file.close()
        self._procs.append(proc)
        if path is not None:
            self._logs[proc.pid] = path
        return proc

    def read_log(self, proc: subprocess.Popen[Any]) -> str:
        """The output so far of a process started by :meth:`spawn` with its default logging."""
        path = self._logs.get(proc.pid)
        if path is None or not path.exists():
            return ""
        return path.read_text(errors="replace")

    def stop(
        self, proc: subprocess.Popen[Any], *, sig: int = signal.SIGTERM, timeout: float = 5.0
    ) -> int:
        """Signal a spawned process group with `sig`, wait up to `timeout`, then SIGKILL it.
        Returns its exit code."""
        _signal_group(proc, sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            return proc.wait(timeout=5)

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> None:
        """Kill every process in the lab's namespaces and delete them. Safe to call twice."""
        if self._torn_down:
            return
        self._torn_down = True
        atexit.unregister(self.teardown)
        started = time.monotonic()
        for proc in self._procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)
        for proc in self._procs:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        kill_namespace_processes(self._namespaces)
        if self._namespaces:
            script = self.workdir / "teardown.ip"
            script.write_text("".join(f"netns del {ns}\n" for ns in self._namespaces))
            self._ip(["-force", "-batch", str(script)], check=False)
        self._namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings["teardown"] = time.monotonic() - started

    def _check_alive(self) -> None:
        if self._torn_down:
            raise LabError("the lab has been torn down")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r}, nodes={len(self.nodes)}, pods={len(self.pods)})"


def kill_namespace_processes(names: Sequence[str]) -> None:
    """SIGKILL every process whose network namespace is one of `names`."""
    targets = set()
    for ns in names:
        with contextlib.suppress(OSError):
            st = os.stat(f"/run/netns/{ns}")
            targets.add((st.st_dev, st.st_ino))
    if not targets:
        return
    for _ in range(3):
        found = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry.name}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in targets:
                found = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
        if not found:
            return
        time.sleep(0.02)


def cleanup_stale(tmpdir: str | None = None) -> list[str]:
    """Delete the namespaces of labs whose creating process died without tearing down (e.g. a
    SIGKILLed test run); labs of live processes are left alone. Returns the deleted names."""
    removed: list[str] = []
    for owner in Path(tmpdir or tempfile.gettempdir()).glob(f"*/{OWNER_FILE}"):
        try:
            data = json.loads(owner.read_text())
            pid, start, names = int(data["pid"]), str(data["start"]), list(data["namespaces"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _process_start(pid) == start:
            continue
        kill_namespace_processes(names)
        for ns in names:
            done = subprocess.run([IP, "netns", "del", ns], capture_output=True, check=False)
            if done.returncode == 0:
                removed.append(ns)
        shutil.rmtree(owner.parent, ignore_errors=True)
    return removed


def _process_start(pid: int) -> str | None:
    """The start time of `pid` (field 22 of /proc/PID/stat), None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pod_host_lines(pod: Pod) -> list[str]:
    """Node-side ``ip -batch`` lines creating the pod's veth pair and routes."""
    node = pod.node
    dev = pod.host_iface
    lines = [
        f"link add {dev} type veth peer name {pod.iface} netns {pod.ns}",
        f"addr add {node.gateway}/32 dev {dev}",
    ]
    if node.gateway6 and pod.ip6:
        lines.append(f"addr add {node.gateway6}/128 dev {dev} nodad")
    lines += [f"link set {dev} up", f"route add {pod.ip}/32 dev {dev} scope link"]
    if pod.ip6:
        lines.append(f"route add {pod.ip6}/128 dev {dev}")
    return lines


def _start(argv: list[str]) -> tuple[list[str], subprocess.Popen[str]]:
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    return argv, proc


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Signal the process group `proc` leads (spawn's default), else just the process."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _safe_name(name: str) -> str:
    return _NAME_RE.sub("-", name.lower()).strip("-") or "x"


def _pod_counts(spec: PodCounts, nodes: int) -> list[int]:
    if isinstance(spec, int):
        counts = [spec] * nodes
    elif isinstance(spec, Mapping):
        counts = [int(spec.get(i, 0)) for i in range(nodes)]
        if unknown := set(spec) - set(range(nodes)):
            raise ValueError(f"pods_per_node names unknown node indexes {sorted(unknown)}")
    else:
        counts = list(spec)
        if len(counts) != nodes:
            raise ValueError("pods_per_node needs one count per node")
    if any(not 0 <= c <= MAX_PODS_PER_NODE for c in counts):
        raise ValueError(f"pods per node must be in 0..{MAX_PODS_PER_NODE}")
    return counts
