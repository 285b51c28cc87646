"""Rendered rulesets as the iptables backend installs them, for the packet tracer.

`kproxy render` prints only kproxy's own chains; the backend also puts the hook jumps into the
built-in chains (nat PREROUTING -> KUBE-SERVICES, ...). Tracing rendered text needs both.
"""

from __future__ import annotations

from kproxy.inspect import iptrace as T
from kproxy.model.options import ProxyOptions
from kproxy.render import chains as C
from kproxy.render.ipvs_rules import HOOKS as IPVS_HOOKS
from kproxy.render.ipvs_rules import companion_rules


def hooks_text() -> str:
    """The built-in chains with kproxy's hook jumps, as the backend installs them."""
    out = []
    for table in ("nat", "filter"):
        out.append(f"*{table}\n")
        out.extend(f":{chain} ACCEPT [0:0]\n" for chain in C.BUILTIN[table])
        for chain in C.BUILTIN[table]:
            out.extend(h.line + "\n" for h in C.hooks_for(table, chain))
        out.append("COMMIT\n")
    return "".join(out)


def as_installed(rendered: str) -> T.Ruleset:
    """`rendered` (render_ruleset's text) with the hooks into it, parsed."""
    return T.parse_save(rendered, T.parse_save(hooks_text()))


def ipvs_companions_as_installed(options: ProxyOptions) -> T.Ruleset:
    """The IPVS mode's companion iptables rules with its hook jumps into the built-in chains,
    parsed (the ipsets they match are the caller's: render_desired's `sets`)."""
    builtin = "".join(
        f"*{t}\n"
        + "".join(f":{c} ACCEPT [0:0]\n" for c in C.BUILTIN[t])
        + "".join(f"{h.line}\n" for h in IPVS_HOOKS if h.table == t)
        + "COMMIT\n"
        for t in ("nat", "filter")
    )
    return T.parse_save(companion_rules(options), T.parse_save(builtin))
