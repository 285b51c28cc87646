"""`kproxy status` and `kproxy explain` in userspace mode.

The kernel holds only the REDIRECT rules (service address -> local proxy port); which endpoints
a port spreads over, and which one the next connection gets, live in the running agent's proxy.
So both commands read the two and check one against the other and against the wanted state:

- the rules: `iptables-save -t nat` of the flavour kproxy uses, the KUBE-PORTALS-CONTAINER and
  KUBE-NODEPORT-CONTAINER rules (the -HOST chains hold the same rules for the node's own
  traffic);
- the proxy: the agent's listeners (`/v1/userspace` on its inspection socket): proxy port,
  listening or not, endpoints in round-robin order, the next endpoint, affinity records,
  counters;
- the wanted listeners: the model's decisions for the wanted snapshot
  (kproxy.backends.userspace.wanted_listeners), as the agent itself computes them.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.inspect.wanted import NoAgent, Wanted
from kproxy.render import userspace as R

ROUTE = "/v1/userspace"


# -- reads ----------------------------------------------------------------------------------------
def agent_listeners(path: Any = None) -> list[dict[str, Any]] | None:
    """The running agent's listeners, or None when no agent answers."""
    from kproxy.inspect.socketpath import default_socket_path
    from kproxy.inspect.wanted import fetch

    try:
        doc = fetch(path or default_socket_path(), ROUTE)
    except NoAgent:
        return None
    rows: list[dict[str, Any]] = doc.get("listeners", [])
    return rows


def live_redirects(family: int) -> tuple[list[R.Redirect], str]:
    """The REDIRECT rules in the kernel, and the save binary they were read with."""
    from kproxy.backends.iptables_exec import binary, detect_flavour, save

    flavour = detect_flavour(family)
    return R.parse_redirects(save(family, flavour, "nat")), binary(family, flavour, "save")


# -- status ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class ListenerRow:
    """One wanted listener against what the agent and the kernel have."""

    service: str
    protocol: str
    scope: str
    family: int
    addresses: list[str]
    proxy_port: int = 0
    listening: bool = False
    verdict: str = "forward"
    endpoints: list[str] = field(default_factory=list)
    next: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    affinity: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _key(service: str, protocol: str, scope: str, family: int) -> tuple[str, str, str, int]:
    return (service, protocol, scope, family)


def compare(
    wanted: Iterable[Any],
    agent: Iterable[Mapping[str, Any]],
    redirects: Iterable[R.Redirect],
) -> tuple[list[ListenerRow], list[str]]:
    """Rows for the wanted listeners (kproxy.backends.userspace.Wanted, with a `family`
    attribute set by the caller), checked against the agent's listeners and the kernel's
    REDIRECT rules; and the rules nobody wants (stale)."""
    have = {_key(a["service"], a["protocol"], a["scope"], a["family"]): a for a in agent}
    rules: dict[tuple[str, str, str, int], set[int]] = {}
    for r in redirects:
        kind = R.NODEPORT if r.kind == R.NODEPORT else R.CLUSTER
        rules.setdefault((r.protocol, kind, r.ip, r.port), set()).add(r.proxy_port)
    used: set[tuple[str, str, str, int]] = set()
    rows: list[ListenerRow] = []
    for w, family in wanted:
        row = ListenerRow(
            w.name,
            w.protocol,
            w.scope,
            family,
            [
                R.Redirect(w.name, w.protocol, k, ip, p, 0).address
                + ("" if k == R.CLUSTER else f" ({k})")
                for k, ip, p in w.portals
            ],
            verdict=w.verdict.value,
        )
        a = have.get(_key(w.name, w.protocol, w.scope, family))
        if a is None:
            row.problems.append("the agent has no listener for it")
        else:
            row.proxy_port = int(a["proxy_port"])
            row.listening = bool(a["listening"])
            row.endpoints = list(a["endpoints"])
            row.next = a.get("next")
            row.stats = dict(a.get("stats") or {})
            row.affinity = dict(a.get("affinity") or {})
            if sorted(row.endpoints) != sorted(w.endpoints):
                row.problems.append(f"endpoints {row.endpoints} != wanted {list(w.endpoints)}")
            if row.listening != w.open:
                row.problems.append(
                    "listening without endpoints" if row.listening else "not listening"
                )
        for kind, ip, port in w.portals:
            k = (w.protocol, R.NODEPORT if kind == R.NODEPORT else R.CLUSTER, ip, port)
            used.add(k)
            ports = rules.get(k, set())
            address = R.Redirect(w.name, w.protocol, kind, ip, port, 0).address
            if not ports:
                row.problems.append(f"no REDIRECT rule for {address}")
            elif row.proxy_port and ports != {row.proxy_port}:
                row.problems.append(
                    f"{address} is redirected to {sorted(ports)}, the proxy listens on "
                    f"{row.proxy_port}"
                )
        rows.append(row)
    stale = sorted(
        f"{r.address}/{r.protocol.lower()} -> {r.proxy_port} ({r.name})"
        for r in redirects
        if (r.protocol, R.NODEPORT if r.kind == R.NODEPORT else R.CLUSTER, r.ip, r.port) not in used
    )
    return rows, stale


def render_table(rows: Iterable[ListenerRow], stale: Iterable[str]) -> str:
    out: list[str] = []
    for r in rows:
        mark = "ok" if r.ok else "MISMATCH"
        state = (
            f"listens on :{r.proxy_port}"
            if r.listening
            else f":{r.proxy_port} closed ({'refused' if r.verdict == 'reject' else r.verdict})"
        )
        out.append(
            f"{r.service} {r.protocol.lower()} ({r.scope}) {', '.join(r.addresses)} -> "
            f"{state}  [{mark}]"
        )
        for ep in r.endpoints:
            n = r.stats.get("per_endpoint", {}).get(ep, 0)
            nxt = "  <- next" if ep == r.next else ""
            out.append(f"    {ep:<24} {n:>7} conns{nxt}")
        if r.stats:
            st = r.stats
            out.append(
                f"    accepted {st.get('accepted', 0)}, active {st.get('active', 0)}, "
                f"connect failures {st.get('connect_failures', 0)}, retries {st.get('retries', 0)}"
            )
        for client, pin in sorted(r.affinity.items()):
            out.append(
                f"    affinity {client} -> {pin['endpoint']} ({pin['expires_in']:.0f}s left)"
            )
        out.extend(f"    ! {p}" for p in r.problems)
    out.extend(f"stale rule: {s}  [MISMATCH]" for s in stale)
    return "\n".join(out) + "\n"


def status_command(wanted: Wanted, *, output: str = "table") -> int:
    """`kproxy status` in userspace mode (see the module docstring); exit 0/1/2 as status."""
    from kproxy.backends.netinfo import with_node_addresses
    from kproxy.backends.userspace import wanted_listeners
    from kproxy.config import base_options, node_name
    from kproxy.inspect.status import _families
    from kproxy.inspect.wanted import snapshot_of
    from kproxy.model.view import build_views

    settings = wanted.settings
    snapshot = snapshot_of(wanted)
    agent = agent_listeners()
    if agent is None:
        print("kproxy status: no running agent tells its proxy's state", file=sys.stderr)
        agent = []
    node = node_name(settings)
    rows: list[ListenerRow] = []
    stale: list[str] = []
    sources: list[str] = []
    for family in _families(snapshot):
        options = with_node_addresses(base_options(settings, family=family, node_name=node))
        want = [
            (w, family)
            for views in build_views(snapshot, family=family, node_name=node).values()
            for v in views
            if v.protocol in ("TCP", "UDP")
            for w in wanted_listeners(v, options)
        ]
        redirects, binary = live_redirects(family)
        sources.append(f"{binary} -t nat")
        got_rows, got_stale = compare(want, [a for a in agent if a["family"] == family], redirects)
        rows += got_rows
        stale += got_stale
    if output == "json":
        doc = {
            "mode": "userspace",
            "rules_from": ", ".join(sources),
            "wanted_from": wanted.origin,
            "listeners": [
                {
                    "service": r.service,
                    "protocol": r.protocol,
                    "scope": r.scope,
                    "family": r.family,
                    "addresses": r.addresses,
                    "proxy_port": r.proxy_port,
                    "listening": r.listening,
                    "verdict": r.verdict,
                    "endpoints": r.endpoints,
                    "next": r.next,
                    "affinity": r.affinity,
                    "stats": r.stats,
                    "ok": r.ok,
                    "problems": r.problems,
                }
                for r in rows
            ],
            "stale_rules": stale,
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_table(rows, stale))
        sys.stdout.write(f"wanted state from {wanted.origin}; rules from {', '.join(sources)}\n")
    return 0 if all(r.ok for r in rows) and not stale else 1


# -- explain --------------------------------------------------------------------------------------
def match(
    redirects: Iterable[R.Redirect], *, ip: str, port: int, proto: str, local: Iterable[str]
) -> R.Redirect | None:
    """The REDIRECT rule a new connection to ip:port/proto takes (portals before NodePorts, as
    the hooks are ordered)."""
    proto = proto.upper()
    candidates = [r for r in redirects if r.protocol == proto]
    for r in candidates:
        if r.kind != R.NODEPORT and r.ip == ip and r.port == port:
            return r
    if ip in set(local):
        for r in candidates:
            if r.kind == R.NODEPORT and r.port == port and (not r.ip or r.ip == ip):
                return r
    return None


def explain_text(
    *,
    ip: str,
    port: int,
    proto: str,
    source: str,
    hook: str,
    rule: R.Redirect | None,
    listener: Mapping[str, Any] | None,
    rules_from: str,
) -> str:
    chain = {"OUTPUT": R.PORTALS_HOST, "PREROUTING": R.PORTALS_CONTAINER}[hook]
    out = [
        f"Packet:  {proto.lower()} {source} -> {_hostport(ip, port)}, a new connection",
        f"Rules:   {rules_from} (userspace mode)",
        "",
    ]
    if rule is None:
        out.append(
            "Result:  not a service address: no REDIRECT rule matches, kproxy does not touch it"
        )
        return "\n".join(out) + "\n"
    if rule.kind == R.NODEPORT:
        chain = chain.replace("PORTALS", "NODEPORT")
    out.append(
        f'nat {hook} -> {chain}: "{rule.name}" {rule.address}/{proto.lower()} '
        f"REDIRECT --to-ports {rule.proxy_port}"
    )
    out.append(f"  the kernel rewrites the destination to this node's port {rule.proxy_port}")
    if listener is None:
        out.append("")
        out.append("Result:  no running agent says what listens there (start `kproxy run`)")
        return "\n".join(out) + "\n"
    scope = listener["scope"]
    out.append(
        f"kproxy's userspace proxy, listener {listener['service']} ({scope} traffic), "
        f"port {listener['proxy_port']}:"
    )
    if not listener["listening"]:
        verdict = listener.get("verdict", "reject")
        if verdict == "drop":
            out.append("  no endpoint this node may use: a filter rule drops the connection")
            result = "DROP (the client times out)"
        else:
            out.append(
                "  no endpoints: nothing listens on the port, the kernel resets the connection"
            )
            result = "connection refused (TCP reset / ICMP port unreachable)"
        out += ["", f"Result:  {result}"]
        return "\n".join(out) + "\n"
    eps = listener["endpoints"]
    timeout = listener.get("affinity_timeout") or 0
    out.append(f"  endpoints in round-robin order: {', '.join(eps)}")
    pinned = (listener.get("affinity") or {}).get(source)
    if pinned:
        nxt = pinned["endpoint"]
        why = f"ClientIP affinity: {source} is pinned to it for {pinned['expires_in']:.0f}s more"
    else:
        nxt = listener.get("next")
        why = "round robin: the next in turn"
        if timeout:
            why += f" (then pinned to {source} for {timeout:.0f}s by ClientIP affinity)"
    out.append(f"  the next connection gets {nxt}: {why}")
    out.append(
        "  the proxy connects to it from this node (the endpoint sees the node's address, "
        "never the client's); on a refused or timed-out connect it tries the next endpoint"
    )
    out += ["", f"Result:  proxied to {nxt}"]
    return "\n".join(out) + "\n"


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def explain_command(
    *, ip: str, port: int, proto: str, source: str, hook: str, local: Iterable[str], output: str
) -> int:
    family = ipaddress.ip_address(ip).version
    redirects, binary = live_redirects(family)
    rule = match(redirects, ip=ip, port=port, proto=proto, local=local)
    listener = None
    agent = agent_listeners() if rule is not None else None
    if rule is not None and agent is not None:
        listener = next(
            (a for a in agent if a["family"] == family and a["proxy_port"] == rule.proxy_port),
            None,
        )
    if output == "json":
        doc = {
            "mode": "userspace",
            "packet": {"src": source, "dst": ip, "dport": port, "proto": proto.lower()},
            "hook": hook,
            "rule": None
            if rule is None
            else {
                "name": rule.name,
                "kind": rule.kind,
                "address": rule.address,
                "proxy_port": rule.proxy_port,
            },
            "listener": listener,
            "next": None
            if listener is None
            else ((listener.get("affinity") or {}).get(source) or {}).get("endpoint")
            or listener.get("next"),
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(
        explain_text(
            ip=ip,
            port=port,
            proto=proto,
            source=source,
            hook=hook,
            rule=rule,
            listener=listener,
            rules_from=f"{binary} -t nat",
        )
    )
    return 0
