"""What the IPVS drift check expects the kernel to hold after kproxy's writes (real servers per
virtual server once a plan has been applied to an observed table), and what it reads
(kproxy.backends.ipvs_census): the rotation of real server dumps on the netlink path and the
layout of the kernel's sockopt records."""

from __future__ import annotations

import ctypes
import socket
import sys

import pytest

from kproxy.backends import ipvs_census as census
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


# -- the rotation -----------------------------------------------------------------------------
def keys(n: int) -> list[R.VSKey]:
    return [R.VSKey(f"10.96.{i // 256}.{i % 256}", "TCP", 80) for i in range(n)]


@pytest.mark.parametrize(("n", "periods", "minimum"), [(1000, 20, 1), (1001, 20, 7), (30, 4, 64)])
def test_every_virtual_server_is_counted_within_periods_checks(
    n: int, periods: int, minimum: int
) -> None:
    table = keys(n)
    rot = census.Rotation(periods=periods, minimum=minimum)
    for _turn in range(3):  # from any starting point, not only the first turn
        seen: list[R.VSKey] = []
        for _ in range(periods):
            seen += rot.take(table)
        assert set(seen) == set(table)
        assert len(seen) <= n + periods * max(minimum, -(-n // periods))


def test_a_slice_is_at_least_minimum_and_never_more_than_the_table() -> None:
    rot = census.Rotation(periods=20, minimum=64)
    assert [rot.size(n) for n in (0, 10, 64, 1000, 10_000)] == [0, 10, 64, 64, 500]
    assert rot.take([]) == []
    assert sorted(rot.take(keys(10))) == keys(10)  # small tables: all of them every check


def test_the_rotation_continues_after_the_table_changed() -> None:
    table = keys(100)
    rot = census.Rotation(periods=10, minimum=1)
    first = rot.take(table)  # keys 0..9 in key order
    assert first == sorted(table)[:10]
    del table[5:15]  # the cursor's key is gone: the next slice starts after where it was
    second = rot.take(table)
    assert second[0] > first[-1] and len(second) == 9  # ceil(90 / 10)
    later = [k for _ in range(10) for k in rot.take(table)]
    assert set(table) <= set(second) | set(later)


# -- the sockopt census --------------------------------------------------------------------------
class _StatsUser(ctypes.Structure):
    _fields_ = [
        ("conns", ctypes.c_uint32),
        ("inpkts", ctypes.c_uint32),
        ("outpkts", ctypes.c_uint32),
        ("inbytes", ctypes.c_uint64),
        ("outbytes", ctypes.c_uint64),
        ("cps", ctypes.c_uint32),
        ("inpps", ctypes.c_uint32),
        ("outpps", ctypes.c_uint32),
        ("inbps", ctypes.c_uint32),
        ("outbps", ctypes.c_uint32),
    ]


class _ServiceEntry(ctypes.Structure):
    """struct ip_vs_service_entry as the C compiler lays it out (include/uapi/linux/ip_vs.h)."""

    _fields_ = [
        ("protocol", ctypes.c_uint16),
        ("addr", ctypes.c_uint32),  # __be32
        ("port", ctypes.c_uint16),  # __be16
        ("fwmark", ctypes.c_uint32),
        ("sched_name", ctypes.c_char * 16),
        ("flags", ctypes.c_uint),
        ("timeout", ctypes.c_uint),
        ("netmask", ctypes.c_uint32),
        ("num_dests", ctypes.c_uint),
        ("stats", _StatsUser),
    ]


class _GetServices(ctypes.Structure):
    _fields_ = [("num_services", ctypes.c_uint), ("entrytable", _ServiceEntry * 2)]


def test_the_entry_layout_is_the_kernels() -> None:
    assert census._ENTRY.size == ctypes.sizeof(_ServiceEntry) == 104
    assert _GetServices.entrytable.offset == census._ENTRIES_AT
    e = _ServiceEntry(protocol=socket.IPPROTO_UDP, fwmark=0, num_dests=7, sched_name=b"rr")
    e.addr = int.from_bytes(socket.inet_aton("10.96.0.10"), sys.byteorder)
    e.port = int.from_bytes(b"\0\x35", sys.byteorder)
    e.stats.inbytes = 2**40
    proto, addr, port, fwmark, dests = census._ENTRY.unpack(bytes(e))
    want = (17, socket.inet_aton("10.96.0.10"), b"\0\x35", 0, 7)
    assert (proto, addr, port, fwmark, dests) == want
    dns = R.VSKey("10.96.0.10", "UDP", 53)
    assert census.entry_hash(proto, addr, port, dests) == census.key_hash(dns, 7)
    assert census.key_hash(dns, 6) != census.key_hash(dns, 7)
