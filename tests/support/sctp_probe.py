"""SCTP without an SCTP stack: raw INIT chunks sent and received, for checking that a NAT rule
translates SCTP (this machine's kernel may lack the sctp module; raw sockets of protocol 132
work regardless, and conntrack/NAT handle SCTP in nf_conntrack itself).

    python3 sctp_probe.py send DST PORT COUNT     # COUNT INITs, each from a new source port
    python3 sctp_probe.py recv SECONDS            # one JSON line per INIT received: dst, dport
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time


def _crc_table() -> list[int]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return out


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def init_packet(sport: int, dport: int) -> bytes:
    """An SCTP common header (verification tag 0) and an INIT chunk, with its CRC32c (which
    conntrack checks on forwarded packets)."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, 0x1234567 ^ sport, 65535, 1, 1, 1)
    pkt = struct.pack("!HHII", sport, dport, 0, 0) + chunk
    return pkt[:8] + struct.pack("<I", crc32c(pkt)) + pkt[12:]


def send(dst: str, dport: int, count: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 132)
    for i in range(count):
        s.sendto(init_packet(40000 + i, dport), (dst, 0))
        time.sleep(0.01)


def receive(seconds: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 132)
    s.settimeout(0.2)
    print(json.dumps({"ready": True}), flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = s.recv(65535)
        except TimeoutError:
            continue
        ihl = (data[0] & 15) * 4
        sport, dport = struct.unpack("!HH", data[ihl : ihl + 4])
        if data[ihl + 12] != 1:  # not an INIT (e.g. an ABORT this namespace sent back)
            continue
        dst = socket.inet_ntoa(data[16:20])
        print(json.dumps({"dst": dst, "sport": sport, "dport": dport}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        receive(float(sys.argv[2]))
