"""`kproxy render`: print the ruleset kproxy would apply, without root and without the kernel."""

from __future__ import annotations

import sys

from kproxy.config import Settings
from kproxy.inspect.common import load_snapshot, offline_options
from kproxy.model.view import build_views
from kproxy.render.iptables import render_ruleset


def render_command(settings: Settings, *, family: int = 4) -> int:
    snapshot = load_snapshot(settings)
    options = offline_options(settings, family=family)
    views = build_views(snapshot, family=family, node_name=options.node_name)
    if settings.proxy_mode == "ipvs":
        from kproxy.render.ipvs import describe_desired

        sys.stdout.write(describe_desired(views, options, scheduler=settings.ipvs_scheduler))
        return 0
    sys.stdout.write(render_ruleset(views, options))
    return 0
