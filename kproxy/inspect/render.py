"""`kproxy render`: print the ruleset kproxy would apply, without root and without the kernel."""

from __future__ import annotations

import sys

from kproxy.config import Settings
from kproxy.inspect.common import load_snapshot, offline_options
from kproxy.model.view import build_views
from kproxy.render.iptables import render_ruleset


def render_command(settings: Settings, *, family: int = 4) -> int:
    snapshot = load_snapshot(settings)
    options = offline_options(settings, family=family, node=snapshot.node)
    views = build_views(snapshot, family=family, node_name=options.node_name)
    if settings.proxy_mode == "nftables":
        from kproxy.render.nftables import render_ruleset as render_nft

        sys.stdout.write(render_nft(views, options))
        return 0
    if settings.proxy_mode == "ipvs":
        from kproxy.render.ipvs import ipvsadm_rules, render_desired
        from kproxy.render.ipvs_rules import companion_rules

        desired = render_desired(views, options, scheduler=settings.ipvs_scheduler)
        out = [
            "# IPVS virtual servers (ipvsadm -R input)\n",
            ipvsadm_rules(desired.servers.values()),
        ]
        out.append("# addresses bound on kube-ipvs0\n")
        out.extend(f"#   {ip}\n" for ip in sorted(desired.bind))
        out.append("# ipsets\n")
        for name, entries in sorted(desired.sets.items()):
            out.append(f"#   {name}: {' '.join(sorted(entries)) or '(empty)'}\n")
        out.append("# companion iptables rules (iptables-restore input)\n")
        out.append(companion_rules(options))
        sys.stdout.write("".join(out))
        return 0
    sys.stdout.write(render_ruleset(views, options))
    return 0
