"""Finding the services whose nftables content nft or the kernel refuses, so the others stay
programmed (the nftables counterpart of kproxy.backends.iptables_rejects).

A full sync is one transaction: one refused command fails it all, and without this one bad
service would stop every sync. Validation (kproxy.kube.validate) keeps out what the API server
would refuse, so a refusal comes from elsewhere: an object built some other way (a name past
nf_tables' 256-character limit), or the table itself, which other programs can write into (a
set left under a service's map name with another type, say).

Probes are `nft --check` runs of a full sync's input holding only some services: nft parses
it and sends the whole batch to the kernel, which checks every command against the live table
and then aborts it. A probe therefore checks what the real sync checks and leaves nothing
behind. The search, cheapest first:
1. a control probe with no service at all: when even that fails, no service is to blame;
2. the suspects (the services whose input holds the line nft quoted under its error), each on
   its own;
3. all services, halved while a half fails, down to single services.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from kproxy.backends.rejects import halve
from kproxy.render.nftables import ServiceBlock

T = TypeVar("T")
Check = Callable[[Sequence[ServiceBlock]], str]  # blocks -> "" when accepted, else nft's error


def find_refused(
    items: Sequence[tuple[T, ServiceBlock]],
    check: Check,
    *,
    suspects: Sequence[T] = (),
) -> dict[T, str]:
    """The keys of `items` whose block is refused on its own, with the error; empty when the
    control probe fails or no service is to blame (see the module docstring)."""
    if check(()):
        return {}
    blocks = dict(items)
    bad = {k: err for k in suspects if k in blocks and (err := check([blocks[k]]))}
    if bad:
        return bad
    groups = [range(len(items))] if items else []
    found = halve(groups, lambda group: check([items[i][1] for i in group]))
    return {items[i][0]: err for i, err in found.items()}


def suspects_of(
    items: Sequence[tuple[T, ServiceBlock]], error: str, text: Callable[[ServiceBlock], str]
) -> list[T]:
    """The keys of `items` whose input (`text(block)`) holds a command nft quoted in `error`
    (nft prints the refused line under its message; RestoreFailed joins lines with " | ")."""
    quoted = {
        part.strip()
        for line in error.splitlines()
        for part in line.split(" | ")
        if part.strip().startswith(("add ", "delete ", "flush "))
    }
    if not quoted:
        return []
    return [k for k, b in items if any(f"{q}\n" in text(b) for q in quoted)]
