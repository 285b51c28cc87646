"""Fixtures of the VM tier: a kernel with IPVS, throwaway network namespaces, ipvsadm.

Tests here run inside the VM that tests/vm/run_in_vm.py boots. Outside it (the development kernel
has no IPVS) every test that asks for `vm_netns` skips, so `pytest` on the host stays green; the
host-side `test_vm_suite.py` is what boots the VM and runs them.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from kproxy.backends.ipvs_netlink import IPVSAdapter, IPVSUnavailable

Run = Callable[..., str]


@functools.cache
def ipvs_unavailable() -> str | None:
    """Why the IPVS tests cannot run on this kernel, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "ipvsadm"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    try:
        IPVSAdapter().close()
    except IPVSUnavailable:
        return "this kernel has no IPVS (the VM tier runs under tests/vm/run_in_vm.py)"
    return None


def sh(*argv: str, netns: str | None = None, stdin: str | None = None) -> str:
    """Run a command (in `netns`), fail the test with its stderr when it fails; its stdout."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    proc = subprocess.run(full, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(full)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def new_netns(prefix: str = "kpvm") -> str:
    name = f"{prefix}{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    # Also needed by IPVS: until the namespace has a local routing table (lo up creates it), the
    # kernel classifies every real server address as broadcast and refuses it with EINVAL.
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


def del_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def vm_netns() -> Iterator[str]:
    """A fresh network namespace on an IPVS kernel (skips elsewhere); deleted afterwards."""
    reason = ipvs_unavailable()
    if reason:
        pytest.skip(reason)
    name = new_netns()
    try:
        yield name
    finally:
        del_netns(name)


@pytest.fixture
def ipvs(vm_netns: str) -> Iterator[IPVSAdapter]:
    """The IPVS adapter of `vm_netns` (whose table starts empty)."""
    with IPVSAdapter(netns=vm_netns) as adapter:
        yield adapter


@pytest.fixture
def ipvsadm(vm_netns: str) -> Run:
    """ipvsadm(*args, stdin=None) inside `vm_netns`: its stdout."""

    def run(*args: str, stdin: str | None = None) -> str:
        return sh("ipvsadm", *args, netns=vm_netns, stdin=stdin)

    return run
