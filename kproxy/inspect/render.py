"""`kproxy render`: print the ruleset kproxy would apply, without root and without the kernel."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kproxy.config import Settings
from kproxy.inspect.common import load_snapshot, offline_options
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView, build_views
from kproxy.render.iptables import render_ruleset


def render_command(settings: Settings, *, family: int = 4) -> int:
    snapshot = load_snapshot(settings)
    options = offline_options(settings, family=family, node=snapshot.node)
    views = build_views(snapshot, family=family, node_name=options.node_name)
    if settings.proxy_mode == "nftables":
        from kproxy.render.nftables import render_ruleset as render_nft

        sys.stdout.write(render_nft(views, options))
        return 0
    if settings.proxy_mode == "userspace":
        sys.stdout.write(render_userspace(views, options))
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


PLACEHOLDER_PORTS = 40000


def render_userspace(views: Mapping[Any, Sequence[ServicePortView]], options: ProxyOptions) -> str:
    """The userspace mode's REDIRECT rules and what its proxy would do behind each port. The
    proxy ports are chosen by the kernel when kproxy runs: here they are numbered from 40000."""
    from kproxy.backends.userspace import wanted_listeners
    from kproxy.model.decisions import Verdict
    from kproxy.render import userspace as R

    redirects: list[R.Redirect] = []
    drops: list[R.Drop] = []
    notes = ["# userspace mode: proxy ports are chosen at run time (numbered from 40000 here)\n"]
    port = PLACEHOLDER_PORTS
    for ref in sorted(views):
        for view in views[ref]:
            if view.protocol not in ("TCP", "UDP"):
                continue
            for w in wanted_listeners(view, options):
                redirects.extend(
                    R.Redirect(w.name, w.protocol, k, ip, p, port) for k, ip, p in w.portals
                )
                if w.verdict == Verdict.DROP and not w.short_circuit:
                    drops.append(R.Drop(w.name, w.protocol, port))
                eps = ", ".join(w.endpoints) or f"none ({w.verdict.value})"
                notes.append(f"#   :{port} {w.name} {w.protocol.lower()} ({w.scope}) -> {eps}\n")
                port += 1
    return "".join(notes) + R.render_ruleset(redirects, drops=drops)
