"""Node-local placement in a network namespace: 169.254.20.10:53, the NodeLocal DNSCache address.

kproxy's DNS runs inside a throwaway namespace (standing in for a node), puts 169.254.20.10 on
the `kproxy-dns` dummy interface (or on `lo` where the kernel has no dummy support), answers
`dig` there over UDP and TCP, and removes the address again when it stops.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from kproxy.lab.nsexec import helper_env
from tests.support.lab import require_netns

pytestmark = pytest.mark.netns

NODE_LOCAL = "169.254.20.10"

DRIVER = textwrap.dedent(
    """
    import sys
    from types import MappingProxyType
    from kproxy.dns import DNSOptions, DNSService
    from kproxy.model.objects import Service, ServicePort
    from kproxy.model.store import Snapshot

    port = ServicePort("http", "TCP", 80, 80)
    svc = Service("default", "web", cluster_ips=("10.96.0.5",), ports=(port,))
    snap = Snapshot(services=MappingProxyType({svc.ref: svc}), slices=MappingProxyType({}))
    dns = DNSService(options=DNSOptions(upstreams=(), workers=1))
    dns.start()
    dns.update(snap)
    assert dns.flush(10)
    print("READY", flush=True)
    sys.stdin.read()
    dns.stop()
    print("STOPPED", flush=True)
    """
)


def ns_run(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=False
    ).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    require_netns()
    name = f"kpdns-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_node_local_address_is_created_served_and_removed(netns: str) -> None:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", DRIVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=helper_env(),
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read() if proc.stderr else ""
        addrs = ns_run(netns, "ip", "-o", "addr", "show")
        assert f"{NODE_LOCAL}/32" in addrs
        device = next(ln.split()[1] for ln in addrs.splitlines() if NODE_LOCAL in ln)
        assert device in ("kproxy-dns", "lo")
        for transport in ("+notcp", "+tcp"):
            out = ns_run(
                netns, "dig", f"@{NODE_LOCAL}", "web.default.svc.cluster.local", "+short", transport
            )
            assert out.split() == ["10.96.0.5"]
        proc.stdin.close()
        assert proc.stdout.readline().strip() == "STOPPED"
        proc.wait(10)
        assert NODE_LOCAL not in ns_run(netns, "ip", "-o", "addr", "show")
        assert "kproxy-dns" not in ns_run(netns, "ip", "-o", "link", "show")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cleanup_after_a_crash_removes_the_address(netns: str) -> None:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", DRIVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=helper_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        proc.kill()  # no chance to clean up
        proc.wait(5)
        assert NODE_LOCAL in ns_run(netns, "ip", "-o", "addr", "show")
        code = (
            "from kproxy.dns.placement import cleanup_listen_addresses as c; "
            f"print(c(['{NODE_LOCAL}']))"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=helper_env(),
            check=True,
        ).stdout
        assert NODE_LOCAL in out
        assert NODE_LOCAL not in ns_run(netns, "ip", "-o", "addr", "show")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
