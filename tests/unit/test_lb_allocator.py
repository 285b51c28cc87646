"""The LoadBalancer allocator and its pools: pure functions, state in, decisions out."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kproxy.lb.allocator import LB_CLASS, Decision, LBService, allocate, pool_usage
from kproxy.lb.pools import Pools, parse_range
from kproxy.model.objects import Ref

POOLS = Pools.parse(["192.168.50.200-192.168.50.202", "fd00:50::100/126"])


def svc(name: str, created: str = "2026-01-01T00:00:00Z", **kw: Any) -> LBService:
    kw.setdefault("ports", (("TCP", 80),))
    return LBService("default", name, created=created, **kw)


def ips(decisions: dict[Ref, Decision], name: str) -> tuple[str, ...]:
    d = decisions[Ref("default", name)]
    assert not d.pending, d.pending
    return d.ips


def pending(decisions: dict[Ref, Decision], name: str) -> str:
    return decisions[Ref("default", name)].pending


# -- pools -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "first", "last", "size"),
    [
        ("192.168.50.200-192.168.50.210", "192.168.50.200", "192.168.50.210", 11),
        ("192.168.50.240/29", "192.168.50.240", "192.168.50.247", 8),
        ("10.0.0.7", "10.0.0.7", "10.0.0.7", 1),
        ("fd00:50::100-fd00:50::1ff", "fd00:50::100", "fd00:50::1ff", 256),
        ("fd00:50::/64", "fd00:50::", "fd00:50::ffff:ffff:ffff:ffff", 2**64),
    ],
    ids=["v4-range", "v4-cidr", "v4-single", "v6-range", "v6-cidr"],
)
def test_parse_range(text: str, first: str, last: str, size: int) -> None:
    r = parse_range(text)
    assert (str(r.first), str(r.last), r.size) == (first, last, size)


@pytest.mark.parametrize(
    "text", ["", "10.0.0.9-10.0.0.1", "10.0.0.1-fd00::1", "not-an-ip", "10.0.0.0/33"]
)
def test_parse_range_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_range(text)


def test_overlapping_ranges_are_rejected() -> None:
    with pytest.raises(ValueError, match="overlap"):
        Pools.parse(["10.0.0.0/24", "10.0.0.100-10.0.1.5"])


def test_first_free_walks_past_used_addresses_only() -> None:
    pools = Pools.parse(["fd00::/64"])  # 2**64 addresses: never enumerated
    used = {"fd00::", "fd00::1", "fd00::3"}
    assert pools.first_free(6, used) == "fd00::2"
    assert pools.first_free(4, used) is None


# -- allocation --------------------------------------------------------------------------------
def test_lowest_free_address_oldest_service_first() -> None:
    d = allocate(
        POOLS,
        [svc("b", "2026-01-02T00:00:00Z"), svc("a", "2026-01-03T00:00:00Z"), svc("c")],
    )
    assert ips(d, "c") == ("192.168.50.200",)
    assert ips(d, "b") == ("192.168.50.201",)
    assert ips(d, "a") == ("192.168.50.202",)


def test_only_our_class_and_loadbalancer_type() -> None:
    d = allocate(
        POOLS,
        [
            svc("mine", lb_class=LB_CLASS),
            svc("other", lb_class="example.com/lb"),
            svc("cip", type="ClusterIP"),
        ],
    )
    assert ips(d, "mine") == ("192.168.50.200",)
    assert Ref("default", "other") not in d and Ref("default", "cip") not in d


def test_exhausted_pool_leaves_the_newest_pending_with_a_reason() -> None:
    services = [svc(f"s{i}", f"2026-01-0{i + 1}T00:00:00Z") for i in range(4)]
    d = allocate(POOLS, services)
    assert [ips(d, f"s{i}")[0] for i in range(3)] == [
        "192.168.50.200",
        "192.168.50.201",
        "192.168.50.202",
    ]
    assert pending(d, "s3") == "no free IPv4 address left in the pools"


def test_requested_address_in_pool_is_honoured() -> None:
    d = allocate(
        POOLS,
        [svc("old"), svc("asks", "2026-02-01T00:00:00Z", requested=("192.168.50.200",))],
    )
    # the request wins over a new assignment, even for an older service
    assert ips(d, "asks") == ("192.168.50.200",)
    assert ips(d, "old") == ("192.168.50.201",)


def test_requested_address_outside_pools_or_taken_stays_pending() -> None:
    d = allocate(
        POOLS,
        [
            svc("held", ingress=("192.168.50.201",)),
            svc("outside", requested=("10.9.9.9",)),
            svc("taken", "2026-02-01T00:00:00Z", requested=("192.168.50.201",)),
            svc("junk", requested=("nope",)),
        ],
    )
    assert pending(d, "outside") == "requested address 10.9.9.9 is in no address pool"
    assert "already assigned to default/held" in pending(d, "taken")
    assert "not an IP address" in pending(d, "junk")
    assert ips(d, "held") == ("192.168.50.201",)


def test_a_service_moves_when_its_request_changes() -> None:
    d = allocate(POOLS, [svc("a", ingress=("192.168.50.200",), requested=("192.168.50.202",))])
    assert ips(d, "a") == ("192.168.50.202",)


def test_status_is_kept_across_restarts_even_against_older_services() -> None:
    """Restart stability: what status shows wins; a newcomer (or an older service seen for
    the first time) never takes it."""
    first = allocate(POOLS, [svc("b", "2026-01-05T00:00:00Z")])
    assert ips(first, "b") == ("192.168.50.200",)
    restarted = [
        svc("b", "2026-01-05T00:00:00Z", ingress=ips(first, "b")),
        svc("a", "2026-01-01T00:00:00Z"),
    ]
    again = allocate(POOLS, restarted)
    assert ips(again, "b") == ("192.168.50.200",)
    assert ips(again, "a") == ("192.168.50.201",)
    assert allocate(POOLS, restarted) == again  # deterministic


def test_freed_on_delete_and_cleared_on_type_change() -> None:
    d = allocate(POOLS, [svc("a"), svc("b", "2026-01-02T00:00:00Z")])
    held = {n: ips(d, n) for n in "ab"}
    # b becomes a NodePort service that still shows the address: cleared
    d2 = allocate(
        POOLS,
        [svc("b", "2026-01-02T00:00:00Z", type="NodePort", ingress=held["b"])],
    )
    assert d2[Ref("default", "b")] == Decision(ips=())
    # a is gone and b is no LB: a new service gets the lowest address again
    d3 = allocate(POOLS, [svc("c", "2026-01-03T00:00:00Z")])
    assert ips(d3, "c") == ("192.168.50.200",)


def test_foreign_class_addresses_in_our_pool_count_as_used() -> None:
    d = allocate(
        POOLS, [svc("x", lb_class="example.com/lb", ingress=("192.168.50.200",)), svc("a")]
    )
    assert ips(d, "a") == ("192.168.50.201",)
    assert Ref("default", "x") not in d


SHARE = {"sharing_key": "k1"}


@pytest.mark.parametrize(
    ("b_kw", "shared"),
    [
        ({**SHARE, "ports": (("TCP", 443),)}, True),
        ({**SHARE, "ports": (("UDP", 80),)}, True),
        ({**SHARE, "ports": (("TCP", 80),)}, False),
        ({"sharing_key": "k2", "ports": (("TCP", 443),)}, False),
        ({"ports": (("TCP", 443),)}, False),
        ({**SHARE, "ports": (("TCP", 443),), "external_local": True}, False),
    ],
    ids=["same-key", "same-port-other-proto", "port-overlap", "other-key", "no-key", "etp-local"],
)
def test_sharing_rules(b_kw: dict[str, Any], shared: bool) -> None:
    a = svc("a", sharing_key="k1", ports=(("TCP", 80),))
    b = svc("b", "2026-01-02T00:00:00Z", **b_kw)
    d = allocate(POOLS, [a, b])
    assert (ips(d, "a") == ips(d, "b")) is shared
    # asking for the address `a` holds obeys the same rules
    asked = allocate(POOLS, [replace(a, ingress=ips(d, "a")), replace(b, requested=ips(d, "a"))])
    if shared:
        assert ips(asked, "b") == ips(d, "a")
    else:
        assert pending(asked, "b")


def test_etp_local_services_share_when_they_select_the_same_pods() -> None:
    sel = (("app", "web"),)
    a = svc("a", sharing_key="k", external_local=True, selector=sel)
    b = svc(
        "b",
        "2026-01-02T00:00:00Z",
        sharing_key="k",
        external_local=True,
        selector=sel,
        ports=(("TCP", 443),),
    )
    d = allocate(POOLS, [a, b])
    assert ips(d, "a") == ips(d, "b")


def test_dual_stack_gets_one_address_per_family() -> None:
    d = allocate(
        POOLS,
        [
            svc("dual", families=(4, 6), family_policy="RequireDualStack"),
            svc("v6", "2026-01-02T00:00:00Z", families=(6,)),
            svc("prefer", "2026-01-03T00:00:00Z", families=(6, 4), family_policy="PreferDualStack"),
        ],
    )
    assert ips(d, "dual") == ("192.168.50.200", "fd00:50::100")
    assert ips(d, "v6") == ("fd00:50::101",)
    assert ips(d, "prefer") == ("192.168.50.201", "fd00:50::102")


def test_require_dual_stack_without_a_v6_pool_stays_pending_and_takes_nothing() -> None:
    pools = Pools.parse(["192.168.50.200/32"])
    d = allocate(
        pools,
        [
            svc("dual", families=(4, 6), family_policy="RequireDualStack"),
            svc("v4", "2026-01-02T00:00:00Z"),
        ],
    )
    assert pending(d, "dual") == "no IPv6 address pool configured"
    assert ips(d, "v4") == ("192.168.50.200",)  # the v4 address "dual" tried was given back


def test_pool_usage() -> None:
    d = allocate(POOLS, [svc("a"), svc("b", families=(6,))])
    assert pool_usage(POOLS, d) == {
        "192.168.50.200-192.168.50.202": (3, 1),
        "fd00:50::100/126": (4, 1),
    }
