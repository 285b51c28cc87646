"""Netlink framing shared by kproxy's netlink codecs (IPVS over generic netlink, ipset and
nf_tables over netfilter netlink): message headers, attribute packing and scanning, error
acknowledgements, and sockets in a named network namespace.

Pure byte work except `netns_socket`. Each codec keeps its own protocol (commands, attribute
numbers, what a reply means); this module only knows how netlink lays bytes out.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import NamedTuple

from kproxy.errors import DataplaneError

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
CLONE_NEWNET = 0x40000000

HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big endian)
NLA = struct.Struct("=HH")  # nlattr: len, type
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


class NetlinkError(DataplaneError):
    """A netlink message could not be parsed."""


# -- attributes (encoding) ---------------------------------------------------------------------
def nla(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    n = 4 + len(payload)
    return NLA.pack(n, kind) + payload + b"\0" * (-n & 3)


def nest(kind: int, *parts: bytes) -> bytes:
    """A nested attribute holding `parts`."""
    return nla(kind | NLA_F_NESTED, b"".join(parts))


def nla_u16(kind: int, value: int) -> bytes:
    return NLA.pack(6, kind) + _U16.pack(value) + b"\0\0"


def nla_be16(kind: int, value: int) -> bytes:
    return NLA.pack(6, kind) + value.to_bytes(2, "big") + b"\0\0"


def nla_u32(kind: int, value: int) -> bytes:
    return NLA.pack(8, kind) + _U32.pack(value)


def nla_be32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack(">i" if value < 0 else ">I", value))


def nla_be64(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack(">Q", value))


def nla_string(kind: int, text: str) -> bytes:
    """A NUL-terminated string attribute."""
    return nla(kind, text.encode() + b"\0")


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message: nlmsghdr + body (family header and attributes)."""
    return HDR.pack(16 + len(body), kind, flags, seq, 0) + body


# -- decoding ----------------------------------------------------------------------------------
class Message(NamedTuple):
    type: int
    flags: int
    seq: int
    payload: memoryview  # after the nlmsghdr


def parse_messages(buf: bytes | bytearray | memoryview) -> Iterator[Message]:
    """The netlink messages in one received datagram."""
    view = memoryview(buf)
    off = 0
    end = len(view)
    while off + 16 <= end:
        length, kind, flags, seq, _pid = HDR.unpack_from(view, off)
        if length < 16 or off + length > end:
            raise NetlinkError(f"malformed netlink message (length {length} at {off})")
        yield Message(kind, flags, seq, view[off + 16 : off + length])
        off += (length + 3) & ~3


Span = tuple[int, int]  # (payload offset, payload length) of an attribute within a buffer


def scan_attrs(buf: memoryview, off: int = 0, end: int | None = None) -> dict[int, Span]:
    """type -> span of the netlink attributes in buf[off:end] (the NESTED and byte-order flags
    are ignored).

    Offsets instead of sliced views: decoding a dump is dominated by this loop (a 10,000-service
    IPVS table has 100,000 real server messages of ~25 attributes each)."""
    out: dict[int, Span] = {}
    stop = len(buf) if end is None else end
    unpack = NLA.unpack_from
    while off + 4 <= stop:
        length, kind = unpack(buf, off)
        if length < 4:
            break
        out[kind & 0x3FFF] = (off + 4, length - 4)
        off += (length + 3) & ~3
    return out


def parse_attrs(buf: memoryview) -> dict[int, memoryview]:
    """type -> payload view of a run of netlink attributes (for tests and rare paths)."""
    return {k: buf[o : o + n] for k, (o, n) in scan_attrs(buf).items()}


def error_code(payload: memoryview) -> int:
    """The errno of an NLMSG_ERROR payload (0 for an acknowledgement)."""
    return -int(_I32.unpack_from(payload, 0)[0])


# -- sockets -----------------------------------------------------------------------------------
def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at `fd`."""
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_socket(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket of the named network namespace (a name under /run/netns or a path), or of the
    current one when `netns` is None.

    A socket belongs to the namespace it was created in for its whole life, so a throwaway
    thread enters the namespace (setns affects only the calling thread), creates the socket and
    ends; the caller's thread never moves.
    """
    if netns is None:
        return socket.socket(family, kind, proto)
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    box: list[socket.socket | BaseException] = []

    def create() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box.append(socket.socket(family, kind, proto))
        except BaseException as err:  # handed to the caller's thread
            box.append(err)

    worker = threading.Thread(target=create, name=f"netns-{netns}", daemon=True)
    worker.start()
    worker.join()
    got = box[0]
    if isinstance(got, BaseException):
        raise got
    return got


class Sequence:
    """Sequence numbers for one socket's requests (random start, never 0)."""

    def __init__(self) -> None:
        self._seq = int.from_bytes(os.urandom(3), "big")

    def next(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq


class NetlinkRequestError(DataplaneError):
    """The kernel answered a request with an error; `code` (and `errno`) is its errno."""

    def __init__(self, code: int, what: str = "") -> None:
        super().__init__(f"{what}: {os.strerror(code)}" if what else os.strerror(code))
        self.code = self.errno = code


class NetlinkSocket:
    """One netlink socket (`protocol`, NETLINK_ROUTE by default) of the current network
    namespace, one request at a time."""

    def __init__(self, protocol: int = 0, *, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            self._sock.bind((0, 0))
            self._sock.settimeout(timeout)
        except BaseException:
            self._sock.close()
            raise
        self._seq = Sequence()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes, what: str = "") -> Iterator[memoryview]:
        """Send one request and yield the payloads of its answer (the messages of a dump, or
        of a reply) until NLMSG_DONE or the acknowledgement; an error answer raises
        `NetlinkRequestError`. Consume it fully before the next request."""
        seq = self._seq.next()
        single = not flags & NLM_F_ACK and flags & NLM_F_DUMP != NLM_F_DUMP
        self._sock.send(message(kind, NLM_F_REQUEST | flags, seq, body))
        while True:
            for m in parse_messages(self._sock.recv(1 << 20)):
                if m.seq != seq:
                    continue
                if m.type == NLMSG_DONE:
                    return
                if m.type == NLMSG_ERROR:
                    code = error_code(m.payload)
                    if code:
                        raise NetlinkRequestError(code, what)
                    return
                yield m.payload
                if single:
                    return  # the one reply of a GET without acknowledgement

    def call(self, kind: int, flags: int, body: bytes, what: str = "") -> None:
        """A request answered by an acknowledgement only."""
        for _ in self.request(kind, flags | NLM_F_ACK, body, what):
            pass
