"""Layer-2 node election and the Lease rules: every agent computes the same owner."""

from __future__ import annotations

import hashlib
import itertools

from kproxy.lb import election as E
from kproxy.lb.select import NodeState, announcer, candidates, rank

NODES = {n: NodeState(n) for n in ("node1", "node2", "node3")}


def test_owner_is_the_lowest_sha256_of_node_and_address() -> None:
    ip = "192.168.50.200"
    expected = min(NODES, key=lambda n: hashlib.sha256(f"{n}#{ip}".encode()).digest())
    assert announcer(ip, NODES) == expected
    # the answer does not depend on the order the agent learnt the nodes in
    for perm in itertools.permutations(NODES):
        assert announcer(ip, perm) == expected


def test_a_leaving_node_moves_only_its_own_addresses() -> None:
    addresses = [f"192.168.50.{i}" for i in range(100, 200)]
    before = {ip: announcer(ip, NODES) for ip in addresses}
    after = {ip: announcer(ip, ["node1", "node3"]) for ip in addresses}
    moved = {ip for ip in addresses if before[ip] != after[ip]}
    assert moved == {ip for ip in addresses if before[ip] == "node2"}
    assert 15 < len(moved) < 50  # about a third; the hash spreads addresses over nodes
    assert set(before.values()) == set(NODES)


def test_candidates_need_a_usable_node_and_a_live_agent() -> None:
    nodes = {
        "ok": NodeState("ok"),
        "notready": NodeState("notready", ready=False),
        "deleting": NodeState("deleting", deleting=True),
        "excluded": NodeState("excluded", excluded=True),
        "silent": NodeState("silent"),
    }
    alive = {"ok", "notready", "deleting", "excluded"}
    assert candidates(nodes, alive) == {"ok"}


def test_etp_local_restricts_to_nodes_with_ready_local_endpoints() -> None:
    alive = set(NODES)
    assert candidates(NODES, alive, local_endpoint_nodes={"node3"}) == {"node3"}
    assert candidates(NODES, alive, local_endpoint_nodes=set()) == set()
    assert announcer("192.168.50.200", set()) is None


def test_rank_is_total() -> None:
    assert sorted(rank("fd00:50::100", NODES)) == sorted(NODES)


# -- Leases ------------------------------------------------------------------------------------
def test_expiry_is_judged_by_the_local_clock_of_the_last_observed_change() -> None:
    rec = E.LeaseRecord("node1", 2, "2020-01-01T00:00:00.000000Z")  # an old wall clock
    obs = E.Observation(rec, seen_at=100.0)
    assert not obs.expired(101.9)  # skew does not matter: only our clock counts
    assert obs.expired(102.1)
    obs.see(E.LeaseRecord("node1", 2, "2020-01-01T00:00:01.000000Z"), 102.0)  # renewed
    assert not obs.expired(103.5)
    obs.see(E.LeaseRecord("node1", 2, "2020-01-01T00:00:01.000000Z"), 104.5)  # unchanged
    assert obs.expired(104.5)


def test_released_lease_is_free_at_once() -> None:
    held = E.claim(None, me="node1", duration=2, now_wall=1.0)
    released = E.release(held, now_wall=2.0)
    obs = E.Observation(released, seen_at=10.0)
    assert obs.expired(10.0)
    assert E.should_try(obs, me="node2", now=10.0)


def test_claim_counts_transitions_and_keeps_acquire_time_on_renewal() -> None:
    first = E.claim(None, me="a", duration=2, now_wall=0.0)
    renewed = E.claim(first, me="a", duration=2, now_wall=5.0)
    taken = E.claim(renewed, me="b", duration=2, now_wall=9.0)
    assert (first.transitions, renewed.transitions, taken.transitions) == (0, 0, 1)
    assert renewed.acquire_time == first.acquire_time != renewed.renew_time
    assert taken.holder == "b" and taken.acquire_time == taken.renew_time
    assert first.renew_time == "1970-01-01T00:00:00.000000Z"


def test_only_the_holder_or_anyone_after_expiry_may_write() -> None:
    obs = E.Observation(E.claim(None, me="a", duration=2, now_wall=0.0), seen_at=0.0)
    assert E.should_try(obs, me="a", now=1.0)
    assert not E.should_try(obs, me="b", now=1.0)
    assert E.should_try(obs, me="b", now=2.5)
    assert E.should_try(None, me="b", now=0.0)


def test_status_section_shows_owner_pools_and_pending() -> None:
    from kproxy.inspect.lbstatus import render_lb

    text = render_lb(
        {
            "node": "node2",
            "leader": "node1",
            "pools": [{"range": "192.168.50.200-192.168.50.201", "size": 2, "used": 1}],
            "addresses": [
                {"address": "192.168.50.200", "service": "default/web", "node": "node2"},
                {"address": "192.168.50.201", "service": "default/local", "node": ""},
            ],
            "pending": {"default/third": "no free IPv4 address left in the pools"},
        }
    )
    lines = text.splitlines()
    assert lines[1].split() == ["LB", "ADDRESS", "SERVICE", "ANNOUNCED", "BY"]
    assert lines[2].split() == ["192.168.50.200", "default/web", "node2", "(this", "node)"]
    assert "(nobody: no eligible node)" in lines[3]
    assert "192.168.50.200-192.168.50.201 1/2 used; allocator: node1" in text
    assert "pending default/third: no free IPv4 address left in the pools" in text
