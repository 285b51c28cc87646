"""The userspace mode's iptables rules: service addresses -> REDIRECT to kproxy's own proxy ports.

Pure and standard-library only. kube-proxy's userspace mode (pkg/proxy/userspace, removed in
1.26) opened a local port per service port and wrote these chains, with these names and hook
comments, which kproxy keeps so `iptables-save` reads the same:

    nat PREROUTING  -> KUBE-PORTALS-CONTAINER   (first)  traffic from pods and other hosts
    nat OUTPUT      -> KUBE-PORTALS-HOST        (first)  traffic from processes on the node
    nat PREROUTING  -> KUBE-NODEPORT-CONTAINER  (last, -m addrtype --dst-type LOCAL)
    nat OUTPUT      -> KUBE-NODEPORT-HOST       (last, -m addrtype --dst-type LOCAL)
    filter INPUT    -> KUBE-NODEPORT-NON-LOCAL  (first)  accepts new connections to proxy ports

One rule per service address: `-d <ClusterIP|externalIP|LB IP> -p <proto> --dport <port>`
(or `--dport <nodePort>` in the NODEPORT chains) `-j REDIRECT --to-ports <proxy port>`, with the
service port name ("ns/svc:port") as the comment, as kube-proxy wrote it.

Where kproxy differs on purpose:
- The host chains REDIRECT too (to the loopback address), where kube-proxy DNATed to the node's
  primary IP: kube-proxy did that because UDP replies from a socket bound to 0.0.0.0 left with
  the wrong source address; kproxy's UDP proxy answers from the address each datagram arrived
  on (IP_PKTINFO), so REDIRECT works for both and no "host IP" has to be guessed.
- Cluster traffic and external traffic (NodePort, externalIPs, LoadBalancer IPs) go to two
  different proxy ports of one service port, because their endpoints can differ (the traffic
  policies); kube-proxy's userspace mode predates the policies and used one port.
- The external-IP rules carry no `-m physdev ! --physdev-is-in` (bridge-only, and these labs
  route): an external IP is redirected whoever sends to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

NAT = "nat"
FILTER = "filter"

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL = "KUBE-NODEPORT-NON-LOCAL"

NAT_CHAINS = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
FILTER_CHAINS = (NODEPORT_NON_LOCAL,)
OWNED: dict[str, tuple[str, ...]] = {NAT: NAT_CHAINS, FILTER: FILTER_CHAINS}

CLUSTER = "cluster"
EXTERNAL = "external"  # externalIPs and LoadBalancer IPs
NODEPORT = "nodeport"

_PORTALS_COMMENT = (
    '-m comment --comment "handle ClusterIPs; NOTE: this must be before the NodePort rules"'
)
_NODEPORTS_COMMENT = (
    '-m addrtype --dst-type LOCAL -m comment --comment "handle service NodePorts; '
    'NOTE: this must be the last rule in the chain"'
)
_NON_LOCAL_COMMENT = '-m comment --comment "Ensure that non-local NodePort traffic can flow"'


@dataclass(frozen=True, slots=True)
class Hook:
    """A jump from a built-in chain; `first` ones are inserted at the top, others appended."""

    table: str
    chain: str
    spec: str
    first: bool

    @property
    def line(self) -> str:
        """The rule as iptables-save prints it."""
        return f"-A {self.chain} {self.spec}"

    @property
    def insert(self) -> str:
        """The restore line that adds it."""
        return (
            f"-I {self.chain} 1 {self.spec}\n" if self.first else f"-A {self.chain} {self.spec}\n"
        )

    @property
    def delete(self) -> str:
        return f"-D {self.chain} {self.spec}\n"


HOOKS: tuple[Hook, ...] = (
    Hook(NAT, "PREROUTING", f"{_PORTALS_COMMENT} -j {PORTALS_CONTAINER}", True),
    Hook(NAT, "OUTPUT", f"{_PORTALS_COMMENT} -j {PORTALS_HOST}", True),
    Hook(NAT, "PREROUTING", f"{_NODEPORTS_COMMENT} -j {NODEPORT_CONTAINER}", False),
    Hook(NAT, "OUTPUT", f"{_NODEPORTS_COMMENT} -j {NODEPORT_HOST}", False),
    Hook(FILTER, "INPUT", f"{_NON_LOCAL_COMMENT} -j {NODEPORT_NON_LOCAL}", True),
)


@dataclass(frozen=True, slots=True)
class Redirect:
    """One service address redirected to a proxy port.

    kind: CLUSTER (ip = the ClusterIP), EXTERNAL (ip = an externalIP or LB ingress IP) or
    NODEPORT (ip = "" for every local address, else one `--nodeport-addresses` address;
    port = the node port).
    """

    name: str
    protocol: str
    kind: str
    ip: str
    port: int
    proxy_port: int

    @property
    def address(self) -> str:
        """What a client dials, e.g. "10.96.0.80:80", "[fd00::1]:80", "*:30080"."""
        if not self.ip:
            return f"*:{self.port}"
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Drop:
    """A proxy port whose new connections are dropped: the service has endpoints, but none this
    node may use for that traffic (a Local traffic policy), as kube-proxy's DROP verdict."""

    name: str
    protocol: str
    proxy_port: int


def _dst(ip: str) -> str:
    return f"-d {ip}/128 " if ":" in ip else f"-d {ip}/32 "


def _match(r: Redirect, port: int) -> str:
    proto = r.protocol.lower()
    return f'-p {proto} -m comment --comment "{r.name}" -m {proto} --dport {port}'


def rule_lines(
    redirects: Iterable[Redirect], *, drops: Iterable[Drop] = ()
) -> dict[str, list[str]]:
    """chain -> its "-A" lines (in iptables-save's canonical spelling), in a stable order."""
    out: dict[str, list[str]] = {c: [] for c in (*NAT_CHAINS, *FILTER_CHAINS)}
    for d in sorted(drops, key=lambda d: (d.name, d.protocol, d.proxy_port)):
        proto = d.protocol.lower()
        out[NODEPORT_NON_LOCAL].append(
            f'-A {NODEPORT_NON_LOCAL} -p {proto} -m comment --comment "{d.name} has no local '
            f'endpoints" -m {proto} --dport {d.proxy_port} -j DROP'
        )
    non_local: set[tuple[str, str, int]] = set()
    for r in sorted(redirects, key=lambda r: (r.name, r.protocol, r.kind, r.ip, r.port)):
        target = f"-j REDIRECT --to-ports {r.proxy_port}"
        if r.kind == NODEPORT:
            dst = _dst(r.ip) if r.ip else ""
            spec = f"{dst}{_match(r, r.port)} {target}"
            out[NODEPORT_CONTAINER].append(f"-A {NODEPORT_CONTAINER} {spec}")
            out[NODEPORT_HOST].append(f"-A {NODEPORT_HOST} {spec}")
            non_local.add((r.name, r.protocol, r.proxy_port))
            continue
        spec = f"{_dst(r.ip)}{_match(r, r.port)} {target}"
        out[PORTALS_CONTAINER].append(f"-A {PORTALS_CONTAINER} {spec}")
        out[PORTALS_HOST].append(f"-A {PORTALS_HOST} {spec}")
    for name, protocol, proxy_port in sorted(non_local):
        proto = protocol.lower()
        out[NODEPORT_NON_LOCAL].append(
            f'-A {NODEPORT_NON_LOCAL} -p {proto} -m comment --comment "{name}" '
            f"-m {proto} --dport {proxy_port} -m state --state NEW -j ACCEPT"
        )
    return out


def missing_hooks(saved: Mapping[str, str]) -> dict[str, str]:
    """table -> restore lines adding the hooks absent from `saved` (table -> iptables-save)."""
    out: dict[str, str] = {}
    for hook in HOOKS:
        if hook.line not in saved.get(hook.table, "").splitlines():
            out[hook.table] = out.get(hook.table, "") + hook.insert
    return out


def render_restore(
    redirects: Iterable[Redirect], *, hooks: Mapping[str, str], drops: Iterable[Drop] = ()
) -> str:
    """The whole `iptables-restore --noflush` input: every owned chain declared (which flushes
    it) and refilled, plus the missing `hooks` (from `missing_hooks`), atomically per table."""
    lines = rule_lines(redirects, drops=drops)
    parts: list[str] = []
    for table, chains in ((NAT, NAT_CHAINS), (FILTER, FILTER_CHAINS)):
        parts.append(f"*{table}\n")
        parts.extend(f":{c} - [0:0]\n" for c in chains)
        for c in chains:
            parts.extend(line + "\n" for line in lines[c])
        parts.append(hooks.get(table, ""))
        parts.append("COMMIT\n")
    return "".join(parts)


def render_ruleset(redirects: Iterable[Redirect], *, drops: Iterable[Drop] = ()) -> str:
    """The complete restore input for a node with none of the hooks yet (`kproxy render`)."""
    return render_restore(redirects, hooks=missing_hooks({}), drops=drops)


def cleanup_restore(saved: Mapping[str, str]) -> str:
    """The restore input that removes the userspace chains and their hooks from `saved`
    (table -> iptables-save text); "" when there is nothing to remove."""
    parts: list[str] = []
    for table, chains in OWNED.items():
        text = saved.get(table, "")
        present = {line[1:].split(" ", 1)[0] for line in text.splitlines() if line.startswith(":")}
        mine = [c for c in chains if c in present]
        rules = set(text.splitlines())
        hooks = [h for h in HOOKS if h.table == table and h.line in rules]
        if not mine and not hooks:
            continue
        parts.append(f"*{table}\n")
        parts.extend(f":{c} - [0:0]\n" for c in mine)
        parts.extend(h.delete for h in hooks)
        parts.extend(f"-X {c}\n" for c in mine)
        parts.append("COMMIT\n")
    return "".join(parts)


def parse_redirects(saved_nat: str) -> list[Redirect]:
    """The REDIRECT rules of the KUBE-PORTALS-CONTAINER / KUBE-NODEPORT-CONTAINER chains in an
    iptables-save of the nat table (to adopt the proxy ports of an earlier run, and for
    `status`)."""
    out: list[Redirect] = []
    for line in saved_nat.splitlines():
        if not line.startswith(("-A " + PORTALS_CONTAINER + " ", "-A " + NODEPORT_CONTAINER + " ")):
            continue
        words = _split(line)
        chain = words[1]
        opts: dict[str, str] = {}
        for i, w in enumerate(words[:-1]):
            if w in ("-d", "-p", "--comment", "--dport", "--to-ports"):
                opts[w] = words[i + 1]
        if "--to-ports" not in opts or "--dport" not in opts:
            continue
        ip = opts.get("-d", "").split("/", 1)[0]
        kind = NODEPORT if chain == NODEPORT_CONTAINER else CLUSTER
        out.append(
            Redirect(
                name=opts.get("--comment", ""),
                protocol=opts.get("-p", "tcp").upper(),
                kind=kind,
                ip=ip,
                port=int(opts["--dport"]),
                proxy_port=int(opts["--to-ports"].split("-", 1)[0]),
            )
        )
    return out


def _split(line: str) -> list[str]:
    """Words of an iptables-save line; a double-quoted comment is one word (without quotes)."""
    words: list[str] = []
    rest = line
    while rest:
        rest = rest.lstrip()
        if not rest:
            break
        if rest.startswith('"'):
            end = rest.find('"', 1)
            while end > 0 and rest[end - 1] == "\\":
                end = rest.find('"', end + 1)
            if end < 0:
                end = len(rest)
            words.append(rest[1:end])
            rest = rest[end + 1 :]
        else:
            word, _, rest = rest.partition(" ")
            words.append(word)
    return words
