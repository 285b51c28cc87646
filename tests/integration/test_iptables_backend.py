"""IptablesProxier against the real kernel, both flavours, in a throwaway namespace."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from kproxy.render.chains import svc_chain
from tests.support.lab import require_netns

pytestmark = [pytest.mark.netns]


@pytest.fixture
def netns() -> Iterator[str]:
    require_netns()
    name = f"kpipt{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def run_in(ns: str, code: str) -> str:
    """Run python `code` inside `ns` (the proxier acts on the namespace it runs in)."""
    import sys

    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


SCRIPT = """
import subprocess, json
from kproxy.backends.iptables import IptablesProxier
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Store
from kproxy.model.objects import Ref
from tests.support.builders import make_endpoint, make_service, make_slice

FLAVOUR = {flavour!r}
def save(t="nat"):
    return subprocess.run(["iptables-%s-save" % FLAVOUR, "-c", "-t", t], capture_output=True,
                          text=True, check=True).stdout
store = Store()
store.replace_services([make_service("ns1", "a", cluster_ips=("172.30.0.1",)),
                        make_service("ns1", "b", cluster_ips=("172.30.0.2",))])
store.replace_slices([make_slice("ns1", "a", endpoints=[make_endpoint("10.1.0.1")]),
                      make_slice("ns1", "b", endpoints=[make_endpoint("10.1.0.2")])])
p = IptablesProxier(options=ProxyOptions(node_name="n"), flavour=FLAVOUR)
snap, ch = store.take()
p.sync(snap, ch, full=True)
first = save()
snap, ch = store.take()
p.sync(snap, ch, full=True)  # a restart-like second full sync
second = save()
# give chain b traffic counters by hand, then change only a
subprocess.run(["iptables-%s" % FLAVOUR, "-t", "nat", "-Z"], check=True)
store.set_slice(make_slice("ns1", "a", endpoints=[make_endpoint("10.1.0.9")]))
snap, ch = store.take()
res = p.sync(snap, ch, full=False)
third = save()
store.delete_service(Ref("ns1", "b"))
snap, ch = store.take()
p.sync(snap, ch, full=False)
fourth = save()
filt = save("filter")
p.cleanup()
print(json.dumps(dict(first=first, second=second, third=third, fourth=fourth, filt=filt,
                      written=res.services_written, full=res.full,
                      after=save() + save("filter") + save("mangle"))))
"""


def strip_counters(text: str) -> str:
    return re.sub(r"^\[\d+:\d+\] ", "", text, flags=re.M)


@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_sync_reconcile_partial_delete_cleanup(netns: str, flavour: str) -> None:
    if shutil.which(f"iptables-{flavour}-restore") is None:
        pytest.skip(f"iptables-{flavour} missing")
    import json

    r = json.loads(run_in(netns, SCRIPT.format(flavour=flavour)).strip().splitlines()[-1])
    a, b = svc_chain("ns1/a:p80", "tcp"), svc_chain("ns1/b:p80", "tcp")
    assert f":{a} " in r["first"] and f":{b} " in r["first"]
    # the hook jumps exist once, even after a second full sync
    hook = "-j KUBE-SERVICES"
    for text in (strip_counters(r["first"]), strip_counters(r["second"])):
        assert (
            sum(1 for ln in text.splitlines() if ln.startswith("-A PREROUTING") and hook in ln) == 1
        )
        assert sum(1 for ln in text.splitlines() if ln.startswith("-A OUTPUT") and hook in ln) == 1
    # partial sync rewrote service a only
    assert not r["full"] and r["written"] == 1
    assert "--to-destination 10.1.0.9:80" in r["third"]
    assert "10.1.0.1:80" not in r["third"] and "10.1.0.2:80" in r["third"]
    # deleting b removes its chains
    assert f":{b} " not in r["fourth"] and "ns1/b" not in r["fourth"]
    assert "KUBE-PROXY-CANARY" in r["filt"]
    # cleanup leaves nothing of ours
    assert "KUBE-" not in r["after"]
