"""Reads of this node's kernel state for the inspection commands (`status`, `explain`).

Read-only: iptables-save -c of the flavour kproxy uses, ipset contents, `ipvsadm -Ln`, the
`recent` lists behind session affinity, local addresses and the source address the kernel would
pick. Each read returns text or plain values; parsing lives in the pure modules
(kproxy.inspect.iptrace, kproxy.inspect.ipvsadm).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kproxy.backends.base import SyncError
from kproxy.backends.iptables_exec import detect_flavour
from kproxy.backends.netinfo import local_addresses
from kproxy.errors import DataplaneError
from kproxy.inspect.iptrace import Ruleset, parse_save
from kproxy.render.ipvs import DUMMY_DEVICE

XT_RECENT = Path("/proc/net/xt_recent")


class ReadError(DataplaneError):
    """A kernel read the command cannot do without (no iptables, no permission)."""


@dataclass(frozen=True, slots=True)
class LiveRules:
    ruleset: Ruleset
    binary: str  # e.g. iptables-nft-save
    family: int


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def read_rules(family: int, *, tables: tuple[str, ...] = ("nat", "filter")) -> LiveRules:
    """The live nat and filter tables (with counters) of the flavour kproxy would use here."""
    try:
        flavour = detect_flavour(family)
    except SyncError as err:  # no iptables-restore installed
        raise ReadError(str(err)) from err
    base = "ip6tables" if family == 6 else "iptables"
    binary = f"{base}-{flavour}-save"
    if shutil.which(binary) is None:
        raise ReadError(f"{binary} is not installed")
    rs = Ruleset()
    for table in tables:
        res = _run([binary, "-c", "-t", table])
        if res.returncode != 0:
            raise ReadError(f"{binary} -t {table} failed: {res.stderr.strip()}")
        parse_save(res.stdout, rs)
    return LiveRules(rs, binary, family)


def node_addresses(family: int) -> frozenset[str]:
    return frozenset(local_addresses(family))


def route_source(destination: str, port: int) -> str | None:
    """The source address the kernel picks for a connection to `destination` (no packet sent:
    connecting a UDP socket only consults the routing table). None when there is no route."""
    fam = socket.AF_INET6 if ":" in destination else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((destination, port or 9))
        except OSError:
            return None
        return str(sock.getsockname()[0])


def recent_lists(directory: Path = XT_RECENT) -> dict[str, frozenset[str]]:
    """The addresses each xt_recent list (one per KUBE-SEP chain with affinity) remembers."""
    out: dict[str, frozenset[str]] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        try:
            text = (directory / name).read_text()
        except OSError:
            continue
        out[name] = frozenset(
            word[4:]
            for line in text.splitlines()
            for word in line.split()[:1]
            if word.startswith("src=")
        )
    return out


def ipset_save() -> str | None:
    """`ipset save` output, None when ipset is missing or fails."""
    if shutil.which("ipset") is None:
        return None
    res = _run(["ipset", "save"])
    return res.stdout if res.returncode == 0 else None


def ipvsadm_list() -> str | None:
    """`ipvsadm -Ln` output, None when ipvsadm is missing or the kernel has no IPVS."""
    if shutil.which("ipvsadm") is None:
        return None
    res = _run(["ipvsadm", "-Ln"])
    return res.stdout if res.returncode == 0 else None


def ipvs_present() -> bool:
    """True when this node has kproxy's (or kube-proxy's) IPVS dummy device."""
    return os.path.exists(f"/sys/class/net/{DUMMY_DEVICE}")
