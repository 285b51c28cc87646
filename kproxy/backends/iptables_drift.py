"""Is the kernel still holding the iptables rules kproxy wrote? Cheap first, thorough on doubt.

Two steps, so an idle node at 10,000 services spends microseconds per periodic check:

1. A fingerprint of the tables that any write changes, read without listing a rule:
   - nft: the netns' nf_tables ruleset generation (NFT_MSG_GETGEN over netfilter netlink; every
     committed transaction, from any tool, increments it);
   - legacy: each table's entry count and blob size (IPT_SO_GET_INFO / IP6T_SO_GET_INFO, the
     getsockopt iptables-legacy-save itself starts with).
   The proxier records the fingerprint right after each of its own writes; an unchanged
   fingerprint means nobody wrote since. (A write squeezed between kproxy's restore and its
   fingerprint read goes unseen until the next full sync; the window is a millisecond.)
   The nf_tables generation is one per netns, so the IPv4 and IPv6 proxiers move each other's;
   `OWN_NFT` remembers the generations kproxy's own restores produced (a sync whose generation
   moved by no more than its number of table sections), and a move made only of those is no
   write by anyone else. Without it, every IPv6 write would cost the IPv4 proxier a read-back
   of its whole nat table at the next check.
2. When the fingerprint moved (someone wrote: kubelet, a CNI plugin, an admin), the tables are
   read back and compared with what kproxy holds: canary chains, the set of kproxy-owned chains,
   the rule count of every owned chain, and the hook jumps. Only a difference there is drift;
   otherwise the new fingerprint is accepted.

`ChainCounts` is the expected side: owned chain -> rule count, per table.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
from collections import Counter
from collections.abc import Iterable, Mapping

from kproxy.model.objects import IPV6

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")

IPT_SO_GET_INFO = 64  # also IP6T_SO_GET_INFO
_SOL_IP = 0
_SOL_IPV6 = 41
# struct ipt_getinfo: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size
_GETINFO = struct.Struct("=32sI5I5III")


def nft_generation() -> int | None:
    """The nf_tables ruleset generation of the calling thread's netns, or None."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError:
        return None
    try:
        sock.settimeout(2.0)
        sock.bind((0, 0))
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
        sock.send(_HDR.pack(_HDR.size + len(body), kind, NLM_F_REQUEST, 1, 0) + body)
        data = sock.recv(65536)
    except OSError:
        return None
    finally:
        sock.close()
    if len(data) < _HDR.size + _NFGEN.size:
        return None
    length, kind, _flags, _seq, _pid = _HDR.unpack_from(data)
    if kind == NLMSG_ERROR or kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
        return None
    pos = _HDR.size + _NFGEN.size
    end = min(length, len(data))
    while pos + _NLA.size <= end:
        size, attr = _NLA.unpack_from(data, pos)
        if size < _NLA.size:
            break
        if attr & 0x3FFF == NFTA_GEN_ID and size >= 8:
            return int(struct.unpack_from(">I", data, pos + 4)[0])
        pos += (size + 3) & ~3
    return None


_libc: ctypes.CDLL | None = None


def _getsockopt() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc.getsockopt


def legacy_table_info(table: str, family: int = 4) -> tuple[int, int] | None:
    """(entries, size) of an iptables-legacy table, or None (no such table, no permission).

    Python's socket.getsockopt cannot pass the table name in, so this calls libc's."""
    af, level = (socket.AF_INET6, _SOL_IPV6) if family == IPV6 else (socket.AF_INET, _SOL_IP)
    try:
        sock = socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError:
        return None
    try:
        buf = ctypes.create_string_buffer(_GETINFO.pack(table.encode(), 0, *[0] * 10, 0, 0))
        size = ctypes.c_uint(_GETINFO.size)
        rc = _getsockopt()(sock.fileno(), level, IPT_SO_GET_INFO, buf, ctypes.byref(size))
        if rc != 0:
            return None
        fields = _GETINFO.unpack(buf.raw[: _GETINFO.size])
        return int(fields[-2]), int(fields[-1])
    finally:
        sock.close()


def fingerprint(flavour: str, family: int, tables: Iterable[str]) -> tuple[object, ...] | None:
    """What any write to the tables changes; None when it cannot be read (then compare)."""
    if flavour == "nft":
        gen = nft_generation()
        return None if gen is None else ("nft", gen)
    infos = tuple(legacy_table_info(t, family) for t in tables)
    return None if any(i is None for i in infos) else ("legacy", *infos)


class OwnGenerations:
    """nf_tables generations produced by kproxy's own restores, in this process's netns."""

    KEEP = 4096

    def __init__(self) -> None:
        self._own: set[int] = set()

    def note(self, before: int | None, after: int | None, commits: int) -> None:
        """A sync committed `commits` table sections between generations `before` and `after`:
        if the generation moved by no more than that (a section that changes nothing may not
        commit), every generation in between is kproxy's."""
        if before is None or after is None or not 0 < after - before <= commits:
            return
        self._own.update(range(before + 1, after + 1))
        if len(self._own) > self.KEEP:
            floor = after - self.KEEP // 2
            self._own = {g for g in self._own if g > floor}

    def only_own(self, since: int, now: int) -> bool:
        """True when every generation after `since` up to `now` came from kproxy."""
        if now < since or now - since > self.KEEP:
            return False
        return all(g in self._own for g in range(since + 1, now + 1))


OWN_NFT = OwnGenerations()

ChainCounts = Mapping[str, Mapping[str, int]]  # table -> owned chain -> rule count


def saved_counts(save_text: str, owned: Iterable[str] | None = None) -> dict[str, int]:
    """chain -> number of rules, for every chain declared in one table's iptables-save text
    (restricted to `owned` names when given)."""
    declared = [line[1:].split(" ", 1)[0] for line in save_text.splitlines() if line[:1] == ":"]
    rules = Counter(
        line.split(" ", 2)[1] for line in save_text.splitlines() if line.startswith("-A ")
    )
    keep = set(owned) if owned is not None else None
    return {c: rules.get(c, 0) for c in declared if keep is None or c in keep}


def compare_counts(expected: Mapping[str, int], observed: Mapping[str, int]) -> str | None:
    """A short description of how `observed` chain rule counts differ, or None."""
    missing = sorted(set(expected) - set(observed))
    extra = sorted(set(observed) - set(expected))
    changed = sorted(c for c in expected if c in observed and expected[c] != observed[c])
    parts = []
    if missing:
        parts.append(f"{len(missing)} chain(s) missing ({missing[0]}...)")
    if extra:
        parts.append(f"{len(extra)} unknown owned chain(s) ({extra[0]}...)")
    if changed:
        c = changed[0]
        parts.append(
            f"{len(changed)} chain(s) with other rules ({c}: {observed[c]} rules, "
            f"expected {expected[c]})"
        )
    return "; ".join(parts) or None
