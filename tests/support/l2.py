"""Layer-2 observation helpers for LoadBalancer tests and benchmarks: the MAC of a namespace's
eth0, the MACs answering `arping` (ARP) or `solicit` (NDP) from the client, and a capture of ARP /
Neighbor Advertisement frames seen by a namespace (an AF_PACKET socket opened inside it from a
helper thread)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

from kproxy.lab.netlab import Lab
from kproxy.lb import packets as P
from tests.support.fakeapi import _setns


def mac_of(lab: Lab, ns: str) -> str:
    out = lab.run(ns, ["ip", "-j", "link", "show", "eth0"]).stdout
    return str(json.loads(out)[0]["address"])


def arping(lab: Lab, ip: str, count: int = 3) -> list[str]:
    """MACs that answered `count` ARP requests from the client (one entry per reply)."""
    res = lab.run(
        lab.client.ns,
        ["arping", "-I", "eth0", "-c", str(count), "-w", str(count + 1), ip],
        check=False,
    )
    return re.findall(r"reply from \S+ \[([0-9A-Fa-f:]+)\]", res.stdout.lower())


class Capture:
    """ARP and Neighbor Advertisement frames seen on the client's eth0 (AF_PACKET socket
    opened inside the client namespace from a helper thread)."""

    def __init__(self, ns: str) -> None:
        self.frames: list[tuple[float, bytes]] = []
        made: list[socket.socket] = []

        def make() -> None:
            _setns(ns)
            made.append(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)))

        helper = threading.Thread(target=make)
        helper.start()
        helper.join()
        self.sock = made[0]
        self.sock.bind(("eth0", 0x0003))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(2048)
            except OSError:
                continue
            self.frames.append((time.monotonic(), frame))

    def gratuitous(self, ip: str) -> list[tuple[float, str]]:
        out = []
        for t, frame in list(self.frames):
            arp = P.parse_arp(frame)
            if arp is not None and arp.op == 1 and arp.sender_ip == arp.target_ip == ip:
                out.append((t, P.mac_text(arp.sender_mac)))
            na = P.parse_na(frame)
            if na is not None and na[0] == ip and not na[2]:
                out.append((t, P.mac_text(na[1])))
        return out

    def advertisements(self, ip: str) -> list[str]:
        """MACs of the solicited Neighbor Advertisements for `ip` seen so far (one per NA)."""
        out = []
        for _t, frame in list(self.frames):
            na = P.parse_na(frame)
            if na is not None and na[0] == ip and na[2]:
                out.append(P.mac_text(na[1]))
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


def solicit(lab: Lab, ip: str, count: int = 3, gap: float = 0.5, wait: float = 1.0) -> list[str]:
    """MACs that answered `count` Neighbor Solicitations for `ip` sent from the client's eth0
    (one entry per solicited Neighbor Advertisement): NDP's `arping`, in-process (no tool)."""
    assert lab.client.ip6 is not None, "the lab has no IPv6"
    capture = Capture(lab.client.ns)
    try:
        mac = capture.sock.getsockname()[4]
        frame = P.build_ns(src_mac=mac, src_ip=lab.client.ip6, target=ip)
        for _ in range(count):
            capture.sock.send(frame)
            time.sleep(gap)
        time.sleep(wait)
        return capture.advertisements(ip)
    finally:
        capture.close()
