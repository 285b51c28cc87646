"""IPVS mode's companion iptables rules in the kernel: written with one `iptables-restore
--noflush`, hooked into the built-in chains idempotently, removed by cleanup.

The rule text comes from `kproxy.render.ipvs_rules` and does not depend on the number of
services, so it is rewritten whole on every full sync (it is a few dozen rules) and never on a
partial one. Declaring a chain in a `--noflush` restore flushes it first, so a rewrite replaces
kproxy's chains atomically without touching anything else in the tables. Hooks (jumps from
PREROUTING, INPUT, ...) live in chains other software shares: they are inserted only when
missing, in the same restore.

The flavour, binaries, save and restore are the iptables mode's own
(kproxy.backends.iptables_exec), so both modes pick the same flavour by the same rule.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable

from kproxy.backends.iptables_exec import (
    FLAVOURS,
    binary,
    detect_flavour,
    restore_noflush,
    save_all,
)
from kproxy.model.options import ProxyOptions
from kproxy.render import chains as C
from kproxy.render import ipvs_rules as RR

log = logging.getLogger("kproxy.ipvs")


def _by_table(text: str, keep: Callable[[str], str | None]) -> dict[str, set[str]]:
    """table -> what `keep` takes from each line of an iptables-save text (None: skip it)."""
    out: dict[str, set[str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            out.setdefault(table, set())
        elif table and (got := keep(line)) is not None:
            out[table].add(got)
    return out


def _chains(text: str) -> dict[str, set[str]]:
    """table -> chain names declared in an iptables-save text."""
    return _by_table(text, lambda ln: ln[1:].split()[0] if ln.startswith(":") else None)


def _rules(text: str) -> dict[str, set[str]]:
    """table -> "-A CHAIN ..." lines of an iptables-save text."""
    return _by_table(text, lambda ln: ln.strip() if ln.startswith("-A ") else None)


def _missing_hooks(current: str) -> dict[str, list[str]]:
    """table -> "-I CHAIN 1 ..." lines for the hooks `current` (an iptables-save) lacks."""
    present = _rules(current)
    out: dict[str, list[str]] = {}
    for hook in RR.HOOKS:
        if hook.line not in present.get(hook.table, set()):
            out.setdefault(hook.table, []).append(f"-I {hook.chain} 1 {hook.spec}\n")
    return out


def rule_counts(text: str) -> dict[str, int]:
    """table -> number of "-A" rules in an iptables-restore text."""
    out: dict[str, int] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            out[table] = 0
        elif line.startswith("-A ") and table:
            out[table] += 1
    return out


class CompanionRules:
    """Writes the companion rules of one family with the detected (or given) flavour."""

    def __init__(
        self, options: ProxyOptions, *, flavour: str | None = None, random_fully: bool = True
    ) -> None:
        self.options = options
        self.family = options.family
        self.flavour = flavour or detect_flavour(options.family)
        self.random_fully = random_fully
        self.writes = 0

    def text(self) -> str:
        return RR.companion_rules(self.options, random_fully=self.random_fully)

    def apply(self) -> dict[str, int]:
        """Rewrite kproxy's chains and insert missing hooks in one restore; returns the rule
        count per table."""
        body = self.text()
        current = save_all(self.family, self.flavour)
        hooks = _missing_hooks(current)
        out: list[str] = []
        for block in body.split("COMMIT\n"):
            if not block.strip():
                continue
            table = block.split("\n", 1)[0].lstrip("*").strip()
            out.append(block)
            out.extend(hooks.pop(table, []))
            out.append("COMMIT\n")
        restore_noflush(self.family, self.flavour, "".join(out))
        self.writes += 1
        if hooks:
            log.warning("hooks for tables without kproxy chains were skipped: %s", sorted(hooks))
        return rule_counts(body)

    def present(self) -> bool:
        """True when every kproxy chain and hook is in place (a cheap drift check)."""
        current = save_all(self.family, self.flavour)
        chains = _chains(current)
        declared = set(RR.NAT_CHAINS) <= chains.get("nat", set()) and set(
            RR.FILTER_CHAINS
        ) <= chains.get("filter", set())
        return declared and not _missing_hooks(current)


def cleanup_rules(families: Iterable[int] = (4, 6)) -> list[str]:
    """Remove IPVS mode's hooks and chains (kproxy's and kube-proxy's names) from every
    flavour and family that has them; returns "family/flavour/table/chain" of what went."""
    removed: list[str] = []
    for family in families:
        for flavour in FLAVOURS:
            if not shutil.which(binary(family, flavour, "restore")):
                continue
            current = save_all(family, flavour)
            text, gone = _cleanup_text(current)
            if not text:
                continue
            restore_noflush(family, flavour, text)
            removed.extend(f"ipv{family}/{flavour}/{g}" for g in gone)
    return removed


def _cleanup_text(current: str) -> tuple[str, list[str]]:
    chains = _chains(current)
    rules = _rules(current)
    out: list[str] = []
    gone: list[str] = []
    for table, names in RR.CLEANUP_CHAINS.items():
        have = chains.get(table, set())
        mine = [n for n in names if n in have]
        hooks = [
            h
            for h in (*RR.HOOKS, *RR.LEGACY_HOOKS)
            if h.table == table and h.line in rules.get(table, set())
        ]
        if not mine and not hooks:
            continue
        out.append(f"*{table}\n")
        out.extend(f":{n} - [0:0]\n" for n in mine)  # declaring flushes
        out.extend(f"-D {h.chain} {h.spec}\n" for h in hooks)
        # a chain still referenced from elsewhere (e.g. iptables mode's rules) cannot go
        referenced = {
            line.rsplit("-j ", 1)[-1].split()[0]
            for line in rules.get(table, set())
            if line.split()[1] not in mine and line not in {h.line for h in hooks}
        }
        for n in mine:
            if n in referenced or n in C.BUILTIN.get(table, ()):
                continue
            out.append(f"-X {n}\n")
            gone.append(f"{table}/{n}")
        out.append("COMMIT\n")
    return "".join(out), gone
