"""The sync triggers and pacing (kproxy.runtime.runner) on a fake clock: which syncs run when,
which are full and which partial, what a failure does, and the token bucket's burst."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import pytest

from kproxy.runtime.runner import SyncLoop, SyncPlan, SyncSchedule


@dataclass
class Sim:
    """Drives a SyncSchedule through time: requests at given times, syncs of a given length."""

    schedule: SyncSchedule
    now: float = 0.0
    syncs: list[tuple[float, SyncPlan]] = field(default_factory=list)

    @classmethod
    def make(cls, **kw: float) -> Sim:
        kw.setdefault("min_interval", 1.0)
        kw.setdefault("max_interval", 30.0)
        return cls(SyncSchedule(now=0.0, **kw))  # type: ignore[arg-type]

    def run(
        self,
        until: float,
        *,
        requests: list[float] | None = None,
        full_requests: list[float] | None = None,
        duration: float | dict[str, float] = 0.0,
        fail: set[int] | None = None,
        escalate: set[int] | None = None,
    ) -> list[tuple[float, SyncPlan]]:
        """Syncs started before `until` (start time, plan). `duration` per sync, or per
        kind ("full"/"partial"); `fail`/`escalate`: indices (in self.syncs) of syncs that
        fail / that a drift check turns into full syncs."""
        events = sorted(
            [(t, False) for t in requests or []] + [(t, True) for t in full_requests or []]
        )
        first = len(self.syncs)
        while True:
            due = self.schedule.next_due(self.now)
            if events and events[0][0] <= until and events[0][0] <= max(due, self.now):
                t, full = events.pop(0)
                self.now = max(self.now, t)
                self.schedule.request(full=full)
                continue
            if due > until:
                break
            self.now = max(self.now, due)
            plan = self.schedule.take(self.now)
            assert plan is not None
            index = len(self.syncs)
            self.syncs.append((self.now, plan))
            ran_full = plan.full or index in (escalate or set())
            if isinstance(duration, dict):
                self.now += duration["full" if ran_full else "partial"]
            else:
                self.now += duration
            self.schedule.finished(self.now, ok=index not in (fail or set()), full=ran_full)
        self.now = max(self.now, until)
        return self.syncs[first:]


def kinds(syncs: list[tuple[float, SyncPlan]]) -> list[str]:
    return [("full:" if p.full else "partial:") + p.reason for _, p in syncs]


def test_first_sync_is_full_and_immediate() -> None:
    sim = Sim.make()
    assert sim.run(0.0) == [(0.0, SyncPlan(full=True, reason="startup"))]


def test_first_change_after_a_quiet_period_syncs_at_once() -> None:
    # issue 9 item 4: at 300 services a sync takes a few ms; a change 0.3 s after a sync used to
    # wait for the min period (0.7 s more); with the bucket it syncs immediately
    sim = Sim.make(min_interval=1.0)
    sim.run(0.3, duration=0.005)
    syncs = sim.run(5.0, requests=[0.3], duration=0.005)
    assert [(t, p.full, p.reason) for t, p in syncs] == [(0.3, False, "change")]


def test_burst_of_two_then_min_interval_spacing() -> None:
    sim = Sim.make(min_interval=1.0)
    sim.run(10.0)  # start-up sync at 0; the bucket is full again by t=10
    burst = [10.0 + i * 0.001 for i in range(50)]
    syncs = sim.run(13.0, requests=burst)
    starts = [t for t, _ in syncs]
    # two syncs at once (the bucket's burst), the rest of the burst waits for a token
    assert starts[0] == pytest.approx(10.0)
    assert starts[1] == pytest.approx(10.001)
    assert len(starts) == 3 and starts[2] == pytest.approx(11.0)
    assert all(not p.full and p.reason == "change" for _, p in syncs)


def test_sustained_changes_are_spaced_by_the_min_interval() -> None:
    sim = Sim.make(min_interval=1.0)
    sim.run(10.0)
    changes = [10.0 + i * 0.1 for i in range(100)]  # 10 changes a second for 10 s
    syncs = sim.run(20.0, requests=changes, duration=0.01)
    starts = [t for t, _ in syncs]
    assert starts[:2] == pytest.approx([10.0, 10.1])  # the burst of two
    gaps = [b - a for a, b in itertools.pairwise(starts[2:])]
    assert all(g >= 1.0 - 1e-9 for g in gaps)  # then one per min period
    assert len(starts) == 12
    assert starts[-1] >= changes[-1]  # the last change is not lost


def test_min_interval_zero_never_delays() -> None:
    sim = Sim.make(min_interval=0.0)
    syncs = sim.run(1.0, requests=[0.1, 0.1001, 0.1002, 0.5], duration=0.0)
    assert [t for t, _ in syncs] == pytest.approx([0.0, 0.1, 0.1001, 0.1002, 0.5])


def test_periodic_syncs_are_partial_with_a_check() -> None:
    sim = Sim.make(min_interval=1.0, max_interval=30.0)
    syncs = sim.run(100.0, duration=2.0)
    assert kinds(syncs) == ["full:startup"] + ["partial:periodic"] * 3
    # the period runs from the end of the previous sync
    assert [t for t, _ in syncs] == pytest.approx([0.0, 32.0, 64.0, 96.0])
    assert all(p.check for _, p in syncs[1:]) and not syncs[0][1].check


def test_changes_push_the_periodic_sync_back() -> None:
    sim = Sim.make(min_interval=1.0, max_interval=30.0)
    syncs = sim.run(50.0, requests=[20.0])
    assert [(t, p.reason) for t, p in syncs] == [
        (0.0, "startup"),
        (20.0, "change"),
        (50.0, "periodic"),
    ]


def test_full_rewrite_once_per_full_interval_only() -> None:
    sim = Sim.make(min_interval=1.0, max_interval=30.0, full_interval=3600.0)
    syncs = sim.run(2 * 3600.0 + 60, duration={"full": 20.0, "partial": 0.01})
    full = [(t, p.reason) for t, p in syncs if p.full]
    assert [r for _, r in full] == ["startup", "resync", "resync"]
    # the hour counts from the end of the last full sync
    assert full[1][0] == pytest.approx(20.0 + 3600.0)
    assert full[2][0] == pytest.approx(2 * (20.0 + 3600.0))
    partial = [p for _, p in syncs if not p.full]
    assert len(partial) > 200 and all(p.reason == "periodic" for p in partial)


def test_full_interval_zero_disables_periodic_full_syncs() -> None:
    sim = Sim.make(min_interval=1.0, max_interval=30.0, full_interval=0.0)
    syncs = sim.run(3 * 3600.0)
    assert kinds(syncs).count("full:startup") == 1
    assert sum(p.full for _, p in syncs) == 1


def test_failure_makes_the_retry_full() -> None:
    sim = Sim.make(min_interval=1.0, max_interval=30.0, retry_interval=5.0)
    sim.run(10.0)
    # the change's partial sync (index 1) fails; a change arriving meanwhile rides on the retry
    syncs = sim.run(40.0, requests=[10.0, 12.0], fail={1})
    assert [(t, p.full, p.reason) for t, p in syncs] == [
        (10.0, False, "change"),
        (15.0, True, "retry"),
    ]


def test_a_failed_retry_keeps_retrying_full() -> None:
    sim = Sim.make(min_interval=0.0, retry_interval=2.0)
    syncs = sim.run(7.0, fail={0, 1, 2})
    assert [(t, p.full) for t, p in syncs] == [(0.0, True), (2.0, True), (4.0, True), (6.0, True)]
    assert [p.reason for _, p in syncs] == ["startup", "retry", "retry", "retry"]


def test_a_change_during_a_full_sync_is_applied_by_the_next_partial_one() -> None:
    # issue 9 item 2: a start-up full sync of 20 s; a change at t=5 does not wait for another
    # full sync but is applied by a partial one as soon as the full sync ends
    sim = Sim.make(min_interval=1.0)
    syncs = sim.run(30.0, requests=[5.0], duration={"full": 20.0, "partial": 0.01})
    assert [(t, p.full, p.reason) for t, p in syncs] == [
        (0.0, True, "startup"),
        (20.0, False, "change"),
    ]


def test_an_hourly_full_sync_does_not_hold_back_the_next_change() -> None:
    sim = Sim.make(min_interval=1.0, max_interval=30.0, full_interval=100.0)
    sim.run(10.0, duration={"full": 20.0, "partial": 0.01})
    syncs = sim.run(200.0, requests=[125.0], duration={"full": 20.0, "partial": 0.01})
    resync = next(t for t, p in syncs if p.reason == "resync")
    after = [(t, p) for t, p in syncs if t > resync]
    assert resync < 125.0 < resync + 20.0
    assert after[0][0] == pytest.approx(resync + 20.0) and after[0][1].reason == "change"
    assert not after[0][1].full


def test_full_requests_during_a_full_sync_make_one_more_full_sync() -> None:
    sim = Sim.make(min_interval=1.0)
    syncs = sim.run(30.0, full_requests=[5.0], duration={"full": 10.0, "partial": 0.01})
    assert kinds(syncs) == ["full:startup", "full:requested"]


def test_a_check_that_escalates_restarts_the_full_interval() -> None:
    sim = Sim.make(min_interval=1.0, max_interval=30.0, full_interval=100.0)
    # the first periodic sync (index 1, t=30) finds drift and runs full
    syncs = sim.run(140.0, escalate={1})
    # the hour (here 100 s) restarts at the escalated sync's end (30), not at start-up (0)
    assert [(t, p.reason) for t, p in syncs] == [
        (0.0, "startup"),
        (30.0, "periodic"),
        (60.0, "periodic"),
        (90.0, "periodic"),
        (120.0, "periodic"),
        (130.0, "resync"),
    ]


def test_the_loop_runs_plans_in_its_thread() -> None:
    plans: list[SyncPlan] = []
    ran = threading.Semaphore(0)
    stop = threading.Event()

    def sync(plan: SyncPlan) -> bool:
        plans.append(plan)
        ran.release()
        return True

    loop = SyncLoop(sync=sync, min_interval=0.0, max_interval=3600, stop=stop, tick_interval=0.05)
    t = threading.Thread(target=loop.run)
    t.start()
    try:
        assert ran.acquire(timeout=5)
        loop.request()
        assert ran.acquire(timeout=5)
        loop.request(full=True)
        assert ran.acquire(timeout=5)
    finally:
        stop.set()
        loop.request()
        t.join(5)
    assert not t.is_alive()
    assert [(p.full, p.reason) for p in plans[:3]] == [
        (True, "startup"),
        (False, "change"),
        (True, "requested"),
    ]


def test_the_loop_survives_an_exception_and_retries_full() -> None:
    plans: list[SyncPlan] = []
    ran = threading.Semaphore(0)
    stop = threading.Event()

    def sync(plan: SyncPlan) -> bool:
        plans.append(plan)
        ran.release()
        if len(plans) == 1:
            raise RuntimeError("bug")
        return True

    loop = SyncLoop(sync=sync, min_interval=0.0, max_interval=3600, stop=stop, retry_interval=0.0)
    t = threading.Thread(target=loop.run)
    t.start()
    try:
        assert ran.acquire(timeout=5) and ran.acquire(timeout=5)
    finally:
        stop.set()
        loop.request()
        t.join(5)
    assert [(p.full, p.reason) for p in plans[:2]] == [(True, "startup"), (True, "retry")]
