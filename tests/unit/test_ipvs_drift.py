"""What the IPVS drift check expects the kernel to hold after kproxy's writes: real servers per
virtual server once a plan (kproxy.render.ipvs_diff) has been applied to an observed table."""

from __future__ import annotations

from kproxy.backends.ipvs import _dest_counts_after
from kproxy.render import ipvs as R
from kproxy.render import ipvs_diff as D

A = R.VSKey("10.96.0.1", "TCP", 80)
B = R.VSKey("10.96.0.2", "TCP", 80)
C = R.VSKey("10.96.0.3", "UDP", 53)


def observed(key: R.VSKey, *ips: str) -> D.ObservedVS:
    return D.ObservedVS(key, "rr", dests=tuple(D.ObservedDest(ip, 8080, 1) for ip in ips))


def test_counts_follow_every_kind_of_operation() -> None:
    table = {A: observed(A, "10.0.0.1", "10.0.0.2"), B: observed(B, "10.0.0.3")}
    plan = D.Plan(
        ops=(
            D.DelVS(B),
            D.AddVS(R.VirtualServer(C, dests=(R.Dest("10.0.0.4", 53), R.Dest("10.0.0.5", 53)))),
            D.AddDest(A, R.Dest("10.0.0.6", 8080)),
            D.DelDest(A, "10.0.0.1", 8080),
            D.EditDest(A, R.Dest("10.0.0.2", 8080, 0)),  # draining: still there
        )
    )
    assert _dest_counts_after(table, plan) == {A: 2, C: 2}


def test_an_empty_plan_keeps_what_was_observed() -> None:
    table = {A: observed(A, "10.0.0.1"), B: observed(B)}
    assert _dest_counts_after(table, D.Plan()) == {A: 1, B: 0}
