"""The userspace dataplane (`--proxy-mode userspace`): kube-proxy's first mode, in kproxy.

For every proxied service port kproxy itself listens on a local port, and iptables REDIRECTs the
service's addresses to it (rules: `kproxy.render.userspace`); the proxy accepts, picks an
endpoint round-robin (or by ClientIP affinity), connects and copies bytes
(`kproxy.backends.userspace_proxy`). Each service port has up to two listeners:

    internal  the ClusterIP          -> the endpoints for cluster traffic
    external  NodePort, externalIPs,  -> the endpoints for external traffic
              LoadBalancer IPs          (only when the service has such addresses)

Which endpoints serve which traffic, and what happens without any, is the model's decision
(`ServicePortView.decision`, kproxy.model.decisions); this module only turns it into listeners
and rules: FORWARD -> a listening proxy port; REJECT -> the port is closed, so the kernel resets
the REDIRECTed connection ("connection refused"); DROP -> a filter rule drops new connections to
the proxy port; the short-circuit of externalTrafficPolicy Local -> clients of an external
listener from a cluster CIDR or this node get the short-circuit endpoints (kube-proxy sends
them to the cluster-wide endpoints), everyone else the local ones (a node without local
endpoints then resets outside clients instead of dropping them: the port must stay open for
the pods).

Syncing:
- An endpoint change updates the listener's balancer in place: no iptables write at all, and
  established connections are untouched (they belong to no listener).
- A listener without endpoints is closed (its REDIRECT rule stays, so clients get a reset at
  once: "connection refused"); it binds the same port again when endpoints come back.
- The rules are re-rendered after every sync and restored (one `iptables-restore --noflush`,
  every userspace chain declared and refilled, missing hooks inserted) only when their text
  changed, or on a full sync.
- Restarts: at start-up the proxy ports of the rules already in the kernel are adopted (bound
  again) for the same service addresses, so the rules stay valid and new connections work again
  as soon as the new process has listed the API. Connections that went through the old process
  end with it: a userspace proxy holds both sockets of every connection.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kproxy.backends.base import SyncError, SyncResult
from kproxy.backends.iptables_exec import (
    ProcessRestorer,
    RestoreFailed,
    Restorer,
    Run,
    RunRestorer,
    binary,
    cleanup_flavours,
    detect_flavour,
    save,
)
from kproxy.backends.userspace_balance import Balancer
from kproxy.backends.userspace_proxy import (
    ProxyEngine,
    TCPListener,
    UDPListener,
    _Listener,
    bind_socket,
)
from kproxy.model.decisions import Verdict
from kproxy.model.objects import IPV6, TCP, UDP, Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Changes, Snapshot
from kproxy.model.view import ServicePortView, build_views
from kproxy.render import userspace as R

log = logging.getLogger("kproxy.userspace")

INTERNAL = "internal"
EXTERNAL = "external"


@dataclass(frozen=True, slots=True)
class Wanted:
    """What one listener should be, from the model's decision: its addresses, its endpoints,
    and what happens without endpoints (REJECT: the port refuses; DROP: a filter rule drops)."""

    name: str
    protocol: str
    scope: str
    portals: tuple[tuple[str, str, int], ...]  # (kind, ip, port) redirected to it
    endpoints: tuple[str, ...]
    affinity_timeout: float
    verdict: Verdict = Verdict.FORWARD
    # externalTrafficPolicy Local: pod and node clients of external addresses use these
    short_circuit: tuple[str, ...] = ()

    @property
    def open(self) -> bool:
        return bool(self.endpoints or self.short_circuit)


@dataclass(slots=True)
class ListenerState:
    """A listener kproxy keeps for one service port and scope (open or not)."""

    wanted: Wanted
    balancer: Balancer
    short: Balancer | None = None  # the short-circuit balancer, when the policy has one
    port: int = 0
    listener: _Listener | None = None
    reserve: socket.socket | None = None  # a bound, not listening TCP socket holding the port
    extra: dict[str, Any] = field(default_factory=dict)


def wanted_listeners(view: ServicePortView, options: ProxyOptions) -> list[Wanted]:
    """The listeners of one service port (see the module docstring), from `view.decision`."""
    d = view.decision
    affinity = float(d.affinity_timeout)
    out = [
        Wanted(
            name=view.name,
            protocol=view.protocol,
            scope=INTERNAL,
            portals=((R.CLUSTER, view.cluster_ip, view.port.port),),
            endpoints=tuple(e.hostport for e in d.internal),
            affinity_timeout=affinity,
            verdict=d.internal_verdict,
        )
    ]
    if d.has_external:
        portals: list[tuple[str, str, int]] = [
            (R.EXTERNAL, ip, view.port.port)
            for ip in dict.fromkeys((*view.external_ips, *view.load_balancer_ips))
        ]
        if view.node_port:
            ips = options.nodeport_ips
            if ips is None:
                portals.append((R.NODEPORT, "", view.node_port))
            else:
                portals.extend((R.NODEPORT, ip, view.node_port) for ip in ips)
        if portals:
            out.append(
                Wanted(
                    name=view.name,
                    protocol=view.protocol,
                    scope=EXTERNAL,
                    portals=tuple(portals),
                    endpoints=tuple(e.hostport for e in d.external),
                    affinity_timeout=affinity,
                    verdict=d.external_verdict,
                    short_circuit=tuple(e.hostport for e in d.short_circuit),
                )
            )
    return out


Key = tuple[Ref, str, str, str]  # service, port name, protocol, scope


class UserspaceProxier:
    """One IP family's listeners and REDIRECT rules. See the module docstring."""

    def __init__(
        self,
        *,
        options: ProxyOptions,
        engine: ProxyEngine,
        udp_timeout: float = 0.25,
        flavour: str | None = None,
        run: Run = subprocess.run,
        restorer: Restorer | None = None,
    ) -> None:
        self.options = options
        self.family = options.family
        self.engine = engine
        self.udp_timeout = udp_timeout
        self._run = run
        self._restorer: Restorer = restorer or (
            ProcessRestorer() if run is subprocess.run else RunRestorer(run)
        )
        self.flavour = flavour or detect_flavour(self.family, run)
        self.restore = binary(self.family, self.flavour, "restore")
        self.bind_ip = "::" if self.family == IPV6 else "0.0.0.0"
        self._node_ips = frozenset(options.node_ips)
        self._cluster_nets = tuple(
            ipaddress.ip_network(c, strict=False) for c in options.cluster_cidrs
        )
        self._listeners: dict[Key, ListenerState] = {}
        self._by_service: dict[Ref, set[Key]] = {}
        self._applied = ""
        self._adopt: dict[tuple[str, str, str, str, int], int] | None = None
        self.restores = 0
        log.info("userspace mode: IPv%d, rules via %s", self.family, self.restore)

    # -- syncing ---------------------------------------------------------------------------------
    def sync(self, snapshot: Snapshot, changes: Changes, *, full: bool) -> SyncResult:
        self.restores = 0
        full = full or changes.full or changes.node_changed
        if self._adopt is None:
            self._adopt = self._adoptable()
        refs: Iterable[Ref] | None = None if full else changes.services
        views = build_views(
            snapshot, family=self.family, node_name=self.options.node_name, refs=refs
        )
        seen: set[Ref] = set(views)
        written = 0
        for ref, port_views in views.items():
            written += self._sync_service(ref, port_views)
        if full:
            for ref in list(self._by_service):
                if ref not in seen:
                    written += self._sync_service(ref, ())
        redirects = self._redirects()
        drops = self._drops()
        text = R.render_restore(redirects, hooks={}, drops=drops)
        if full or text != self._applied:
            self._apply(redirects, drops, text)
        self._adopt = {}
        lines = R.rule_lines(redirects, drops=drops)
        return SyncResult(
            full=full,
            services_written=written,
            rules={
                R.NAT: sum(len(lines[c]) for c in R.NAT_CHAINS),
                R.FILTER: sum(len(lines[c]) for c in R.FILTER_CHAINS),
            },
            detail=f"{len(self._listeners)} listeners, {self.restores} restore(s)",
        )

    def _sync_service(self, ref: Ref, views: Iterable[ServicePortView]) -> int:
        wanted: dict[Key, Wanted] = {}
        for view in views:
            if view.protocol not in (TCP, UDP):
                log.warning(
                    "userspace mode proxies TCP and UDP only: %s/%s skipped",
                    view.name,
                    view.protocol,
                )
                continue
            for w in wanted_listeners(view, self.options):
                wanted[(ref, w.name, w.protocol, w.scope)] = w
        old = self._by_service.get(ref, set())
        changed = 0
        for key in old - set(wanted):
            self._drop(key)
            changed += 1
        for key, w in wanted.items():
            changed += self._ensure(key, w)
        if wanted:
            self._by_service[ref] = set(wanted)
        else:
            self._by_service.pop(ref, None)
        return 1 if changed else 0

    def _ensure(self, key: Key, w: Wanted) -> int:
        state = self._listeners.get(key)
        if state is None:
            state = ListenerState(
                wanted=w, balancer=Balancer(w.endpoints, affinity_timeout=w.affinity_timeout)
            )
            state.port = self._adopted_port(w)
            self._listeners[key] = state
            self._update_short(state)
            self._set_open(state, w.open)
            return 1
        changed = state.wanted != w
        before = state.balancer.endpoints
        state.wanted = w
        state.balancer.update(w.endpoints, affinity_timeout=w.affinity_timeout)
        if state.listener is not None and isinstance(state.listener, UDPListener):
            gone = set(before) - set(w.endpoints)
            if gone:
                self.engine.call_soon(_closer(state.listener, gone))
        self._update_short(state)
        self._set_open(state, w.open)
        return 1 if changed else 0

    def _update_short(self, state: ListenerState) -> None:
        """Keep the short-circuit balancer (and the listener's use of it) in line with the
        wanted endpoints for pod and node clients."""
        w = state.wanted
        if not w.short_circuit:
            state.short = None
        elif state.short is None:
            state.short = Balancer(w.short_circuit, affinity_timeout=w.affinity_timeout)
        else:
            state.short.update(w.short_circuit, affinity_timeout=w.affinity_timeout)
        if state.listener is not None:
            state.listener.short_circuit = self._short_circuit(state)

    def _short_circuit(self, state: ListenerState) -> tuple[Balancer, Callable[[str], bool]] | None:
        if state.short is None:
            return None
        return state.short, self._in_cluster

    def _in_cluster(self, ip: str) -> bool:
        """A pod (in a cluster CIDR) or this node: the clients kube-proxy short-circuits."""
        if ip in self._node_ips:
            return True
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in self._cluster_nets)

    def _drop(self, key: Key) -> None:
        state = self._listeners.pop(key)
        self._close(state)
        if state.reserve is not None:
            state.reserve.close()
            state.reserve = None

    # -- sockets -----------------------------------------------------------------------------------
    def _bind(self, state: ListenerState, kind: int) -> socket.socket:
        """Bind the listener's port again (or a new one when that is taken)."""
        if state.port:
            try:
                return bind_socket(kind, self.bind_ip, state.port)
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise
                log.warning(
                    "proxy port %d of %s is taken, choosing another", state.port, state.wanted.name
                )
        sock = bind_socket(kind, self.bind_ip, 0)
        state.port = int(sock.getsockname()[1])
        return sock

    def _set_open(self, state: ListenerState, want_open: bool) -> None:
        tcp = state.wanted.protocol == TCP
        if want_open and state.listener is None:
            if state.reserve is not None:
                sock, state.reserve = state.reserve, None
            else:
                sock = self._bind(state, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
            listener: _Listener
            if tcp:
                # accepted sockets inherit it: no setsockopt per connection
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.listen(4096)
                listener = TCPListener(self.engine, sock, state.balancer)
            else:
                listener = UDPListener(self.engine, sock, state.balancer, timeout=self.udp_timeout)
            listener.short_circuit = self._short_circuit(state)
            state.listener = listener
            self.engine.start()
            self.engine.call_soon(listener.register)
            log.info(
                "proxying %s %s (%s) on port %d",
                state.wanted.name,
                state.wanted.protocol,
                state.wanted.scope,
                state.port,
            )
        elif not want_open and state.listener is not None:
            self._close(state)
            if tcp:  # keep the port: bound but not listening, so SYNs meet a reset
                try:
                    state.reserve = self._bind(state, socket.SOCK_STREAM)
                except OSError as err:
                    log.warning("cannot hold proxy port %d: %s", state.port, err)
            log.info(
                "%s (%s) has no endpoints: port %d refuses",
                state.wanted.name,
                state.wanted.scope,
                state.port,
            )
        elif not want_open and state.listener is None and not state.port:
            if tcp:
                state.reserve = self._bind(state, socket.SOCK_STREAM)
            else:
                probe = self._bind(state, socket.SOCK_DGRAM)  # choose a port for the rules
                probe.close()

    def _close(self, state: ListenerState) -> None:
        if state.listener is not None:
            listener, state.listener = state.listener, None
            if listener.fd >= 0:
                self.engine.call_soon(listener.close)

    # -- rules -------------------------------------------------------------------------------------
    def _redirects(self) -> list[R.Redirect]:
        out = []
        for state in self._listeners.values():
            w = state.wanted
            if not state.port:
                continue
            for kind, ip, port in w.portals:
                out.append(R.Redirect(w.name, w.protocol, kind, ip, port, state.port))
        return out

    def drift(self) -> str | None:
        """The periodic check (kproxy.runtime.runner): None while the kernel holds the rules
        and hooks kproxy wrote. One save of nat and filter (a lab-sized ruleset: a few ms)."""
        if not self._applied:
            return None
        saved = {t: save(self.family, self.flavour, t, self._run) for t in (R.NAT, R.FILTER)}
        if R.missing_hooks(saved):
            return "a jump to the userspace chains is missing"
        have = set(saved[R.NAT].splitlines()) | set(saved[R.FILTER].splitlines())
        want = R.rule_lines(self._redirects(), drops=self._drops())
        for chain, lines in want.items():
            missing = [line for line in lines if line not in have]
            if missing:
                return f"{len(missing)} rule(s) missing from {chain}"
        chains = tuple(f"-A {c} " for c in want)
        extra = sum(1 for line in have if line.startswith(chains)) - sum(map(len, want.values()))
        return f"{extra} rule(s) kproxy did not write in its chains" if extra else None

    def _drops(self) -> list[R.Drop]:
        """The proxy ports whose traffic is dropped: endpoints exist, none this traffic may use
        (a Local policy on a node without local endpoints)."""
        return [
            R.Drop(s.wanted.name, s.wanted.protocol, s.port)
            for s in self._listeners.values()
            if s.port and s.wanted.verdict == Verdict.DROP and not s.wanted.short_circuit
        ]

    def _adoptable(self) -> dict[tuple[str, str, str, str, int], int]:
        """(name, protocol, kind, ip, port) -> proxy port of the rules already programmed."""
        try:
            saved = save(self.family, self.flavour, "nat", self._run)
        except OSError:
            return {}
        out: dict[tuple[str, str, str, str, int], int] = {}
        for r in R.parse_redirects(saved):
            out[(r.name, r.protocol, r.kind, r.ip, r.port)] = r.proxy_port
        if out:
            log.info("adopting %d proxy ports from the rules in place", len(set(out.values())))
        return out

    def _adopted_port(self, w: Wanted) -> int:
        if not self._adopt:
            return 0
        for kind, ip, port in w.portals:
            found = self._adopt.get(
                (w.name, w.protocol, kind if kind == R.NODEPORT else R.CLUSTER, ip, port)
            )
            if found:
                return found
        return 0

    def _apply(self, redirects: list[R.Redirect], drops: list[R.Drop], text: str) -> None:
        """Restore every userspace chain, with the hooks the kernel lacks, in one input."""
        saved = {t: save(self.family, self.flavour, t, self._run) for t in (R.NAT, R.FILTER)}
        sink = self._restorer.open([self.restore, "--noflush", "-w", "5"])
        self.restores += 1
        sink.write(R.render_restore(redirects, hooks=R.missing_hooks(saved), drops=drops))
        try:
            sink.wait()
        except RestoreFailed as err:
            self._applied = ""
            raise SyncError(str(err)) from err
        self._applied = text

    # -- inspection --------------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Every listener: its port, addresses, endpoints, the next endpoint, counters."""
        out = []
        for (_ref, name, protocol, scope), state in sorted(self._listeners.items()):
            w = state.wanted
            listener = state.listener
            out.append(
                {
                    "service": name,
                    "protocol": protocol,
                    "scope": scope,
                    "family": self.family,
                    "proxy_port": state.port,
                    "listening": listener is not None,
                    "addresses": [
                        R.Redirect(name, protocol, k, ip, p, state.port).address
                        + (f" ({k})" if k != R.CLUSTER else "")
                        for k, ip, p in w.portals
                    ],
                    "endpoints": list(state.balancer.endpoints),
                    "next": state.balancer.peek(),
                    "verdict": w.verdict.value,
                    "short_circuit": list(w.short_circuit),
                    "affinity_timeout": state.balancer.affinity_timeout,
                    "affinity": {
                        c: {"endpoint": e, "expires_in": t}
                        for c, (e, t) in state.balancer.affinity().items()
                    },
                    "stats": listener.stats.as_dict() if listener is not None else {},
                }
            )
        return out

    # -- cleanup -----------------------------------------------------------------------------------
    def cleanup(self) -> None:
        cleanup_rules(self.family, self._run)


def _closer(listener: UDPListener, gone: set[str]) -> Any:
    """Close the UDP sessions of `listener` bound to endpoints that are `gone` (loop thread)."""

    def run() -> None:
        for session in list(listener.sessions.values()):
            if session.endpoint in gone:
                session.close()

    return run


def cleanup_rules(family: int, run: Run = subprocess.run) -> None:
    """Remove the userspace chains and hooks from every iptables flavour of `family`."""

    try:
        cleaned = cleanup_flavours(family, (R.NAT, R.FILTER), R.cleanup_restore, run)
    except RestoreFailed as err:
        raise SyncError(f"cleanup failed: {err}") from err
    for flavour in cleaned:
        log.info("removed the userspace mode's IPv%d chains (%s)", family, flavour)
