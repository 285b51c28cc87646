"""Finding the services whose rules iptables-restore refuses, so the others stay programmed.

Validation (kproxy.kube.validate) keeps out what the API server would refuse, but a restore can
still fail because of one service: an object built some other way, a kernel without a match
module, a rule the kernel's checks refuse. One refused line fails the whole input, so without
this one bad service would stop every sync. When a sync fails, the backend asks
`find_rejected` which services are to blame and leaves them out until they change.

Probes are real iptables-restore inputs that leave nothing behind: the services' chains and
their lines in the shared chains, with every "KUBE-" name spelt "KPRB-" (same length, so no
limit is crossed that the real rules would not cross), each chain flushed and deleted again at
the end of the same input. A probe checks exactly what the real restore checks (the tool's
parser, and the kernel's checks at commit) without touching a live chain.

The search is cheapest first, each step only when the one before found nothing:
1. the suspects: the services whose rules hold the line iptables-restore named in its error
   ("Error occurred at line: N"), each probed on its own;
2. every service, in groups of about `max_chains` chains, a failing group halved until single
   services remain (a few probes per bad service on top of one per group);
and both first with the cheap probe (`--test`: parsed, nothing sent to the kernel), then, for
what only the kernel refuses, with the committing one. A control probe (no service at all)
goes first with each: when even that fails (the xtables lock is held, the binary is missing),
nothing is blamed on any service.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from kproxy.backends.rejects import halve
from kproxy.render.iptables import FILTER, NAT, SHARED_SLOTS, ServiceRules

PROBE_PREFIX = "KPRB-"
_CHAIN_REF = re.compile(r"(?:^-A |-j )(KPRB-[A-Z0-9-]+)", re.MULTILINE)

Probe = Callable[[str], str]  # restore input -> "" when accepted, else iptables' error
T = TypeVar("T")


def probe_input(blocks: Sequence[ServiceRules]) -> str:
    """A --noflush restore input that checks `blocks` and leaves the tables as they were."""
    tables: dict[str, list[str]] = {NAT: [], FILTER: []}
    for block in blocks:
        tables[NAT].extend(text for _, text in block.chains)
        for (table, _), text in zip(SHARED_SLOTS, block.shared, strict=True):
            tables[table].append(text)
    out: list[str] = []
    for table, parts in tables.items():
        text = "".join(parts).replace("KUBE-", PROBE_PREFIX)
        chains = sorted(set(_CHAIN_REF.findall(text)))
        if table == NAT and not chains:
            chains = [PROBE_PREFIX + "CONTROL"]  # the control probe: an empty chain
        if not chains:
            continue
        out.append(f"*{table}\n")
        out.extend(f":{c} - [0:0]\n" for c in chains)
        out.append(text)
        out.extend(f"-F {c}\n" for c in chains)
        out.extend(f"-X {c}\n" for c in chains)
        out.append("COMMIT\n")
    return "".join(out)


def _groups(items: Sequence[tuple[T, ServiceRules]], max_chains: int) -> list[list[int]]:
    """Indices of `items` in consecutive groups of at most about `max_chains` chains."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, (_, block) in enumerate(items):
        n = len(block.chains) + 1
        if groups[-1] and size + n > max_chains:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return [g for g in groups if g]


def find_rejected(
    items: Sequence[tuple[T, ServiceRules]],
    probes: Sequence[Probe],
    *,
    suspects: Sequence[T] = (),
    max_chains: int = 2000,
) -> dict[T, str]:
    """The keys of `items` whose block iptables refuses on its own, with iptables' error,
    searched as the module docstring says with each of `probes` in turn.

    Empty when the control probe fails (the failure is not any service's) or when every
    group is accepted (the failure lies elsewhere, e.g. in the shared chains)."""
    blocks = dict(items)
    for probe in probes:
        if probe(probe_input(())):
            continue
        bad = {k: err for k in suspects if k in blocks and (err := probe(probe_input([blocks[k]])))}
        if bad:
            return bad
        bad = _bisect(items, probe, max_chains)
        if bad:
            return bad
    return {}


def suspects_of(items: Sequence[tuple[T, ServiceRules]], line: str) -> list[T]:
    """The keys of `items` whose rules hold `line`, a line of a refused restore input (its
    "-I CHAIN 1"/"-D" edits of shared chains match the block's "-A CHAIN" line)."""
    line = line.strip()
    if line.startswith("-I "):
        chain, _, rest = line[3:].partition(" ")
        line = f"-A {chain} {rest.removeprefix('1 ')}"
    elif line.startswith("-D "):
        line = "-A " + line[3:]
    if line.startswith(":"):
        name = line[1:].split(" ", 1)[0]
        return [k for k, b in items if name in b.names]
    if not line.startswith("-A "):
        return []
    needle = line + "\n"
    return [
        k
        for k, b in items
        if any(needle in text for _, text in b.chains) or any(needle in t for t in b.shared)
    ]


def _bisect(items: Sequence[tuple[T, ServiceRules]], probe: Probe, max_chains: int) -> dict[T, str]:
    def error_of(group: Sequence[int]) -> str:
        return probe(probe_input([items[i][1] for i in group]))

    return {items[i][0]: err for i, err in halve(_groups(items, max_chains), error_of).items()}


def short(name: str, limit: int = 80) -> str:
    """A name for a log line: long names are cut, with their length said."""
    return name if len(name) <= limit else f"{name[:limit]}...({len(name)} chars)"
