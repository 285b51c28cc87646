"""A typed adapter over the kernel's IPVS generic netlink family: dump, edit and batched apply.

Owns every byte kproxy exchanges with IPVS. The schema is the one pyroute2 describes in
``pyroute2.netlink.generic.ipvs`` (and the kernel in ``include/uapi/linux/ip_vs.h``); the unit tests
check this module's encoder and decoder against pyroute2's message classes. The request layer is
kproxy's own, for two reasons:

- **Speed.** pyroute2's request objects (``IPVSService``/``IPVSDest``) cost ~1.7 ms per message to
  build and ~0.25 ms to parse here, and ``IPVS().dest("add")`` waits for each acknowledgement:
  programming 10,000 services x 10 real servers that way takes minutes. Here messages are packed
  with ``struct`` (a few microseconds each), many messages go into one ``send`` (the kernel walks
  every netlink message in a datagram), and only the last message of each batch asks for an
  acknowledgement: the kernel reports failures of the others anyway. The kernel processes a
  netlink datagram synchronously inside ``send``, so when ``send`` returns every error of that
  batch is already queued on the socket; one ``recv`` loop up to the final acknowledgement
  collects them, in order, keyed by sequence number.
- **Explicit defaults.** pyroute2's verb ``"update"`` sends a *delete*, it fills in scheduler
  ``wlc`` and forwarding "route" when a field is left out, and it drops ``None`` fields. Every
  request built here carries every field the kernel reads (scheduler, flags with a full mask,
  timeout, netmask; forwarding method, weight and both thresholds).

**One vocabulary.** The adapter speaks kproxy.render's types as they are: it encodes the diff's
operations (``kproxy.render.ipvs_diff``: ``AddVS`` .. ``DelDest``, desired ``VirtualServer`` and
``Dest``) and decodes a dump into the diff's ``ObservedVS``/``ObservedDest``, so nothing between
the renderer and the socket translates. What only the kernel knows (forwarding method,
netmask, connection counts, counters) lives on the observed records; what
kproxy sends is fixed: masquerade forwarding, no thresholds, a one-address netmask.

Invariants:

- Addresses are canonical text (``ipaddress`` form, as the model keeps them), so a desired key
  equals the one a dump returns. Observed flags never hold the kernel's internal HASHED bit,
  and their PERSISTENT bit is set exactly when ``timeout > 0``.
- Errors cross one boundary: ``IPVSError`` and its subclasses. EEXIST on an add becomes an edit to
  the requested settings (so "add" means "make it so"); ESRCH/ENOENT on a delete is success; EPERM
  and EACCES are fatal (``IPVSPermissionError``); anything else is reported per operation in
  ``ApplyResult.failures``.
- fwmark virtual servers are not kproxy's: a dump skips them.
- One adapter is one netlink socket: not thread-safe.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import ipaddress
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from kproxy.backends.netlink import HDR as _HDR
from kproxy.backends.netlink import (
    NETLINK_CAP_ACK,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
    Span,
    error_code,
    netns_socket,
    parse_messages,
    scan_attrs,
)
from kproxy.backends.netlink import NLA as _NLA
from kproxy.backends.netlink import nla as _nla
from kproxy.backends.netlink import nla_be16 as _nla_be16
from kproxy.backends.netlink import nla_u16 as _nla_u16
from kproxy.backends.netlink import nla_u32 as _nla_u32
from kproxy.errors import DataplaneError
from kproxy.render.ipvs import FLAG_HASHED, FLAG_PERSISTENT, Dest, VirtualServer, VSKey
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

log = logging.getLogger("kproxy.ipvs")

# -- netlink and generic netlink (include/uapi/linux/netlink.h, genetlink.h) ------------------
NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

# -- IPVS (include/uapi/linux/ip_vs.h) ---------------------------------------------------------
IPVS_GENL_NAME = "IPVS"
IPVS_GENL_VERSION = 1

CMD_NEW_SERVICE = 1
CMD_SET_SERVICE = 2
CMD_DEL_SERVICE = 3
CMD_GET_SERVICE = 4
CMD_NEW_DEST = 5
CMD_SET_DEST = 6
CMD_DEL_DEST = 7
CMD_GET_DEST = 8

CMD_ATTR_SERVICE = 1
CMD_ATTR_DEST = 2

SVC_ATTR_AF = 1
SVC_ATTR_PROTOCOL = 2
SVC_ATTR_ADDR = 3
SVC_ATTR_PORT = 4
SVC_ATTR_FWMARK = 5
SVC_ATTR_SCHED_NAME = 6
SVC_ATTR_FLAGS = 7
SVC_ATTR_TIMEOUT = 8
SVC_ATTR_NETMASK = 9
SVC_ATTR_STATS = 10
SVC_ATTR_PE_NAME = 11
SVC_ATTR_STATS64 = 12

DEST_ATTR_ADDR = 1
DEST_ATTR_PORT = 2
DEST_ATTR_FWD_METHOD = 3
DEST_ATTR_WEIGHT = 4
DEST_ATTR_U_THRESH = 5
DEST_ATTR_L_THRESH = 6
DEST_ATTR_ACTIVE_CONNS = 7
DEST_ATTR_INACT_CONNS = 8
DEST_ATTR_PERSIST_CONNS = 9
DEST_ATTR_STATS = 10
DEST_ATTR_ADDR_FAMILY = 11
DEST_ATTR_STATS64 = 12

STATS_ATTR_CONNS = 1
STATS_ATTR_INPKTS = 2
STATS_ATTR_OUTPKTS = 3
STATS_ATTR_INBYTES = 4
STATS_ATTR_OUTBYTES = 5

PROTOCOLS: dict[str, int] = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES: dict[int, str] = {v: k for k, v in PROTOCOLS.items()}
FORWARD_METHODS: dict[str, int] = {"masq": 0, "local": 1, "tunnel": 2, "route": 3, "bypass": 4}
FORWARD_NAMES: dict[int, str] = {v: k for k, v in FORWARD_METHODS.items()}

# Batching: at most this many requests / bytes per send. The error replies of a whole batch must
# fit the receive buffer (each costs about 1 KiB of it), which is raised to RCVBUF when allowed.
BATCH_MESSAGES = 1024
BATCH_BYTES = 192 * 1024
SNDBUF = 1 << 20
RCVBUF = 8 << 20
RECV_SIZE = 1 << 20
RECV_TIMEOUT = 60.0  # the kernel answers within its send; this only guards against a hang

_ALREADY_ON_DELETE = frozenset({errnos.ENOENT, errnos.ESRCH})
_FATAL = frozenset({errnos.EPERM, errnos.EACCES})


# -- errors ------------------------------------------------------------------------------------
class IPVSError(DataplaneError):
    """IPVS could not be read or changed. `errno` is the kernel's answer when there was one."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class IPVSUnavailable(IPVSError):
    """The kernel has no IPVS generic netlink family (no CONFIG_IP_VS, or ip_vs not loaded)."""


class IPVSPermissionError(IPVSError):
    """The kernel refused with EPERM/EACCES: kproxy lacks CAP_NET_ADMIN. Fatal."""


class IPVSOpError(IPVSError):
    """One operation failed (raised by the single-operation methods)."""

    def __init__(self, failure: OpFailure) -> None:
        super().__init__(str(failure), failure.errno)
        self.failure = failure


# -- the objects: kproxy.render's, as they are --------------------------------------------------
def address_family(address: str) -> int:
    """socket.AF_INET or AF_INET6 for an address's text."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


IPVSTable = dict[VSKey, ObservedVS]


@dataclass(frozen=True, slots=True)
class OpFailure:
    op: Op
    errno: int

    def __str__(self) -> str:
        name = errnos.errorcode.get(self.errno, str(self.errno))
        return f"{describe_op(self.op)}: {name} ({os.strerror(self.errno)})"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What `IPVSAdapter.apply` did, counted in netlink requests (an `AddVS` is one for the
    service and one per real server). `done` counts requests whose effect holds afterwards
    (including `already`: adds that found the object, deletes that found nothing)."""

    done: int = 0
    already: int = 0
    failures: tuple[OpFailure, ...] = ()
    messages: int = 0  # netlink requests sent (follow-up edits included)
    sends: int = 0  # datagrams sent
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def describe_op(op: Op) -> str:
    """One line for logs: 'add-dest TCP 10.96.0.1:80 -> 10.244.1.5:8080 w1'."""
    match op:
        case AddVS(vs) | EditVS(vs):
            verb = "add-service" if isinstance(op, AddVS) else "edit-service"
            extra = f" persistent {vs.timeout}" if vs.timeout else ""
            return f"{verb} {vs.key} {vs.scheduler} flags={vs.flags:#x}{extra}"
        case DelVS(key):
            return f"delete-service {key}"
        case AddDest(key, d) | EditDest(key, d):
            verb = "add-dest" if isinstance(op, AddDest) else "edit-dest"
            return f"{verb} {key} -> {d.hostport} w{d.weight}"
        case DelDest(key, address, port):
            return f"delete-dest {key} -> {Dest(address, port).hostport}"
    raise TypeError(f"not an IPVS operation: {op!r}")


# -- encoding (pure) ---------------------------------------------------------------------------
_GENL = struct.Struct("=BBH")  # genlmsghdr: cmd, version, reserved
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_I32 = struct.Struct("=i")
_FLAGS = struct.Struct("=II")


def _pack_addr(address: str) -> tuple[int, bytes]:
    fam = address_family(address)
    try:
        return fam, socket.inet_pton(fam, address)
    except OSError as err:
        raise ValueError(f"not an IP address: {address!r}") from err


def encode_service_key(key: VSKey) -> bytes:
    """The IPVS_CMD_ATTR_SERVICE nest naming a virtual server (for deletes and real server ops)."""
    fam, raw = _pack_addr(key.address)
    proto = PROTOCOLS.get(key.protocol)
    if proto is None:
        raise ValueError(f"protocol {key.protocol!r}: not one of {sorted(PROTOCOLS)}")
    body = (
        _nla_u16(SVC_ATTR_AF, fam)
        + _nla_u16(SVC_ATTR_PROTOCOL, proto)
        + _nla(SVC_ATTR_ADDR, raw)
        + _nla_be16(SVC_ATTR_PORT, key.port)
    )
    return _nla(CMD_ATTR_SERVICE, body)


def encode_service(vs: VirtualServer) -> bytes:
    """The full IPVS_CMD_ATTR_SERVICE nest (add/edit): every field the kernel reads. The
    netmask is always one address (an IPv4 /32 mask in network byte order, the IPv6 prefix
    length 128 in host order, as ipvsadm sends them): kproxy's persistence is per client."""
    sched = vs.scheduler.encode("ascii") + b"\0"
    netmask = _U32.pack(128) if ":" in vs.key.address else b"\xff\xff\xff\xff"
    body = (
        encode_service_key(vs.key)[4:]
        + _nla(SVC_ATTR_SCHED_NAME, sched)
        + _nla(SVC_ATTR_FLAGS, _FLAGS.pack(vs.flags & ~FLAG_HASHED, 0xFFFFFFFF))
        + _nla_u32(SVC_ATTR_TIMEOUT, vs.timeout)
        + _nla(SVC_ATTR_NETMASK, netmask)
    )
    return _nla(CMD_ATTR_SERVICE, body)


_DEST4 = struct.Struct("=HH4sHHHxxHHIHHIHHIHHIHHHxx")  # addr port fwd weight u l family
_DEST6 = struct.Struct("=HH16sHHHxxHHIHHIHHIHHIHHHxx")


def encode_dest(d: Dest) -> bytes:
    """The full IPVS_CMD_ATTR_DEST nest (add/edit): masquerade forwarding, no thresholds."""
    fam, raw = _pack_addr(d.address)
    st = _DEST6 if fam == socket.AF_INET6 else _DEST4
    body = st.pack(
        4 + len(raw),
        DEST_ATTR_ADDR,
        raw,
        6,
        DEST_ATTR_PORT,
        socket.htons(d.port),
        8,
        DEST_ATTR_FWD_METHOD,
        FORWARD_METHODS["masq"],
        8,
        DEST_ATTR_WEIGHT,
        d.weight,
        8,
        DEST_ATTR_U_THRESH,
        0,
        8,
        DEST_ATTR_L_THRESH,
        0,
        6,
        DEST_ATTR_ADDR_FAMILY,
        fam,
    )
    return _NLA.pack(4 + len(body), CMD_ATTR_DEST) + body


def encode_dest_key(address: str, port: int) -> bytes:
    """The IPVS_CMD_ATTR_DEST nest naming a real server (for deletes)."""
    fam, raw = _pack_addr(address)
    body = _nla(DEST_ATTR_ADDR, raw) + _nla_be16(DEST_ATTR_PORT, port)
    return _nla(CMD_ATTR_DEST, body + _nla_u16(DEST_ATTR_ADDR_FAMILY, fam))


def encode_message(family_id: int, cmd: int, seq: int, flags: int, attrs: bytes) -> bytes:
    """One generic netlink request of the IPVS family."""
    return (
        _HDR.pack(20 + len(attrs), family_id, flags, seq, 0)
        + _GENL.pack(cmd, IPVS_GENL_VERSION, 0)
        + attrs
    )


def op_requests(
    op: Op, key_cache: dict[VSKey, bytes] | None = None
) -> Iterator[tuple[Op, int, bytes]]:
    """(operation, command, attributes) of each netlink request `op` takes: one, except an
    `AddVS`, which is its service's request followed by one `AddDest` per real server.
    `key_cache` memoises service-key nests, which every real server request repeats."""
    cache = {} if key_cache is None else key_cache

    def svc_key(key: VSKey) -> bytes:
        nest = cache.get(key)
        if nest is None:
            nest = cache[key] = encode_service_key(key)
        return nest

    match op:
        case AddDest(key, d):
            yield op, CMD_NEW_DEST, svc_key(key) + encode_dest(d)
        case EditDest(key, d):
            yield op, CMD_SET_DEST, svc_key(key) + encode_dest(d)
        case DelDest(key, address, port):
            yield op, CMD_DEL_DEST, svc_key(key) + encode_dest_key(address, port)
        case AddVS(vs):
            yield op, CMD_NEW_SERVICE, encode_service(vs)
            for d in vs.dests:
                yield AddDest(vs.key, d), CMD_NEW_DEST, svc_key(vs.key) + encode_dest(d)
        case EditVS(vs):
            yield op, CMD_SET_SERVICE, encode_service(vs)
        case DelVS(key):
            yield op, CMD_DEL_SERVICE, svc_key(key)
        case _:
            raise TypeError(f"not an IPVS operation: {op!r}")


def follow_up(op: Op, err: int) -> Op | None:
    """The request that completes `op` after error `err`: an add that found the object edits it
    to the requested settings (its real servers are requests of their own). None when there is
    none."""
    if err == errnos.EEXIST:
        if isinstance(op, AddVS):
            return EditVS(op.vs)
        if isinstance(op, AddDest):
            return EditDest(op.key, op.dest)
    return None


def already_done(op: Op, err: int) -> bool:
    """Whether error `err` means `op`'s effect already holds (a delete that found nothing)."""
    return isinstance(op, DelVS | DelDest) and err in _ALREADY_ON_DELETE


def plan_batches(
    requests: Sequence[bytes], *, max_messages: int = BATCH_MESSAGES, max_bytes: int = BATCH_BYTES
) -> list[range]:
    """Split encoded requests into consecutive batches (index ranges) that fit one send."""
    out: list[range] = []
    start = 0
    size = 0
    for i, req in enumerate(requests):
        if i > start and (i - start >= max_messages or size + len(req) > max_bytes):
            out.append(range(start, i))
            start, size = i, 0
        size += len(req)
    if start < len(requests):
        out.append(range(start, len(requests)))
    return out


# -- decoding (pure) ---------------------------------------------------------------------------
def _uint(buf: memoryview, span: Span | None) -> int:
    """A host-order unsigned integer attribute (u8..u64); 0 when absent."""
    if span is None:
        return 0
    off, n = span
    if n == 4:
        return int(_U32.unpack_from(buf, off)[0])
    if n == 8:
        return int(_U64.unpack_from(buf, off)[0])
    return int.from_bytes(buf[off : off + n], sys.byteorder)


def _be16(buf: memoryview, span: Span | None) -> int:
    return 0 if span is None else int.from_bytes(buf[span[0] : span[0] + 2], "big")


def _addr_text(buf: memoryview, span: Span, family: int) -> str:
    off = span[0]
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(bytes(buf[off : off + 16])))
    return socket.inet_ntoa(buf[off : off + 4])


# The kernel's stats64 nest starts with CONNS, INPKTS, OUTPKTS, INBYTES, OUTBYTES as u64
# attributes, in that order: one unpack reads them (anything else takes the general path).
_STATS64_HEAD = struct.Struct("=HHQHHQHHQHHQHHQ")
_STATS64_SHAPE = (12, 1, 12, 2, 12, 3, 12, 4, 12, 5)


def _stats(buf: memoryview, a: dict[int, Span], a64: int, a32: int) -> Stats | None:
    span = a.get(a64)
    if span is not None and span[1] >= _STATS64_HEAD.size:
        v = _STATS64_HEAD.unpack_from(buf, span[0])
        if v[0::3] + v[1::3] == _STATS64_SHAPE[0::2] + _STATS64_SHAPE[1::2]:
            return Stats(v[2], v[5], v[8], v[11], v[14])
    span = span or a.get(a32)
    if span is None:
        return None
    s = scan_attrs(buf, span[0], span[0] + span[1])
    return Stats(
        conns=_uint(buf, s.get(STATS_ATTR_CONNS)),
        inpkts=_uint(buf, s.get(STATS_ATTR_INPKTS)),
        outpkts=_uint(buf, s.get(STATS_ATTR_OUTPKTS)),
        inbytes=_uint(buf, s.get(STATS_ATTR_INBYTES)),
        outbytes=_uint(buf, s.get(STATS_ATTR_OUTBYTES)),
    )


def _nest(payload: memoryview, kind: int, what: str) -> dict[int, Span]:
    top = scan_attrs(payload, 4)  # after the genl header
    span = top.get(kind)
    if span is None:
        raise IPVSError(f"{what} reply without its attribute nest")
    return scan_attrs(payload, span[0], span[0] + span[1])


def decode_service(payload: memoryview) -> ObservedVS | None:
    """A virtual server (without its real servers) from a GET_SERVICE reply (the genl payload);
    None for fwmark services and protocols kproxy does not handle."""
    a = _nest(payload, CMD_ATTR_SERVICE, "service")
    if _uint(payload, a.get(SVC_ATTR_FWMARK)) or SVC_ATTR_ADDR not in a:
        return None
    proto = PROTOCOL_NAMES.get(_uint(payload, a.get(SVC_ATTR_PROTOCOL)))
    if proto is None:
        return None
    fam = _uint(payload, a.get(SVC_ATTR_AF))
    flags_span = a.get(SVC_ATTR_FLAGS)
    flags = _FLAGS.unpack_from(payload, flags_span[0])[0] if flags_span else 0
    flags &= ~FLAG_HASHED
    timeout = _uint(payload, a.get(SVC_ATTR_TIMEOUT)) if flags & FLAG_PERSISTENT else 0
    if not timeout:
        flags &= ~FLAG_PERSISTENT
    mask_span = a.get(SVC_ATTR_NETMASK)
    if fam == socket.AF_INET6:
        plen, host = _uint(payload, mask_span), 128
    else:
        raw = payload[mask_span[0] : mask_span[0] + 4] if mask_span else b""
        plen, host = bin(int.from_bytes(raw, "big")).count("1"), 32
    sched_span = a.get(SVC_ATTR_SCHED_NAME)
    sched = b""
    if sched_span:
        sched = bytes(payload[sched_span[0] : sched_span[0] + sched_span[1]]).split(b"\0", 1)[0]
    return ObservedVS(
        VSKey(_addr_text(payload, a[SVC_ATTR_ADDR], fam), proto, _be16(payload, a[SVC_ATTR_PORT])),
        scheduler=sched.decode("ascii"),
        flags=flags,
        timeout=timeout,
        netmask=None if plen in (0, host) else plen,
        stats=_stats(payload, a, SVC_ATTR_STATS64, SVC_ATTR_STATS),
    )


def decode_dest(payload: memoryview, family: int, *, stats: bool = True) -> ObservedDest:
    """A real server from a GET_DEST reply (the genl payload) of a virtual server in `family`.

    The hot path of a dump: one pass over the attributes, u32 values read as they pass
    (`stats=False` skips the counters)."""
    top = scan_attrs(payload, 4)
    nest = top.get(CMD_ATTR_DEST)
    if nest is None:
        raise IPVSError("dest reply without its attribute nest")
    ints = [0] * 16
    spans: dict[int, Span] = {}
    off, stop = nest[0], nest[0] + nest[1]
    unpack, u32 = _NLA.unpack_from, _U32.unpack_from
    while off + 4 <= stop:
        length, kind = unpack(payload, off)
        if length < 4:
            break
        kind &= 0x3FFF
        if length == 8 and 1 < kind < 16:  # a u32 (kind 1, the address, may be 4 bytes too)
            ints[kind] = u32(payload, off + 4)[0]
        else:
            spans[kind] = (off + 4, length - 4)
        off += (length + 3) & ~3
    fam = _uint(payload, spans.get(DEST_ATTR_ADDR_FAMILY)) or family
    return ObservedDest(
        _addr_text(payload, spans[DEST_ATTR_ADDR], fam),
        _be16(payload, spans.get(DEST_ATTR_PORT)),
        ints[DEST_ATTR_WEIGHT],
        ints[DEST_ATTR_ACTIVE_CONNS],
        ints[DEST_ATTR_INACT_CONNS],
        FORWARD_NAMES.get(ints[DEST_ATTR_FWD_METHOD] & 0x7, "masq"),
        ints[DEST_ATTR_PERSIST_CONNS],
        _stats(payload, spans, DEST_ATTR_STATS64, DEST_ATTR_STATS) if stats else None,
    )


# -- the socket --------------------------------------------------------------------------------
def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:  # without CAP_NET_ADMIN: capped at net.core.[rw]mem_max
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


class IPVSAdapter:
    """kproxy's handle on the kernel's IPVS table (of the network namespace it was opened in,
    or of the named one).

    `dump()` reads everything; `apply(ops)` programs a batch; the single-operation methods wrap
    `apply` and raise `IPVSOpError` on failure.
    """

    def __init__(self, *, netns: str | None = None) -> None:
        self._sock = netns_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self._sock.bind((0, 0))
            _set_buffer(self._sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, SNDBUF)
            _set_buffer(self._sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, RCVBUF)
            with contextlib.suppress(OSError):  # error replies carry only the request's header
                self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self._sock.settimeout(RECV_TIMEOUT)
            self._buf = bytearray(RECV_SIZE)
            self._seq = int(time.time()) & 0xFFFFFF
            self.family_id = self._resolve_family()
        except BaseException:
            self._sock.close()
            raise

    # -- plumbing --------------------------------------------------------------------------
    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> IPVSAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _recv(self) -> memoryview:
        try:
            n = self._sock.recv_into(self._buf)
        except TimeoutError as err:
            raise IPVSError(f"no netlink reply within {RECV_TIMEOUT:.0f} s") from err
        except OSError as err:
            if err.errno == errnos.ENOBUFS:
                raise IPVSError(
                    "netlink receive buffer overrun: replies were lost, the table state is "
                    "unknown (resync from a dump)"
                ) from err
            raise IPVSError(f"netlink recv: {err}") from err
        return memoryview(self._buf)[:n]

    def _resolve_family(self) -> int:
        seq = self._next_seq()
        name = _nla(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME.encode() + b"\0")
        msg = (
            _HDR.pack(20 + len(name), GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
            + _GENL.pack(CTRL_CMD_GETFAMILY, 1, 0)
            + name
        )
        self._sock.send(msg)
        family_id: int | None = None
        while True:
            for m in parse_messages(self._recv()):
                if m.seq != seq:
                    continue
                if m.type == NLMSG_ERROR:
                    err = error_code(m.payload)
                    if err == errnos.ENOENT:
                        raise IPVSUnavailable(
                            "the kernel has no IPVS netlink family (modprobe ip_vs?)"
                        )
                    if err:
                        raise IPVSError(f"generic netlink family lookup: {os.strerror(err)}", err)
                    if family_id is None:
                        raise IPVSError("generic netlink family lookup: no answer")
                    return family_id
                attrs = scan_attrs(m.payload, 4)
                if CTRL_ATTR_FAMILY_ID in attrs:
                    family_id = int(_U16.unpack_from(m.payload, attrs[CTRL_ATTR_FAMILY_ID][0])[0])

    def _dump_raw(self, cmd: int, attrs: bytes) -> Iterator[memoryview]:
        """The genl payloads of one dump request, in order. Each is a view into the receive
        buffer: valid until the next iteration."""
        seq = self._next_seq()
        self._sock.send(encode_message(self.family_id, cmd, seq, NLM_F_REQUEST | NLM_F_DUMP, attrs))
        while True:
            for m in parse_messages(self._recv()):
                if m.seq != seq:
                    log.debug("ignoring stale netlink reply seq=%d type=%d", m.seq, m.type)
                    continue
                if m.type == NLMSG_DONE:
                    return
                if m.type == NLMSG_ERROR:
                    err = error_code(m.payload)
                    if err in _FATAL:
                        raise IPVSPermissionError(f"IPVS dump: {os.strerror(err)}", err)
                    if err:
                        raise IPVSError(f"IPVS dump (cmd {cmd}): {os.strerror(err)}", err)
                    return
                yield m.payload

    # -- reading ---------------------------------------------------------------------------
    def services(self) -> list[ObservedVS]:
        """Every (non-fwmark) virtual server, without real servers."""
        out: list[ObservedVS] = []
        for payload in self._dump_raw(CMD_GET_SERVICE, b""):
            vs = decode_service(payload)
            if vs is not None:
                out.append(vs)
        return out

    def dests(self, key: VSKey, *, stats: bool = True) -> tuple[ObservedDest, ...]:
        """The real servers of one virtual server (none when it does not exist)."""
        fam = address_family(key.address)
        try:
            return tuple(
                decode_dest(payload, fam, stats=stats)
                for payload in self._dump_raw(CMD_GET_DEST, encode_service_key(key))
            )
        except IPVSError as err:
            if err.errno not in (errnos.ESRCH, errnos.ENOENT):
                raise
            log.debug("dest dump of %s: %s (the service vanished)", key, err)
            return ()

    def count_services(self, family: int) -> int:
        """How many (non-fwmark) virtual servers of `family` (4 or 6) there are: one service
        dump, counted without decoding the services (the drift check's read)."""
        af = socket.AF_INET6 if family == 6 else socket.AF_INET
        n = 0
        for payload in self._dump_raw(CMD_GET_SERVICE, b""):
            a = _nest(payload, CMD_ATTR_SERVICE, "service")
            fwmark = _uint(payload, a.get(SVC_ATTR_FWMARK))
            n += not fwmark and _uint(payload, a.get(SVC_ATTR_AF)) == af
        return n

    def count_dests(self, key: VSKey) -> int:
        """How many real servers one virtual server has (0 when it does not exist), undecoded."""
        try:
            return sum(1 for _ in self._dump_raw(CMD_GET_DEST, encode_service_key(key)))
        except IPVSError as err:
            if err.errno not in (errnos.ESRCH, errnos.ENOENT):
                raise
            return 0

    def dump(self, *, stats: bool = True) -> IPVSTable:
        """The whole table, real servers with connection counts, and with the counters unless
        `stats=False` (a reconcile needs none: it saves about a third of the decoding)."""
        return {
            vs.key: replace(vs, dests=self.dests(vs.key, stats=stats)) for vs in self.services()
        }

    # -- writing ---------------------------------------------------------------------------
    def apply(self, ops: Sequence[Op]) -> ApplyResult:
        """Carry out `ops` in order, batched (module docstring). Raises IPVSPermissionError on
        EPERM/EACCES (after the batch in flight) and IPVSError when replies were lost."""
        started = time.perf_counter()
        cache: dict[VSKey, bytes] = {}
        pending = [req for op in ops for req in op_requests(op, cache)]
        done = already = messages = sends = 0
        failures: list[OpFailure] = []
        fatal: OpFailure | None = None
        for start in range(0, len(pending), BATCH_MESSAGES):
            batch_ops = pending[start : start + BATCH_MESSAGES]
            errors, n_sends = self._send_batch(batch_ops)
            messages += len(batch_ops)
            sends += n_sends
            retry: list[tuple[Op, int, bytes]] = []
            for i, (op, _cmd, _attrs) in enumerate(batch_ops):
                err = errors.get(i, 0)
                if not err:
                    done += 1
                elif err in _FATAL:
                    fatal = fatal or OpFailure(op, err)
                elif already_done(op, err):
                    done += 1
                    already += 1
                elif (nxt := follow_up(op, err)) is not None:
                    retry.extend(op_requests(nxt, cache))
                else:
                    failures.append(OpFailure(op, err))
            if retry:
                errors, n_sends = self._send_batch(retry)
                messages += len(retry)
                sends += n_sends
                for i, (op, _cmd, _attrs) in enumerate(retry):
                    err = errors.get(i, 0)
                    if not err:
                        done += 1
                        already += 1
                    elif err in _FATAL:
                        fatal = fatal or OpFailure(op, err)
                    else:
                        failures.append(OpFailure(op, err))
            if fatal is not None:
                raise IPVSPermissionError(str(fatal), fatal.errno)
        result = ApplyResult(
            done=done,
            already=already,
            failures=tuple(failures),
            messages=messages,
            sends=sends,
            seconds=time.perf_counter() - started,
        )
        for f in failures[:20]:
            log.warning("IPVS: %s", f)
        if len(failures) > 20:
            log.warning("IPVS: ... and %d more failures", len(failures) - 20)
        return result

    def _send_batch(self, batch: Sequence[tuple[Op, int, bytes]]) -> tuple[dict[int, int], int]:
        """Send `batch` (split to fit one datagram each) and return ({index: errno} for the
        requests that failed, datagrams sent)."""
        fid = self.family_id
        errors: dict[int, int] = {}
        sends = 0
        reqs = [b""] * len(batch)
        seqs = [0] * len(batch)
        for i, (_op, cmd, attrs) in enumerate(batch):
            seqs[i] = self._next_seq()
            reqs[i] = encode_message(fid, cmd, seqs[i], NLM_F_REQUEST, attrs)
        for part in plan_batches(reqs, max_messages=len(reqs) or 1):
            last = part[-1]
            # Only the last request asks for an acknowledgement; the others answer on failure.
            reqs[last] = encode_message(
                fid, batch[last][1], seqs[last], NLM_F_REQUEST | NLM_F_ACK, batch[last][2]
            )
            index = {seqs[i]: i for i in part}
            try:
                self._sock.send(b"".join(reqs[i] for i in part))
            except OSError as err:
                raise IPVSError(f"netlink send: {err}") from err
            sends += 1
            final = seqs[last]
            finished = False
            while not finished:
                for m in parse_messages(self._recv()):
                    if m.type != NLMSG_ERROR:
                        continue
                    at = index.get(m.seq)
                    if at is None:
                        log.debug("ignoring stale netlink reply seq=%d", m.seq)
                        continue
                    code = error_code(m.payload)
                    if code:
                        errors[at] = code
                    if m.seq == final:
                        finished = True
        return errors, sends

    # -- single operations -----------------------------------------------------------------
    def apply_one(self, op: Op) -> None:
        """`apply([op])`, raising `IPVSOpError` on its first failure."""
        result = self.apply([op])
        if result.failures:
            raise IPVSOpError(result.failures[0])
