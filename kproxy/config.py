"""kproxy's settings: one typed `Settings`, filled from defaults, then the config file, then flags.

Every setting is declared once, as a `Settings` field made by `setting(...)` with its default,
flag, parser, help text and place in a kube-proxy `KubeProxyConfiguration` file
(kubeproxy.config.k8s.io/v1alpha1); `OPTIONS` is read off the fields, and the argparse parser,
the file reader and the generated configuration reference (`kproxy config-reference`) all come
from it, so they cannot drift apart.

The config file is kube-proxy's own format, so an existing kube-proxy config works unchanged,
plus a top-level `kproxy:` section for what kube-proxy does not have (DNS, manifests). Unknown or
invalid fields are errors that name the field; fields kube-proxy has but kproxy does not use are
accepted and reported as ignored.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import yaml

from kproxy.errors import ConfigError as ConfigError  # re-exported: callers import it here
from kproxy.model.options import ProxyOptions

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
MODES = ("iptables", "ipvs", "nftables", "userspace")
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh")


# -- value parsers ---------------------------------------------------------------------------
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """A Go duration ("1m30s", "500ms") or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    text = str(value).strip()
    if text in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"{value!r} is not a duration like 30s or 1m0s")
    return total


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean")


def parse_list(value: Any) -> tuple[str, ...]:
    """A YAML list or a comma-separated string."""
    if value is None:
        return ()
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(str(i).strip() for i in items if str(i).strip())


def parse_cidrs(value: Any) -> tuple[str, ...]:
    out = []
    for item in parse_list(value):
        if item == "primary":  # kube-proxy's special value: the node's primary IPs
            out.append(item)
            continue
        out.append(str(ipaddress.ip_network(item, strict=False)))
    return tuple(out)


def parse_ips(value: Any) -> tuple[str, ...]:
    """At most one IP address per family (kube-proxy's --node-ip-override), canonical."""
    ips = tuple(str(ipaddress.ip_address(item)) for item in parse_list(value))
    if len({ipaddress.ip_address(ip).version for ip in ips}) != len(ips):
        raise ValueError("give at most one IP address per family")
    return ips


def parse_hostport(value: Any) -> str:
    """host:port, [v6]:port or "" (disabled); a bare IP gets kube-proxy's default port later."""
    text = str(value or "").strip()
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port")
    ipaddress.ip_address(host.strip("[]") or "0.0.0.0")
    return text


def parse_mode(value: Any) -> str:
    mode = str(value or "iptables").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{value!r} is not one of {', '.join(MODES)}")
    return mode


def parse_scheduler(value: Any) -> str:
    sched = str(value or "rr").strip()
    if sched not in IPVS_SCHEDULERS:
        raise ValueError(f"{value!r} is not one of {', '.join(IPVS_SCHEDULERS)}")
    return sched


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


def parse_str(value: Any) -> str:
    if isinstance(value, dict | list):
        raise ValueError(f"{value!r} is not a string")
    return "" if value is None else str(value)


def parse_lb_pools(value: Any) -> tuple[str, ...]:
    """Address ranges or CIDRs (a list, or comma-separated), each checked."""
    from kproxy.lb.pools import parse_range

    return tuple(parse_range(item).text for item in parse_list(value))


def parse_choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text

    return parse


# -- the settings ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """How one setting is given: its flag, its parser, its help, and its place in a
    KubeProxyConfiguration file. Declared on the Settings field itself (`setting`)."""

    attr: str
    flag: str
    parse: Callable[[Any], Any]
    help: str
    file_path: str = ""  # dotted path in KubeProxyConfiguration ("iptables.syncPeriod")
    metavar: str = ""
    kind: str = "value"  # value | bool (store_true) | count | negbool (--no-x) | append


def setting(
    default: Any,
    *,
    flag: str,
    parse: Callable[[Any], Any],
    help: str,
    file_path: str = "",
    metavar: str = "",
    kind: str = "value",
) -> Any:
    """A Settings field with its default and how it is given (the field's name fills in
    `Option.attr`)."""
    option = Option("", flag, parse, help, file_path, metavar, kind)
    return field(default=default, metadata={"option": option})


@dataclass(frozen=True)
class Settings:
    """Everything kproxy can be told. Defaults follow kube-proxy where it has the setting."""

    config: str = setting(
        "",
        flag="--config",
        parse=parse_str,
        help="Path to a KubeProxyConfiguration file (YAML).",
        metavar="FILE",
    )
    kubeconfig: str = setting(
        "",
        flag="--kubeconfig",
        parse=parse_str,
        help="Path to a kubeconfig; default: in-cluster service account, else --master.",
        file_path="clientConnection.kubeconfig",
        metavar="FILE",
    )
    master: str = setting(
        "",
        flag="--master",
        parse=parse_str,
        help="Address of the API server (overrides the kubeconfig's server).",
        metavar="URL",
    )
    manifests: str = setting(
        "",
        flag="--manifests",
        parse=parse_str,
        help="Read Services/EndpointSlices/Nodes from YAML in this directory instead of the API.",
        file_path="kproxy.manifests",
        metavar="DIR",
    )
    proxy_mode: str = setting(
        "iptables",
        flag="--proxy-mode",
        parse=parse_mode,
        help="Dataplane: iptables, ipvs, nftables or userspace.",
        file_path="mode",
        metavar="MODE",
    )
    hostname_override: str = setting(
        "",
        flag="--hostname-override",
        parse=parse_str,
        help="This node's name, if not the host name.",
        file_path="hostnameOverride",
        metavar="NAME",
    )
    node_ip_override: tuple[str, ...] = setting(
        (),
        flag="--node-ip-override",
        parse=parse_ips,
        help="This node's primary IPs (one per family), as kube-proxy: a LoadBalancer whose source "
        "ranges contain one also admits its LB IPs as source. Default: any local address "
        "(run), the Node object's InternalIP/ExternalIP addresses (render).",
        file_path="nodeIPOverride",
        metavar="IPS",
    )
    cluster_cidr: tuple[str, ...] = setting(
        (),
        flag="--cluster-cidr",
        parse=parse_cidrs,
        help="Pod CIDR(s), comma-separated; traffic to ClusterIPs from outside is masqueraded.",
        file_path="clusterCIDR",
        metavar="CIDRS",
    )
    masquerade_all: bool = setting(
        False,
        flag="--masquerade-all",
        parse=parse_bool,
        help="Masquerade all traffic sent to Service IPs.",
        file_path="iptables.masqueradeAll",
        kind="bool",
    )
    masquerade_bit: int = setting(
        14,
        flag="--iptables-masquerade-bit",
        parse=parse_int,
        help="The fwmark bit (0-31) that marks packets to masquerade.",
        file_path="iptables.masqueradeBit",
        metavar="BIT",
    )
    nodeport_addresses: tuple[str, ...] = setting(
        (),
        flag="--nodeport-addresses",
        parse=parse_cidrs,
        help="CIDRs of node addresses that accept NodePorts; default: all local addresses.",
        file_path="nodePortAddresses",
        metavar="CIDRS",
    )
    iptables_min_sync_period: float = setting(
        1.0,
        flag="--iptables-min-sync-period",
        parse=parse_duration,
        help="Minimum time between syncs in iptables mode (e.g. 1s).",
        file_path="iptables.minSyncPeriod",
        metavar="DURATION",
    )
    iptables_sync_period: float = setting(
        30.0,
        flag="--iptables-sync-period",
        parse=parse_duration,
        help="Period of the periodic sync in iptables mode (e.g. 30s): a partial sync plus a cheap "
        "check that the tables are still kproxy's (a full rewrite only if they are not).",
        file_path="iptables.syncPeriod",
        metavar="DURATION",
    )
    ipvs_min_sync_period: float = setting(
        0.0,
        flag="--ipvs-min-sync-period",
        parse=parse_duration,
        help="Minimum time between syncs in IPVS mode.",
        file_path="ipvs.minSyncPeriod",
        metavar="DURATION",
    )
    ipvs_sync_period: float = setting(
        30.0,
        flag="--ipvs-sync-period",
        parse=parse_duration,
        help="Period of the periodic sync in IPVS mode (partial, with a cheap drift check).",
        file_path="ipvs.syncPeriod",
        metavar="DURATION",
    )
    full_sync_period: float = setting(
        3600.0,
        flag="--full-sync-period",
        parse=parse_duration,
        help="Period of full rewrites of every service's rules (kube-proxy hard-codes 1h); "
        "0 disables them (full syncs then happen only at start-up, after failures, on "
        "tampering and on node changes).",
        file_path="kproxy.fullSyncPeriod",
        metavar="DURATION",
    )
    ipvs_scheduler: str = setting(
        "rr",
        flag="--ipvs-scheduler",
        parse=parse_scheduler,
        help="Default IPVS scheduler (rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, mh); "
        "per service: annotation kproxy.io/ipvs-scheduler.",
        file_path="ipvs.scheduler",
        metavar="NAME",
    )
    ipvs_tcp_timeout: float = setting(
        0.0,
        flag="--ipvs-tcp-timeout",
        parse=parse_duration,
        help="IPVS TCP session timeout (0 keeps the kernel's).",
        file_path="ipvs.tcpTimeout",
        metavar="DURATION",
    )
    ipvs_tcpfin_timeout: float = setting(
        0.0,
        flag="--ipvs-tcpfin-timeout",
        parse=parse_duration,
        help="IPVS TCP FIN_WAIT timeout (0 keeps the kernel's).",
        file_path="ipvs.tcpFinTimeout",
        metavar="DURATION",
    )
    ipvs_udp_timeout: float = setting(
        0.0,
        flag="--ipvs-udp-timeout",
        parse=parse_duration,
        help="IPVS UDP timeout (0 keeps the kernel's).",
        file_path="ipvs.udpTimeout",
        metavar="DURATION",
    )
    ipvs_strict_arp: bool = setting(
        False,
        flag="--ipvs-strict-arp",
        parse=parse_bool,
        help="IPVS mode: set net.ipv4.conf.all.arp_ignore=1 and arp_announce=2, so the addresses "
        "on kube-ipvs0 are not answered by ARP on other interfaces (what MetalLB's layer-2 mode "
        "needs; implied by --lb-pool in IPVS mode).",
        file_path="ipvs.strictARP",
        kind="bool",
    )
    udp_idle_timeout: float = setting(
        0.25,
        flag="--udp-timeout",
        parse=parse_duration,
        help="Userspace mode: how long an idle UDP client session lives "
        "(kube-proxy's default 250ms).",
        file_path="udpIdleTimeout",
        metavar="DURATION",
    )
    healthz_bind_address: str = setting(
        "0.0.0.0:10256",
        flag="--healthz-bind-address",
        parse=parse_hostport,
        help="ip:port of /healthz and /livez; empty disables.",
        file_path="healthzBindAddress",
        metavar="ADDR",
    )
    metrics_bind_address: str = setting(
        "127.0.0.1:10249",
        flag="--metrics-bind-address",
        parse=parse_hostport,
        help="ip:port of /metrics; empty disables.",
        file_path="metricsBindAddress",
        metavar="ADDR",
    )
    conntrack_udp_cleanup: bool = setting(
        True,
        flag="--conntrack-udp-cleanup",
        parse=parse_bool,
        help="Delete stale UDP conntrack entries after endpoint changes.",
        file_path="kproxy.conntrackUDPCleanup",
        metavar="BOOL",
    )
    cleanup: bool = setting(
        False,
        flag="--cleanup",
        parse=parse_bool,
        help="Remove everything kproxy created, then exit.",
        kind="bool",
    )
    verbosity: int = setting(
        0,
        flag="-v",
        parse=parse_int,
        help="Log verbosity: 0 info, 2+ debug (repeatable).",
        file_path="logging.verbosity",
        metavar="N",
        kind="count",
    )
    log_format: str = setting(
        "text",
        flag="--log-format",
        parse=parse_choice("text", "json"),
        help="Log format: text or json.",
        file_path="logging.format",
        metavar="FORMAT",
    )
    dns: bool = setting(
        True,
        flag="--no-dns",
        parse=parse_bool,
        help="Do not serve cluster DNS.",
        file_path="kproxy.dns.enabled",
        kind="negbool",
    )
    dns_listen: tuple[str, ...] = setting(
        ("169.254.20.10:53",),
        flag="--dns-listen",
        parse=parse_list,
        help="ip:port list the DNS server listens on (node-local, NodeLocal DNSCache style).",
        file_path="kproxy.dns.listen",
        metavar="ADDRS",
    )
    cluster_domain: str = setting(
        "cluster.local",
        flag="--cluster-domain",
        parse=parse_str,
        help="The cluster DNS zone.",
        file_path="kproxy.dns.clusterDomain",
        metavar="ZONE",
    )
    dns_ttl: int = setting(
        5,
        flag="--dns-ttl",
        parse=parse_int,
        help="TTL of cluster DNS answers in seconds.",
        file_path="kproxy.dns.ttl",
        metavar="SECONDS",
    )
    dns_upstream: tuple[str, ...] = setting(
        (),
        flag="--dns-upstream",
        parse=parse_list,
        help="Upstream resolvers for outside names; default: /etc/resolv.conf (minus kproxy).",
        file_path="kproxy.dns.upstream",
        metavar="ADDRS",
    )
    dns_allow_cidrs: tuple[str, ...] = setting(
        (),
        flag="--dns-allow-cidrs",
        parse=parse_cidrs,
        help="Who may use recursion; default: cluster CIDR, node addresses, loopback.",
        file_path="kproxy.dns.allowCIDRs",
        metavar="CIDRS",
    )
    dns_pods: str = setting(
        "insecure",
        flag="--dns-pods",
        parse=parse_choice("insecure", "disabled"),
        help="Pod records a-b-c-d.<ns>.pod.<zone>: insecure or disabled.",
        file_path="kproxy.dns.pods",
        metavar="MODE",
    )
    dns_service_ip: str = setting(
        "",
        flag="--dns-service-ip",
        parse=parse_str,
        help="Also answer on this cluster DNS Service IP (e.g. 10.96.0.10) on this node.",
        file_path="kproxy.dns.serviceIP",
        metavar="IP",
    )
    dns_workers: int = setting(
        1,
        flag="--dns-workers",
        parse=parse_int,
        help="DNS serving processes sharing the sockets (each ~55 MB at 10k services).",
        file_path="kproxy.dns.workers",
        metavar="N",
    )
    lb_pools: tuple[str, ...] = setting(
        (),
        flag="--lb-pool",
        parse=parse_lb_pools,
        help="LoadBalancer address pool: IPv4/IPv6 ranges (A-B) or CIDRs, repeatable; "
        "empty: no address allocation or ARP/NDP announcements (docs/loadbalancer.md).",
        file_path="kproxy.loadBalancer.pools",
        metavar="RANGES",
        kind="append",
    )
    lb_lease_namespace: str = setting(
        "kube-system",
        flag="--lb-lease-namespace",
        parse=parse_str,
        help="Namespace of the allocator's and the agents' Leases (with --lb-pool).",
        file_path="kproxy.loadBalancer.leaseNamespace",
        metavar="NS",
    )
    lb_lease_duration: float = setting(
        2.0,
        flag="--lb-lease-duration",
        parse=parse_duration,
        help="How long a silent agent keeps its addresses and the allocator its role "
        "(whole seconds).",
        file_path="kproxy.loadBalancer.leaseDuration",
        metavar="DURATION",
    )
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @property
    def min_sync_period(self) -> float:
        return (
            self.ipvs_min_sync_period
            if self.proxy_mode == "ipvs"
            else (self.iptables_min_sync_period)
        )

    @property
    def sync_period(self) -> float:
        return self.ipvs_sync_period if self.proxy_mode == "ipvs" else self.iptables_sync_period


OPTIONS: tuple[Option, ...] = tuple(
    replace(f.metadata["option"], attr=f.name) for f in fields(Settings) if "option" in f.metadata
)


def node_name(settings: Settings) -> str:
    """This node's name: --hostname-override, else the host name (lower-cased, as kubelet)."""
    return (settings.hostname_override or socket.gethostname()).strip().lower()


def base_options(settings: Settings, *, family: int, node_name: str) -> ProxyOptions:
    """The ProxyOptions of one family that the settings alone decide (no host reads: the node's
    addresses are filled in by kproxy.backends.netinfo.with_node_addresses)."""

    def of_family(cidrs: Sequence[str]) -> tuple[str, ...]:
        return tuple(
            c for c in cidrs if c != "primary" and ipaddress.ip_network(c).version == family
        )

    return ProxyOptions(
        family=family,
        node_name=node_name,
        nodeport_cidrs=of_family(settings.nodeport_addresses),
        cluster_cidrs=of_family(settings.cluster_cidr),
        masquerade_all=settings.masquerade_all,
        masquerade_bit=settings.masquerade_bit,
        primary_ips=(
            tuple(
                ip for ip in settings.node_ip_override if ipaddress.ip_address(ip).version == family
            )
            if settings.node_ip_override
            else None
        ),
    )


# kube-proxy fields kproxy accepts and ignores (so an existing config loads unchanged).
IGNORED_FIELDS = frozenset(
    {
        "bindAddress",
        "bindAddressHardFail",
        "clientConnection.acceptContentTypes",
        "clientConnection.contentType",
        "clientConnection.qps",
        "clientConnection.burst",
        "configSyncPeriod",
        "conntrack.maxPerCore",
        "conntrack.min",
        "conntrack.tcpEstablishedTimeout",
        "conntrack.tcpCloseWaitTimeout",
        "conntrack.tcpBeLiberal",
        "conntrack.udpTimeout",
        "conntrack.udpStreamTimeout",
        "detectLocalMode",
        "detectLocal.bridgeInterface",
        "detectLocal.interfaceNamePrefix",
        "enableProfiling",
        "featureGates",
        "iptables.localhostNodePorts",
        "ipvs.excludeCIDRs",
        "nftables.masqueradeAll",
        "nftables.masqueradeBit",
        "nftables.minSyncPeriod",
        "nftables.syncPeriod",
        "oomScoreAdj",
        "portRange",
        "showHiddenMetricsForVersion",
        "winkernel",
        "logging.flushFrequency",
        "logging.options",
        "logging.vmodule",
        "windowsRunAsService",
        "syncPeriod",
        "minSyncPeriod",
    }
)
_MAP_FIELDS = frozenset({"featureGates", "winkernel", "logging.options", "logging.vmodule"})
_BY_PATH = {o.file_path: o for o in OPTIONS if o.file_path}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in _MAP_FIELDS and path not in _BY_PATH:
            if not value:
                out[path] = value
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def load_file(path: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Read a KubeProxyConfiguration file -> ({attr: value}, ignored field paths)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_file_data(data, source=path)


def parse_file_data(data: Any, *, source: str = "config") -> tuple[dict[str, Any], tuple[str, ...]]:
    if data is None:
        return {}, ()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a map")
    data = dict(data)
    api_version = data.pop("apiVersion", API_VERSION)
    kind = data.pop("kind", KIND)
    if api_version != API_VERSION:
        raise ConfigError(f"{source}: apiVersion must be {API_VERSION}, not {api_version!r}")
    if kind != KIND:
        raise ConfigError(f"{source}: kind must be {KIND}, not {kind!r}")
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for path, raw in _flatten(data).items():
        option = _BY_PATH.get(path)
        if option is None:
            if path in IGNORED_FIELDS or path.split(".")[0] in _MAP_FIELDS:
                ignored.append(path)
                continue
            raise ConfigError(f"{source}: unknown field {path!r}")
        if raw is None or raw == "":
            continue
        try:
            values[option.attr] = option.parse(raw)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{source}: invalid value for field {path!r}: {err}") from None
    return values, tuple(ignored)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every option as a flag; defaults are None so we can tell what was given."""
    for opt in OPTIONS:
        dest = opt.attr
        if opt.kind == "bool":
            parser.add_argument(
                opt.flag,
                dest=dest,
                nargs="?",
                const=True,
                default=None,
                type=parse_bool,
                metavar="BOOL",
                help=opt.help,
            )
        elif opt.kind == "negbool":
            parser.add_argument(
                opt.flag,
                dest=dest,
                action="store_const",
                const=False,
                default=None,
                help=opt.help,
            )
        elif opt.kind == "append":  # repeatable; values add up
            parser.add_argument(
                opt.flag,
                dest=dest,
                default=None,
                metavar=opt.metavar or None,
                type=_flag_parser(opt),
                action=_Concat,
                help=opt.help,
            )
        elif opt.kind == "count":
            parser.add_argument(
                opt.flag,
                "--v",
                dest=dest,
                type=_verbosity,
                nargs="?",
                const=-1,
                default=None,
                action=_CountOrValue,
                help=opt.help,
            )
        else:
            parser.add_argument(
                opt.flag,
                dest=dest,
                default=None,
                metavar=opt.metavar or None,
                type=_flag_parser(opt),
                help=opt.help,
            )
    return parser


def _verbosity(text: str) -> int:
    return int(text)


class _CountOrValue(argparse.Action):
    """-v, -vv (count) and -v=2 / --v=2 (kube-proxy style) both work."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest) or 0
        setattr(namespace, self.dest, current + 1 if values == -1 else int(values))


class _Concat(argparse.Action):
    """A repeatable flag whose parsed tuples are concatenated."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, tuple(getattr(namespace, self.dest) or ()) + tuple(values))


def _flag_parser(opt: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return opt.parse(text)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = opt.flag
    return parse


def resolve(args: argparse.Namespace | Mapping[str, Any]) -> Settings:
    """Defaults < config file < flags."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    names = {f.name for f in fields(Settings)}
    flags = {k: v for k, v in given.items() if k in names and v is not None}
    settings = Settings()
    config_path = flags.get("config") or ""
    if config_path:
        values, ignored = load_file(config_path)
        settings = replace(settings, **values, ignored=ignored)
    settings = replace(settings, **flags)
    return validate(settings)


def validate(settings: Settings) -> Settings:
    if not 0 <= settings.masquerade_bit <= 31:
        raise ConfigError("iptables.masqueradeBit must be between 0 and 31")
    if settings.sync_period and settings.min_sync_period > settings.sync_period:
        raise ConfigError("the min sync period must not exceed the sync period")
    if settings.dns_ttl < 0 or settings.dns_ttl > 3600:
        raise ConfigError("kproxy.dns.ttl must be between 0 and 3600")
    if settings.dns_workers < 1:
        raise ConfigError("kproxy.dns.workers must be at least 1")
    if settings.manifests and (settings.kubeconfig or settings.master):
        raise ConfigError("--manifests cannot be combined with --kubeconfig/--master")
    for addr in settings.dns_listen:
        parse_hostport(addr)
    if settings.dns_service_ip:
        ipaddress.ip_address(settings.dns_service_ip)
    if settings.lb_pools:
        from kproxy.lb.pools import Pools

        try:
            Pools.parse(settings.lb_pools)
        except ValueError as err:
            raise ConfigError(f"kproxy.loadBalancer.pools: {err}") from None
    if not 1 <= settings.lb_lease_duration <= 300:
        raise ConfigError("kproxy.loadBalancer.leaseDuration must be between 1s and 300s")
    return settings


def reference_markdown(options: Sequence[Option] = OPTIONS) -> str:
    """The configuration reference (docs/configuration.md is generated from this)."""
    defaults = Settings()
    lines = [
        "# Configuration reference",
        "",
        "Generated by `kproxy config-reference` from `kproxy/config.py`; do not edit by hand.",
        "Precedence: flags > the `--config` file > defaults. The file is a kube-proxy",
        f"`{KIND}` (`{API_VERSION}`); kproxy's own settings live under `kproxy:`.",
        "",
        "| flag | config file field | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for opt in options:
        default = getattr(defaults, opt.attr)
        if isinstance(default, tuple):
            default = ",".join(default)
        shown = "" if default in ("", ()) else f"`{default}`"
        field_name = f"`{opt.file_path}`" if opt.file_path else ""
        lines.append(f"| `{opt.flag}` | {field_name} | {shown} | {opt.help} |")
    lines += [
        "",
        "Accepted from kube-proxy configs and ignored: "
        + ", ".join(f"`{f}`" for f in sorted(IGNORED_FIELDS))
        + ".",
        "",
    ]
    return "\n".join(lines)
