"""What the iptables and nftables proxiers share about services their tool refuses: the record
of a refused service, the check that lets a changed service be tried again, and the halving
search that finds the refused services among many (kproxy.backends.iptables_rejects and
kproxy.backends.nftables_rejects build their probes on it)."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from logging import Logger
from typing import Generic, TypeVar

B = TypeVar("B")
K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Rejected(Generic[B]):
    """A service's block its tool refused, and what the tool said."""

    block: B
    error: str


def admitted(
    rejected: MutableMapping[K, Rejected[B]], ref: K, block: B, *, tool: str, name: str, log: Logger
) -> bool:
    """False for a block `tool` already refused; a service whose block changed since is
    forgotten from `rejected` and tried again (`name`: how the log names it)."""
    bad = rejected.get(ref)
    if bad is None:
        return True
    if bad.block == block:
        return False
    del rejected[ref]
    log.info("service %s changed since %s refused it: trying it again", name, tool)
    return True


def halve(
    groups: Sequence[Sequence[int]], error_of: Callable[[Sequence[int]], str]
) -> dict[int, str]:
    """The indices refused on their own, with the error: each group is probed (`error_of`
    returns "" when accepted), a refused group is split in halves, the first half probed
    first, down to single indices."""
    bad: dict[int, str] = {}
    stack = [list(g) for g in reversed(groups)]
    while stack:
        group = stack.pop()
        error = error_of(group)
        if not error:
            continue
        if len(group) == 1:
            bad[group[0]] = error
            continue
        mid = len(group) // 2
        stack.extend((group[mid:], group[:mid]))
    return bad
