"""A kernel without nf_tables gets a clear error, not a traceback (issue 10, build item 5).

The kernel is made to answer as one without nf_tables' netlink family would: the commands
run under tests/support/no_nfnetlink.py, a seccomp filter that makes
socket(AF_NETLINK, *, NETLINK_NETFILTER) fail with EPROTONOSUPPORT, the kernel's own answer
when that family is missing. Everything else is real: `kproxy run`, the nft command, a
throwaway namespace."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_nftables_netlink import netns

__all__ = ["netns"]

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is x86_64's"),
]

REPO = Path(__file__).resolve().parents[2]
NO_NF = [sys.executable, "-m", "tests.support.no_nfnetlink"]


def run(netns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *NO_NF, *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=REPO,
    )


def test_kproxy_run_says_the_kernel_has_no_nf_tables(netns: str, tmp_path: Path) -> None:
    res = run(
        netns,
        sys.executable,
        "-m",
        "kproxy",
        "run",
        "--proxy-mode",
        "nftables",
        "--manifests",
        str(tmp_path),
        "--hostname-override",
        "n1",
        "--no-dns",
        "--healthz-bind-address",
        "127.0.0.1:10256",
        "--metrics-bind-address",
        "127.0.0.1:10249",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "cannot start the nftables dataplane: this kernel has no nf_tables" in out, out
    assert "Traceback" not in out


SYNC = """
from kproxy.backends.base import SyncError
from kproxy.backends.nftables import NftablesProxier, NftCommandWriter
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Store
p = NftablesProxier(options=ProxyOptions(node_name="n"), writer=NftCommandWriter(4))
try:
    p.sync(*Store().take(), full=True)
except SyncError as err:
    print(err)
"""


def test_the_nft_command_failing_the_same_way_says_so(netns: str) -> None:
    res = run(netns, sys.executable, "-c", SYNC)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("this kernel has no nf_tables"), res.stdout
    assert "Protocol not supported" in res.stdout
