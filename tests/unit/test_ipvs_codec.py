"""The IPVS netlink codec against pyroute2's schema, and the pure parts of batching.

kproxy packs IPVS requests itself (pyroute2's request layer is ~1.7 ms per message); these tests
hold the bytes to pyroute2's independent description of the same messages
(``pyroute2.netlink.generic.ipvs.ipvsmsg``): what kproxy encodes, pyroute2 decodes to the same
fields, and what pyroute2 encodes as a kernel reply, kproxy decodes to the same objects.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
from pyroute2.netlink.generic import ipvs as pr

from kproxy.backends.ipvs_netlink import (
    CMD_DEL_DEST,
    CMD_DEL_SERVICE,
    CMD_NEW_DEST,
    CMD_NEW_SERVICE,
    CMD_SET_DEST,
    CMD_SET_SERVICE,
    already_done,
    decode_dest,
    decode_service,
    describe_op,
    encode_message,
    follow_up,
    op_requests,
    plan_batches,
)
from kproxy.backends.netlink import (
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    error_code,
    parse_messages,
)
from kproxy.render.ipvs import (
    FLAG_HASHED,
    FLAG_PERSISTENT,
    FLAG_SCHED1,
    FLAG_SCHED2,
    Dest,
    VirtualServer,
    VSKey,
)
from kproxy.render.ipvs_diff import (
    AddDest,
    AddVS,
    DelDest,
    DelVS,
    EditDest,
    EditVS,
    ObservedDest,
    ObservedVS,
    Op,
    Stats,
)

FAMILY_ID = 0x1F


def decode_with_pyroute2(data: bytes) -> Any:
    msg = pr.ipvsmsg(data)
    msg.decode()
    return msg


def nla_dict(nest: Any) -> dict[str, Any]:
    return dict(nest["attrs"])


def request_bytes(op: Op, seq: int = 1) -> bytes:
    (_op, cmd, attrs), *_dests = op_requests(op)
    return encode_message(FAMILY_ID, cmd, seq, NLM_F_REQUEST, attrs)


def make_vs(address: str, protocol: str, port: int, scheduler: str, **kw: Any) -> VirtualServer:
    """A desired virtual server as the renderer builds one (PERSISTENT with a timeout)."""
    if kw.get("timeout"):
        kw["flags"] = kw.get("flags", 0) | FLAG_PERSISTENT
    return VirtualServer(VSKey(address, protocol, port), scheduler, **kw)


SERVICES = [
    pytest.param(make_vs("10.96.0.1", "TCP", 80, "rr"), id="v4-tcp-rr"),
    pytest.param(
        make_vs("10.96.0.10", "UDP", 53, "sh", flags=FLAG_SCHED1 | FLAG_SCHED2, timeout=10800),
        id="v4-udp-sh-persistent",
    ),
    pytest.param(make_vs("10.96.0.11", "SCTP", 36412, "mh", timeout=5), id="sctp"),
    pytest.param(make_vs("fd00::10", "TCP", 443, "wlc", timeout=60), id="v6"),
]


@pytest.mark.parametrize("vs", SERVICES)
@pytest.mark.parametrize(("kind", "cmd"), [(AddVS, CMD_NEW_SERVICE), (EditVS, CMD_SET_SERVICE)])
def test_service_request_carries_every_field(vs: VirtualServer, kind: type, cmd: int) -> None:
    msg = decode_with_pyroute2(request_bytes(kind(vs), seq=42))
    assert msg["cmd"] == cmd and msg["version"] == 1
    assert msg["header"]["sequence_number"] == 42 and msg["header"]["type"] == FAMILY_ID
    svc = nla_dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE"))
    family = socket.AF_INET6 if ":" in vs.key.address else socket.AF_INET
    assert svc["IPVS_SVC_ATTR_AF"] == family
    assert svc["IPVS_SVC_ATTR_PROTOCOL"] == {"TCP": 6, "UDP": 17, "SCTP": 132}[vs.key.protocol]
    assert svc["IPVS_SVC_ATTR_ADDR"] == vs.key.address
    assert svc["IPVS_SVC_ATTR_PORT"] == vs.key.port
    # never pyroute2's silent default scheduler: always the requested one
    assert svc["IPVS_SVC_ATTR_SCHED_NAME"] == vs.scheduler
    flags = nla_dict(svc["IPVS_SVC_ATTR_FLAGS"]) if "attrs" in svc["IPVS_SVC_ATTR_FLAGS"] else None
    raw_flags = svc["IPVS_SVC_ATTR_FLAGS"] if flags is None else flags
    assert raw_flags["flags"] == vs.flags and raw_flags["mask"] == 0xFFFFFFFF
    assert bool(vs.flags & FLAG_PERSISTENT) == (vs.timeout > 0)
    assert svc["IPVS_SVC_ATTR_TIMEOUT"] == vs.timeout
    assert "IPVS_SVC_ATTR_NETMASK" in svc


def test_netmask_is_one_address_as_a_v4_mask_or_a_v6_prefix_length() -> None:
    v4 = decode_with_pyroute2(request_bytes(AddVS(make_vs("10.0.0.1", "TCP", 1, "rr"))))
    assert nla_dict(v4.get_attr("IPVS_CMD_ATTR_SERVICE"))["IPVS_SVC_ATTR_NETMASK"] == (
        "255.255.255.255"
    )
    # IPv6: a host-order u32 prefix length (pyroute2 types the field as an IPv4 address, so it
    # shows the integer's bytes: 128 -> "128.0.0.0" on little-endian hosts)
    v6 = make_vs("fd00::1", "TCP", 1, "rr", timeout=9)
    got = decode_with_pyroute2(request_bytes(AddVS(v6)))
    raw = nla_dict(got.get_attr("IPVS_CMD_ATTR_SERVICE"))["IPVS_SVC_ATTR_NETMASK"]
    assert int.from_bytes(socket.inet_aton(raw), "little") == 128


@pytest.mark.parametrize(
    "d",
    [
        pytest.param(Dest("10.244.1.5", 8080), id="v4"),
        pytest.param(Dest("10.244.1.6", 80, weight=0), id="weight0"),
        pytest.param(Dest("fd00:244::5", 8443, weight=9), id="v6"),
    ],
)
@pytest.mark.parametrize(("kind", "cmd"), [(AddDest, CMD_NEW_DEST), (EditDest, CMD_SET_DEST)])
def test_dest_request_carries_every_field(d: Dest, kind: type, cmd: int) -> None:
    key = VSKey("fd00::10" if ":" in d.address else "10.96.0.1", "UDP", 53)
    msg = decode_with_pyroute2(request_bytes(kind(key, d)))
    assert msg["cmd"] == cmd
    svc = nla_dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE"))
    assert (svc["IPVS_SVC_ATTR_ADDR"], svc["IPVS_SVC_ATTR_PORT"]) == (key.address, key.port)
    assert svc["IPVS_SVC_ATTR_PROTOCOL"] == socket.IPPROTO_UDP
    dest = nla_dict(msg.get_attr("IPVS_CMD_ATTR_DEST"))
    assert dest == {
        "IPVS_DEST_ATTR_ADDR": d.address,
        "IPVS_DEST_ATTR_PORT": d.port,
        # never pyroute2's default (3, "route"): masquerade, and no thresholds
        "IPVS_DEST_ATTR_FWD_METHOD": 0,
        "IPVS_DEST_ATTR_WEIGHT": d.weight,
        "IPVS_DEST_ATTR_U_THRESH": 0,
        "IPVS_DEST_ATTR_L_THRESH": 0,
        "IPVS_DEST_ATTR_ADDR_FAMILY": socket.AF_INET6 if ":" in d.address else socket.AF_INET,
    }


def test_add_vs_is_the_service_then_each_real_server() -> None:
    dests = (Dest("10.244.0.1", 8080), Dest("10.244.0.2", 8080, weight=0))
    vs = make_vs("10.96.0.1", "TCP", 80, "rr", dests=dests)
    reqs = list(op_requests(AddVS(vs)))
    assert [(op, cmd) for op, cmd, _attrs in reqs] == [
        (AddVS(vs), CMD_NEW_SERVICE),
        (AddDest(vs.key, dests[0]), CMD_NEW_DEST),
        (AddDest(vs.key, dests[1]), CMD_NEW_DEST),
    ]
    # byte for byte what the real servers' own operations send
    assert [attrs for _op, _cmd, attrs in reqs[1:]] == [
        next(op_requests(AddDest(vs.key, d)))[2] for d in dests
    ]


def test_deletes_carry_only_keys() -> None:
    key = VSKey("10.96.0.1", "TCP", 80)
    msg = decode_with_pyroute2(request_bytes(DelVS(key)))
    assert msg["cmd"] == CMD_DEL_SERVICE
    assert set(nla_dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE"))) == {
        "IPVS_SVC_ATTR_AF",
        "IPVS_SVC_ATTR_PROTOCOL",
        "IPVS_SVC_ATTR_ADDR",
        "IPVS_SVC_ATTR_PORT",
    }
    msg = decode_with_pyroute2(request_bytes(DelDest(key, "10.244.0.1", 8080)))
    assert msg["cmd"] == CMD_DEL_DEST
    dest = nla_dict(msg.get_attr("IPVS_CMD_ATTR_DEST"))
    assert (dest["IPVS_DEST_ATTR_ADDR"], dest["IPVS_DEST_ATTR_PORT"]) == ("10.244.0.1", 8080)


# -- replies -----------------------------------------------------------------------------------
def kernel_reply(cmd: int, nest_name: str, attrs: list[tuple[str, Any]], seq: int = 5) -> bytes:
    """A reply as the kernel would send it, encoded by pyroute2."""
    msg = pr.ipvsmsg()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["attrs"] = [(nest_name, {"attrs": attrs})]
    msg["header"]["type"] = FAMILY_ID
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def test_service_reply_decodes_to_the_object() -> None:
    data = kernel_reply(
        CMD_NEW_SERVICE,
        "IPVS_CMD_ATTR_SERVICE",
        [
            ("IPVS_SVC_ATTR_AF", socket.AF_INET),
            ("IPVS_SVC_ATTR_PROTOCOL", 6),
            ("IPVS_SVC_ATTR_ADDR", "10.0.0.1"),
            ("IPVS_SVC_ATTR_PORT", 80),
            ("IPVS_SVC_ATTR_SCHED_NAME", "wrr"),
            ("IPVS_SVC_ATTR_FLAGS", {"flags": FLAG_PERSISTENT | FLAG_HASHED, "mask": 0xFFFFFFFF}),
            ("IPVS_SVC_ATTR_TIMEOUT", 300),
            ("IPVS_SVC_ATTR_NETMASK", "255.255.255.0"),
            (
                "IPVS_SVC_ATTR_STATS64",
                {"attrs": [("IPVS_STATS_ATTR_CONNS", 5), ("IPVS_STATS_ATTR_INBYTES", 1 << 40)]},
            ),
        ],
    )
    (msg,) = parse_messages(data)
    vs = decode_service(msg.payload)
    # HASHED is dropped
    assert vs == ObservedVS(VSKey("10.0.0.1", "TCP", 80), "wrr", FLAG_PERSISTENT, 300, netmask=24)
    assert vs.stats == Stats(conns=5, inbytes=1 << 40)


def test_non_persistent_reply_has_no_timeout_and_host_netmask_is_none() -> None:
    data = kernel_reply(
        CMD_NEW_SERVICE,
        "IPVS_CMD_ATTR_SERVICE",
        [
            ("IPVS_SVC_ATTR_AF", socket.AF_INET),
            ("IPVS_SVC_ATTR_PROTOCOL", 17),
            ("IPVS_SVC_ATTR_ADDR", "10.0.0.2"),
            ("IPVS_SVC_ATTR_PORT", 53),
            ("IPVS_SVC_ATTR_SCHED_NAME", "rr"),
            ("IPVS_SVC_ATTR_FLAGS", {"flags": FLAG_HASHED, "mask": 0xFFFFFFFF}),
            ("IPVS_SVC_ATTR_TIMEOUT", 0),
            ("IPVS_SVC_ATTR_NETMASK", "255.255.255.255"),
        ],
    )
    (msg,) = parse_messages(data)
    assert decode_service(msg.payload) == ObservedVS(VSKey("10.0.0.2", "UDP", 53), "rr")


def test_fwmark_services_are_skipped() -> None:
    data = kernel_reply(
        CMD_NEW_SERVICE,
        "IPVS_CMD_ATTR_SERVICE",
        [
            ("IPVS_SVC_ATTR_AF", socket.AF_INET),
            ("IPVS_SVC_ATTR_FWMARK", 7),
            ("IPVS_SVC_ATTR_SCHED_NAME", "rr"),
        ],
    )
    (msg,) = parse_messages(data)
    assert decode_service(msg.payload) is None


def test_dest_reply_decodes_counts_and_stats() -> None:
    data = kernel_reply(
        CMD_NEW_DEST,
        "IPVS_CMD_ATTR_DEST",
        [
            ("IPVS_DEST_ATTR_ADDR_FAMILY", socket.AF_INET6),
            ("IPVS_DEST_ATTR_ADDR", "fd00::5"),
            ("IPVS_DEST_ATTR_PORT", 8080),
            ("IPVS_DEST_ATTR_FWD_METHOD", 0),
            ("IPVS_DEST_ATTR_WEIGHT", 0),
            ("IPVS_DEST_ATTR_U_THRESH", 0),
            ("IPVS_DEST_ATTR_L_THRESH", 0),
            ("IPVS_DEST_ATTR_ACTIVE_CONNS", 2),
            ("IPVS_DEST_ATTR_INACT_CONNS", 3),
            ("IPVS_DEST_ATTR_PERSIST_CONNS", 1),
            (
                "IPVS_DEST_ATTR_STATS",
                {"attrs": [("IPVS_STATS_ATTR_CONNS", 9), ("IPVS_STATS_ATTR_OUTPKTS", 4)]},
            ),
        ],
    )
    (msg,) = parse_messages(data)
    od = decode_dest(msg.payload, socket.AF_INET6)
    assert od == ObservedDest("fd00::5", 8080, 0, 2, 3, "masq", 1, Stats(conns=9, outpkts=4))
    assert od.connections == 5


STATS_ORDER = ("CONNS", "INPKTS", "OUTPKTS", "INBYTES", "OUTBYTES", "CPS", "INPPS")


@pytest.mark.parametrize(
    "order",
    [STATS_ORDER, tuple(reversed(STATS_ORDER))],
    ids=["kernel-order", "any-order"],
)
def test_stats64_read_in_any_attribute_order(order: tuple[str, ...]) -> None:
    values = {"CONNS": 7, "INPKTS": 70, "OUTPKTS": 50, "INBYTES": 1 << 33, "OUTBYTES": 9000}
    nest = [(f"IPVS_STATS_ATTR_{k}", values.get(k, 1)) for k in order]
    data = kernel_reply(
        CMD_NEW_DEST,
        "IPVS_CMD_ATTR_DEST",
        [
            ("IPVS_DEST_ATTR_ADDR_FAMILY", socket.AF_INET),
            ("IPVS_DEST_ATTR_ADDR", "10.1.1.1"),
            ("IPVS_DEST_ATTR_PORT", 80),
            ("IPVS_DEST_ATTR_WEIGHT", 1),
            ("IPVS_DEST_ATTR_STATS64", {"attrs": nest}),
        ],
    )
    (msg,) = parse_messages(data)
    assert decode_dest(msg.payload, socket.AF_INET).stats == Stats(
        conns=7, inpkts=70, outpkts=50, inbytes=1 << 33, outbytes=9000
    )
    assert decode_dest(msg.payload, socket.AF_INET, stats=False).stats is None


def test_parse_messages_walks_a_datagram_and_reads_errors() -> None:
    # two acknowledgements in one datagram: seq 7 ok, seq 8 EEXIST
    datagram = _ack(7, 0) + _ack(8, errno.EEXIST)
    msgs = list(parse_messages(datagram))
    assert [(m.type, m.seq, error_code(m.payload)) for m in msgs] == [
        (NLMSG_ERROR, 7, 0),
        (NLMSG_ERROR, 8, errno.EEXIST),
    ]


def _ack(seq: int, code: int) -> bytes:
    """An NLMSG_ERROR reply as the kernel sends it with NETLINK_CAP_ACK: errno + request header."""
    body = (-code).to_bytes(4, "little", signed=True) + encode_message(
        FAMILY_ID, CMD_NEW_SERVICE, seq, NLM_F_REQUEST | NLM_F_ACK, b""
    )[:16]
    header = (16 + len(body)).to_bytes(4, "little") + NLMSG_ERROR.to_bytes(2, "little")
    return header + (0).to_bytes(2, "little") + seq.to_bytes(4, "little") + b"\0" * 4 + body


# -- semantics ---------------------------------------------------------------------------------
KEY = VSKey("10.96.0.1", "TCP", 80)
VS = make_vs("10.96.0.1", "TCP", 80, "rr")
D1 = Dest("10.244.0.1", 8080)


@pytest.mark.parametrize(
    ("op", "err", "expected"),
    [
        (AddVS(VS), errno.EEXIST, EditVS(VS)),
        (AddDest(KEY, D1), errno.EEXIST, EditDest(KEY, D1)),
        (EditVS(VS), errno.ESRCH, None),
        (AddVS(VS), errno.EINVAL, None),
    ],
    ids=["add-service", "add-dest", "edit-missing", "invalid"],
)
def test_an_add_that_finds_the_object_edits_it(op: Op, err: int, expected: Op | None) -> None:
    assert follow_up(op, err) == expected


@pytest.mark.parametrize(
    ("op", "err", "expected"),
    [
        (DelVS(KEY), errno.ESRCH, True),
        (DelDest(KEY, D1.address, D1.port), errno.ENOENT, True),
        (DelDest(KEY, D1.address, D1.port), errno.ESRCH, True),  # the whole service is gone
        (DelVS(KEY), errno.EPERM, False),
        (AddVS(VS), errno.ENOENT, False),  # e.g. an unknown scheduler
    ],
)
def test_deleting_what_is_gone_is_success(op: Op, err: int, expected: bool) -> None:
    assert already_done(op, err) is expected


def test_batches_keep_order_and_respect_both_limits() -> None:
    reqs = [bytes(10 + (i % 7)) for i in range(1000)]
    parts = plan_batches(reqs, max_messages=64, max_bytes=500)
    assert [i for part in parts for i in part] == list(range(1000))
    for part in parts:
        assert len(part) <= 64
        assert sum(len(reqs[i]) for i in part) <= 500
    # a single request larger than the byte limit still goes (alone)
    assert plan_batches([bytes(900), bytes(10)], max_bytes=500) == [range(0, 1), range(1, 2)]
    assert plan_batches([]) == []


def test_the_encoder_refuses_what_the_kernel_cannot_take() -> None:
    with pytest.raises(ValueError):
        request_bytes(DelVS(VSKey("10.0.0.1", "ICMP", 80)))
    with pytest.raises(ValueError):
        request_bytes(AddDest(KEY, Dest("not-an-ip", 80)))
    with pytest.raises(TypeError):
        request_bytes(KEY)  # type: ignore[arg-type]
    # the kernel's HASHED bit is never sent
    hashed = request_bytes(AddVS(make_vs("10.0.0.1", "TCP", 80, "rr", flags=FLAG_HASHED)))
    assert hashed == request_bytes(AddVS(make_vs("10.0.0.1", "TCP", 80, "rr")))


def test_describe_op_names_the_objects() -> None:
    assert describe_op(AddDest(KEY, D1)) == "add-dest TCP 10.96.0.1:80 -> 10.244.0.1:8080 w1"
    assert describe_op(DelVS(VSKey("fd00::1", "UDP", 53))) == "delete-service UDP [fd00::1]:53"
    assert (
        describe_op(DelDest(KEY, "fd00::5", 80)) == "delete-dest TCP 10.96.0.1:80 -> [fd00::5]:80"
    )
