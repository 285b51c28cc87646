"""Previous and current views of the services that changed, as kube-proxy's change trackers
hand them to its proxier.

The store hands out a snapshot and the set of services that changed since the last one;
`ViewTracker.advance` turns that into the views each changed service had at the previous
advance and has now (one IP family). Between advances it keeps only the views `keep` says later
work reads again: at 10k services x 10 endpoints all views are ~15 MB, and a plain TCP service
with cluster traffic policies needs none (see kproxy.runtime.followups). A service whose views
were not kept reads as having had none.

`relevant` says the same per Service, before any view is built: a changed service it rejects
that was not remembered either is left out of the advance altogether (neither previous nor
current), since its views would be neither kept nor compared with anything. At 10k plain TCP
services a full advance then builds no view at all (it built all of them: ~0.1-0.3 s of CPU
and ~13 MB held at once, after every full sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from kproxy.model.objects import Ref, Service
from kproxy.model.store import Snapshot
from kproxy.model.view import ServicePortView, build_views

Views = tuple[ServicePortView, ...]


@dataclass(frozen=True, slots=True)
class ViewChanges:
    """The views of the same refs before and after one advance (a ref missing from `previous`
    or mapped to `()` had no service ports; likewise in `current`; a ref missing from both was
    not relevant, see ViewTracker)."""

    previous: Mapping[Ref, Views]
    current: Mapping[Ref, Views]


class ViewTracker:
    """Remembers the views of one IP family across syncs. Not thread-safe (the sync loop's)."""

    def __init__(
        self,
        *,
        family: int,
        node_name: str,
        keep: Callable[[Views], bool] = bool,
        relevant: Callable[[Service], bool] | None = None,
    ) -> None:
        self.family = family
        self.node_name = node_name
        self._keep = keep
        self._relevant = relevant
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
        known = self._known
        wanted = set(snapshot.services) | set(known) if refs is None else set(refs)
        relevant = self._relevant
        if relevant is not None:
            services = snapshot.services
            wanted = {
                ref
                for ref in wanted
                if ref in known or ((svc := services.get(ref)) is not None and relevant(svc))
            }
        current = dict(
            build_views(snapshot, family=self.family, node_name=self.node_name, refs=wanted)
        )
        previous = {} if forget else {ref: known.get(ref, ()) for ref in wanted}
        for ref, views in current.items():
            if self._keep(views):
                known[ref] = views
            else:
                known.pop(ref, None)
        return ViewChanges(previous=previous, current=current)
