"""IPVS mode's companion iptables rules: fixed chains whose size does not depend on the number
of services (everything per service lives in ipsets, see kproxy.render.ipvs).

Pure and standard-library only. nat: masquerade traffic to ClusterIPs from outside the cluster
CIDRs (or every such packet with masquerade_all), to externalIPs and LoadBalancer IPs with Cluster
policy, to NodePorts except Local ones, and hairpin traffic (KUBE-LOOP-BACK: a pod reaching
itself through a VIP). filter: loadBalancerSourceRanges (KUBE-PROXY-FIREWALL ->
KUBE-SOURCE-RANGES-FIREWALL), health-check node ports, kube-proxy's KUBE-IPVS-FILTER (no new
connections to ports of a VIP that no service uses) and kproxy's no-endpoint verdicts at its top.

Chain names and the hook jumps are kube-proxy's (pkg/proxy/ipvs/proxier.go), so `iptables -S`
reads the same under both; rules are written in the canonical form `iptables-save` prints.

Where kproxy differs from kube-proxy on purpose: externalIP traffic is ACCEPTed in nat
KUBE-SERVICES after its mark (kube-proxy used a physdev match, which needs br_netfilter); every
service category is ACCEPTed before the NodePort jump, so a ClusterIP port that happens to equal a
nodePort is not masqueraded; node-originated traffic to a LoadBalancer IP with source ranges is not
filtered (kube-proxy's per-entry KUBE-IPVS-OUT-FILTER rules would make the rule count grow with
services); no-endpoint verdicts match only new connections, so draining ones are not cut.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from kproxy.model.objects import IPV6
from kproxy.model.options import ProxyOptions
from kproxy.render import chains as C
from kproxy.render.ipvs import (
    CLUSTER_IP_SET,
    EXTERNAL_IP_LOCAL,
    EXTERNAL_IP_SET,
    EXTERNAL_NO_LOCAL,
    HEALTH_CHECK_NODE_PORT,
    IPVS_IPS,
    LB_FW,
    LB_LOCAL,
    LB_SET,
    LB_SOURCE_CIDR,
    LB_SOURCE_IP,
    LOOP_BACK,
    NO_ENDPOINTS,
    NO_LOCAL_ENDPOINTS,
    NODE_PORT_LOCAL_SCTP,
    NODE_PORT_LOCAL_SETS,
    NODE_PORT_SCTP,
    NODE_PORT_SETS,
    SETS,
)

NAT = "nat"
FILTER = "filter"

# chains of IPVS mode
NODE_PORT_CHAIN = "KUBE-NODE-PORT"  # nat and filter
LOAD_BALANCER_CHAIN = "KUBE-LOAD-BALANCER"  # nat
SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"  # filter
IPVS_FILTER = "KUBE-IPVS-FILTER"  # filter
IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"  # filter (kube-proxy's; kproxy leaves it empty)
EXTERNAL_NO_LOCAL_CHAIN = "KUBE-EXTERNAL-NO-LOCAL"  # filter, kproxy's

NAT_CHAINS = (C.SERVICES, C.POSTROUTING, NODE_PORT_CHAIN, LOAD_BALANCER_CHAIN, C.MARK_MASQ)
FILTER_CHAINS = (
    C.FORWARD,
    NODE_PORT_CHAIN,
    C.PROXY_FIREWALL,
    SOURCE_RANGES_FIREWALL,
    IPVS_FILTER,
    EXTERNAL_NO_LOCAL_CHAIN,
)
# everything cleanup removes (IPVS mode's chains, including kube-proxy's)
CLEANUP_CHAINS: Mapping[str, tuple[str, ...]] = {
    NAT: (*NAT_CHAINS, C.MASQ_OFF_CLUSTER),
    FILTER: (*FILTER_CHAINS, IPVS_OUT_FILTER),
}

# The jumps from built-in chains, kube-proxy's iptablesJumpChain. Each is inserted at the top of
# its chain in this order, so the last one listed for a chain ends up first.
HOOKS: tuple[C.Hook, ...] = (
    C.Hook(NAT, "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    C.Hook(NAT, "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    C.Hook(
        NAT,
        "POSTROUTING",
        '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
    ),
    C.Hook(FILTER, "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
    C.Hook(
        FILTER, "INPUT", '-m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT'
    ),
    C.Hook(
        FILTER, "INPUT", '-m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL'
    ),
    C.Hook(
        FILTER,
        "FORWARD",
        '-m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
    ),
    C.Hook(
        FILTER, "INPUT", '-m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER'
    ),
)
# kube-proxy's hook into its KUBE-IPVS-OUT-FILTER: removed by cleanup, never created
LEGACY_HOOKS: tuple[C.Hook, ...] = (
    C.Hook(
        FILTER,
        "OUTPUT",
        '-m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER',
    ),
)


def hooks_for(table: str, chain: str) -> tuple[C.Hook, ...]:
    """The hooks of one built-in chain, in the order they appear in it once installed."""
    return tuple(reversed([h for h in HOOKS if h.table == table and h.chain == chain]))


def _cidrs(options: ProxyOptions) -> tuple[str, ...]:
    out = []
    for c in options.cluster_cidrs:
        net = ipaddress.ip_network(c.strip(), strict=False)
        if net.version == options.family:
            out.append(str(net))
    return tuple(out)


def companion_rules(options: ProxyOptions, *, random_fully: bool = True) -> str:
    """The iptables-restore text (for `--noflush`) of IPVS mode's chains: nat, then filter.

    Its size does not depend on the number of services (everything per service is in ipsets).
    Rules are written in the canonical form `iptables-save` prints them in.
    """
    fam = options.family
    S = {s.base: s.name(fam) for s in SETS}
    cmt = {s.base: f'-m comment --comment "{s.comment}"' for s in SETS}
    mark = f"{1 << options.masquerade_bit:#x}"
    loopback = "::1/128" if fam == IPV6 else "127.0.0.0/8"
    cidrs = _cidrs(options)

    def match(base: str, dirs: str) -> str:
        return f"-m set --match-set {S[base]} {dirs}"

    nat: list[str] = ["*nat\n"]
    nat.extend(f":{c} - [0:0]\n" for c in NAT_CHAINS)
    if len(cidrs) > 1 and not options.masquerade_all:
        nat.append(f":{C.MASQ_OFF_CLUSTER} - [0:0]\n")

    svc = f"-A {C.SERVICES}"
    nat.append(f"{svc} -s {loopback} -j RETURN\n")
    nat.append(f"{svc} {cmt[LB_SET]} {match(LB_SET, 'dst,dst')} -j {LOAD_BALANCER_CHAIN}\n")
    nat.append(f"{svc} {cmt[LB_SET]} {match(LB_SET, 'dst,dst')} -j ACCEPT\n")
    cip = f"{cmt[CLUSTER_IP_SET]} {match(CLUSTER_IP_SET, 'dst,dst')}"
    if options.masquerade_all:
        nat.append(f"{svc} {cip} -j {C.MARK_MASQ}\n")
    elif len(cidrs) == 1:
        nat.append(f"{svc} ! -s {cidrs[0]} {cip} -j {C.MARK_MASQ}\n")
    elif cidrs:
        nat.append(f"{svc} {cip} -j {C.MASQ_OFF_CLUSTER}\n")
    else:
        # No cluster CIDR known: masquerade node traffic whose source is a VIP (the kernel picks
        # an address of kube-ipvs0 as source when it connects to a VIP), as kube-proxy does.
        nat.append(
            f"{svc} {cmt[CLUSTER_IP_SET]} {match(CLUSTER_IP_SET, 'src,dst')} -j {C.MARK_MASQ}\n"
        )
    nat.append(f"{svc} {cip} -j ACCEPT\n")
    eip = f"{cmt[EXTERNAL_IP_SET]} {match(EXTERNAL_IP_SET, 'dst,dst')}"
    nat.append(f"{svc} {eip} -j {C.MARK_MASQ}\n")
    nat.append(f"{svc} {eip} -j ACCEPT\n")
    nat.append(f"{svc} {cmt[EXTERNAL_IP_LOCAL]} {match(EXTERNAL_IP_LOCAL, 'dst,dst')} -j ACCEPT\n")
    if options.nodeport_ips is None:
        nat.append(f"{svc} -m addrtype --dst-type LOCAL -j {NODE_PORT_CHAIN}\n")
    else:
        for text in options.nodeport_ips:
            ip = ipaddress.ip_address(text)
            if ip.version == fam and not ip.is_loopback:
                nat.append(f"{svc} -d {ip}/{ip.max_prefixlen} -j {NODE_PORT_CHAIN}\n")

    lbc = f"-A {LOAD_BALANCER_CHAIN}"
    nat.append(f"{lbc} {cmt[LB_LOCAL]} {match(LB_LOCAL, 'dst,dst')} -j RETURN\n")
    nat.append(f"{lbc} -j {C.MARK_MASQ}\n")

    npc = f"-A {NODE_PORT_CHAIN}"
    for proto in ("tcp", "udp"):
        local, cluster = NODE_PORT_LOCAL_SETS[proto.upper()], NODE_PORT_SETS[proto.upper()]
        nat.append(f"{npc} -p {proto} {cmt[local]} {match(local, 'dst')} -j RETURN\n")
        nat.append(f"{npc} -p {proto} {cmt[cluster]} {match(cluster, 'dst')} -j {C.MARK_MASQ}\n")
    nat.append(
        f"{npc} -p sctp {cmt[NODE_PORT_LOCAL_SCTP]} {match(NODE_PORT_LOCAL_SCTP, 'dst,dst')} "
        "-j RETURN\n"
    )
    nat.append(
        f"{npc} -p sctp {cmt[NODE_PORT_SCTP]} {match(NODE_PORT_SCTP, 'dst,dst')} -j {C.MARK_MASQ}\n"
    )

    post = f"-A {C.POSTROUTING}"
    nat.append(f"{post} {cmt[LOOP_BACK]} {match(LOOP_BACK, 'dst,dst,src')} -j MASQUERADE\n")
    nat.append(f"{post} -m mark ! --mark {mark}/{mark} -j RETURN\n")
    nat.append(f"{post} -j MARK --set-xmark {mark}/0x0\n")
    nat.append(
        f'{post} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        f"{' --random-fully' if random_fully else ''}\n"
    )
    nat.append(f"-A {C.MARK_MASQ} -j MARK --set-xmark {mark}/{mark}\n")
    if len(cidrs) > 1 and not options.masquerade_all:
        nat.extend(f"-A {C.MASQ_OFF_CLUSTER} -s {c} -j RETURN\n" for c in cidrs)
        nat.append(f"-A {C.MASQ_OFF_CLUSTER} -j {C.MARK_MASQ}\n")
    nat.append("COMMIT\n")

    flt: list[str] = ["*filter\n"]
    flt.extend(f":{c} - [0:0]\n" for c in FILTER_CHAINS)
    fwd = f"-A {C.FORWARD}"
    flt.append(
        f'{fwd} -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} '
        "-j ACCEPT\n"
    )
    flt.append(
        f'{fwd} -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        "--ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    )
    hc = HEALTH_CHECK_NODE_PORT
    flt.append(f"-A {NODE_PORT_CHAIN} {cmt[hc]} {match(hc, 'dst')} -j ACCEPT\n")
    flt.append(
        f"-A {C.PROXY_FIREWALL} {cmt[LB_FW]} {match(LB_FW, 'dst,dst')} "
        f"-j {SOURCE_RANGES_FIREWALL}\n"
    )
    srf = f"-A {SOURCE_RANGES_FIREWALL}"
    flt.append(f"{srf} {cmt[LB_SOURCE_CIDR]} {match(LB_SOURCE_CIDR, 'dst,dst,src')} -j RETURN\n")
    flt.append(f"{srf} {cmt[LB_SOURCE_IP]} {match(LB_SOURCE_IP, 'dst,dst,src')} -j RETURN\n")
    flt.append(f"{srf} -j DROP\n")
    ipf = f"-A {IPVS_FILTER}"
    new = "-m conntrack --ctstate NEW"
    reject = "-j REJECT --reject-with " + (
        "icmp6-port-unreachable" if fam == IPV6 else "icmp-port-unreachable"
    )
    flt.append(f"{ipf} {cmt[NO_ENDPOINTS]} {new} {match(NO_ENDPOINTS, 'dst,dst')} {reject}\n")
    flt.append(
        f"{ipf} {cmt[NO_LOCAL_ENDPOINTS]} {new} {match(NO_LOCAL_ENDPOINTS, 'dst,dst')} -j DROP\n"
    )
    flt.append(f"{ipf} {new} {match(EXTERNAL_NO_LOCAL, 'dst,dst')} -j {EXTERNAL_NO_LOCAL_CHAIN}\n")
    for base in (LB_SET, CLUSTER_IP_SET, EXTERNAL_IP_SET, EXTERNAL_IP_LOCAL):
        flt.append(f"{ipf} {match(base, 'dst,dst')} -j RETURN\n")
    flt.append(f"{ipf} {match(hc, 'dst')} -j RETURN\n")
    flt.append(f"{ipf} {new} {match(IPVS_IPS, 'dst')} {reject}\n")
    enl = f"-A {EXTERNAL_NO_LOCAL_CHAIN}"
    flt.extend(f"{enl} -s {c} -j RETURN\n" for c in cidrs)
    flt.append(f"{enl} -m addrtype --src-type LOCAL -j RETURN\n")
    flt.append(f"{enl} {cmt[EXTERNAL_NO_LOCAL]} -j DROP\n")
    flt.append("COMMIT\n")
    return "".join(nat) + "".join(flt)
