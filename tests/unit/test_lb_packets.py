"""ARP and NDP frames: what the layer-2 responder sends, checked field by field."""

from __future__ import annotations

import struct

from kproxy.lb import packets as P

MAC = bytes.fromhex("020000000001")
PEER = bytes.fromhex("020000000002")


def test_arp_reply_answers_the_asker_with_our_mac() -> None:
    request = P.build_arp(
        op=1,
        eth_dst=P.BROADCAST,
        sender_mac=PEER,
        sender_ip="192.168.50.2",
        target_mac=b"\x00" * 6,
        target_ip="192.168.50.200",
    )
    parsed = P.parse_arp(request)
    assert parsed is not None and parsed.op == 1 and parsed.target_ip == "192.168.50.200"
    reply = P.arp_reply(parsed, MAC)
    assert reply[:6] == PEER and reply[6:12] == MAC
    answer = P.parse_arp(reply)
    assert answer == P.ArpPacket(2, MAC, "192.168.50.200", PEER, "192.168.50.2", MAC)


def test_gratuitous_arp_is_a_broadcast_request_from_and_for_the_address() -> None:
    frame = P.gratuitous_arp("192.168.50.200", MAC)
    garp = P.parse_arp(frame)
    assert frame[:6] == P.BROADCAST
    assert garp is not None and garp.op == 1
    assert garp.sender_ip == garp.target_ip == "192.168.50.200" and garp.sender_mac == MAC


def test_parse_arp_ignores_other_frames() -> None:
    assert P.parse_arp(b"\x00" * 60) is None
    assert P.parse_arp(P.unsolicited_na("fd00::1", MAC)) is None


def test_neighbor_solicitation_round_trip_and_solicited_answer() -> None:
    ns = P.build_ns(src_mac=PEER, src_ip="fd00:50::2", target="fd00:50::100")
    group, group_mac = P.solicited_node("fd00:50::100")
    assert group == "ff02::1:ff00:100" and ns[:6] == group_mac == bytes.fromhex("3333ff000100")
    parsed = P.parse_ns(ns)
    assert parsed is not None
    assert (parsed.target, parsed.src_ip, parsed.source_ll) == ("fd00:50::100", "fd00:50::2", PEER)
    na = P.na_reply(parsed, MAC)
    assert na[:6] == PEER
    assert na[20] == P.ICMPV6 and na[21] == 255  # next header, hop limit 255 (RFC 4861 7.1.2)
    assert P.parse_na(na) == ("fd00:50::100", MAC, True)


def test_checksums_verify() -> None:
    ns = bytearray(P.build_ns(src_mac=PEER, src_ip="fd00:50::2", target="fd00:50::100"))
    ns[-1] ^= 0xFF  # corrupt the option: the checksum no longer matches
    assert P.parse_ns(bytes(ns)) is None


def test_unsolicited_na_goes_to_all_nodes_with_override() -> None:
    frame = P.unsolicited_na("fd00:50::100", MAC)
    assert frame[:6] == P.ALL_NODES_MAC
    flags = struct.unpack("!I", frame[58:62])[0]
    assert flags & P.NA_OVERRIDE and not flags & P.NA_SOLICITED
    assert P.parse_na(frame) == ("fd00:50::100", MAC, False)


def test_na_to_an_unspecified_source_goes_to_all_nodes() -> None:
    ns = P.build_ns(src_mac=PEER, src_ip="::", target="fd00:50::100")
    parsed = P.parse_ns(ns)
    assert parsed is not None
    assert P.na_reply(parsed, MAC)[:6] == P.ALL_NODES_MAC
