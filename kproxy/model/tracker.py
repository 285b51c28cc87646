"""Previous and current views of the services that changed, as kube-proxy's change trackers
hand them to its proxier.

The store hands out a snapshot and the set of services that changed since the last one;
`ViewTracker.advance` turns that into the views each changed service had at the previous
advance and has now (one IP family). Between advances it keeps only the views `keep` says later
work reads again: at 10k services x 10 endpoints all views are ~15 MB, and a plain TCP service
with cluster traffic policies needs none (see kproxy.runtime.followups). A service whose views
were not kept reads as having had none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from kproxy.model.objects import Ref
from kproxy.model.store import Snapshot
from kproxy.model.view import ServicePortView, build_views

Views = tuple[ServicePortView, ...]


@dataclass(frozen=True, slots=True)
class ViewChanges:
    """The views of the same refs before and after one advance (a ref missing from `previous`
    or mapped to `()` had no service ports; likewise in `current`)."""

    previous: Mapping[Ref, Views]
    current: Mapping[Ref, Views]


class ViewTracker:
    """Remembers the views of one IP family across syncs. Not thread-safe (the sync loop's)."""

    def __init__(
        self, *, family: int, node_name: str, keep: Callable[[Views], bool] = bool
    ) -> None:
        self.family = family
        self.node_name = node_name
        self._keep = keep
        self._known: dict[Ref, Views] = {}

    @property
    def known(self) -> Mapping[Ref, Views]:
        """The views kept at the last advance (the services `keep` accepted)."""
        return self._known

    def advance(
        self, snapshot: Snapshot, refs: Iterable[Ref] | None, *, forget: bool = False
    ) -> ViewChanges:
        """Move to `snapshot`. `refs`: the services that changed; None for all of them (and
        every remembered one, so deleted services show up). `forget`: report nothing as the
        previous state (a reconcile after trouble)."""
        wanted = set(snapshot.services) | set(self._known) if refs is None else set(refs)
        current = dict(
            build_views(snapshot, family=self.family, node_name=self.node_name, refs=wanted)
        )
        known = self._known
        previous = {} if forget else {ref: known.get(ref, ()) for ref in wanted}
        for ref, views in current.items():
            if self._keep(views):
                known[ref] = views
            else:
                known.pop(ref, None)
        return ViewChanges(previous=previous, current=current)
