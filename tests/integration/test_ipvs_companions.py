"""IPVS mode's kernel companions that the development kernel has (ipsets, iptables): created,
changed incrementally, hooked idempotently and cleaned up, inside a throwaway namespace.

IPVS itself and kube-ipvs0 need the VM (tests/vm); these parts do not, so they run on every host.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.model.options import ProxyOptions
from kproxy.render import ipvs as R
from kproxy.render import ipvs_rules as RR
from tests.support.lab import require_netns

pytestmark = [pytest.mark.netns]

CHILD = r"""
import json, sys
from kproxy.backends import ipset, ipvs_iptables
from kproxy.model.options import ProxyOptions
op = sys.argv[1]
fam = int(sys.argv[2])
out = {}
sets = ipset.IPSets(fam)
if op == "program":
    sets.ensure()
    out["lines1"] = sets.update(add={"KUBE-CLUSTER-IP": ["%s,tcp:80" % sys.argv[3]],
                                     "KUBE-NODE-PORT-TCP": ["30080"]})
    out["lines2"] = sets.update(add={"KUBE-CLUSTER-IP": ["%s,tcp:80" % sys.argv[3]]})
    want = {"KUBE-CLUSTER-IP": ["%s,tcp:80" % sys.argv[3]], "KUBE-NODE-PORT-TCP": ["30081"]}
    out["lines3"] = sets.sync_to(want, phase="add")
    out["lines4"] = sets.sync_to(want, phase="delete")
    out["read"] = {k: sorted(v) for k, v in ipset.IPSets(fam).read().items() if v}
    more = json.loads(sys.argv[5])
    sets.update(add=more)
    out["every_type"] = {k: sorted(v) for k, v in ipset.IPSets(fam).read().items() if v}
    saved = ipset.parse_save(ipset._run(["save"]))
    out["saved"] = {k: sorted(v.entries) for k, v in saved.items() if v.entries}
    rules = ipvs_iptables.CompanionRules(ProxyOptions(family=fam), flavour=sys.argv[4])
    out["rules"] = rules.apply()
    rules.apply()
    out["present"] = rules.present()
elif op == "cleanup":
    out["chains"] = ipvs_iptables.cleanup_rules((fam,))
    out["sets"] = ipset.destroy_all((fam,))
print(json.dumps(out))
"""


def _skip_unless_tools() -> None:
    require_netns()
    for tool in ("ipset", "iptables-nft-restore", "iptables-legacy-restore"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


@pytest.fixture
def netns() -> Iterator[str]:
    _skip_unless_tools()
    name = f"kpic{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def child(ns: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "python3", "-c", CHILD, *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def ns_out(ns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize(
    ("family", "flavour"),
    [(4, "nft"), (4, "legacy"), (6, "nft")],
    ids=["v4-nft", "v4-legacy", "v6-nft"],
)
def test_sets_and_rules_program_incrementally_and_clean_up(
    netns: str, family: int, flavour: str
) -> None:
    vip = "fd00:96::1" if family == 6 else "10.96.0.1"
    pod = "fd00:10:244:1::11" if family == 6 else "10.244.1.11"
    net = "fd00:10::/32" if family == 6 else "10.0.0.0/8"
    host = "2001:db8::5" if family == 6 else "203.0.113.5"
    more = {  # one element of every set type kproxy uses
        R.LOOP_BACK: [f"{pod},tcp:8080,{pod}"],
        R.LB_SOURCE_CIDR: [f"{vip},udp:53,{net}", f"{vip},tcp:80,{host}"],
        R.IPVS_IPS: [vip],
        R.NODE_PORT_UDP: ["30053"],
        R.NODE_PORT_SCTP: [f"{vip},sctp:30099"],
    }
    out = child(netns, "program", str(family), vip, flavour, json.dumps(more))
    assert out["lines1"] == 2  # two adds in one batch
    assert out["lines2"] == 0  # already there: no ipset process at all
    assert out["lines3"] == 1 and out["lines4"] == 1  # add 30081, then delete 30080
    name = R.SET_SPECS[R.CLUSTER_IP_SET].name(family)
    assert out["read"] == {
        R.CLUSTER_IP_SET: [f"{vip},tcp:80"],
        R.NODE_PORT_TCP: ["30081"],
    }
    assert name in ns_out(netns, "ipset", "list", "-n").split()
    # what kproxy writes over netlink is what the ipset tool lists, and reads back the same
    expected = {base: sorted(entries) for base, entries in more.items()}
    expected[R.CLUSTER_IP_SET] = [f"{vip},tcp:80"]
    expected[R.NODE_PORT_TCP] = ["30081"]
    assert out["every_type"] == expected
    assert out["saved"] == {R.SET_SPECS[b].name(family): v for b, v in expected.items()}
    prog = "ip6tables" if family == 6 else "iptables"
    save = ns_out(netns, f"{prog}-{flavour}-save")
    # every rule of the companion text is in the kernel, in iptables-save's own spelling
    text = RR.companion_rules(ProxyOptions(family=family))
    assert sum(out["rules"].values()) == text.count("\n-A ")
    assert set(out["rules"]) == {"nat", "filter"}
    for line in text.splitlines():
        if line.startswith("-A "):
            assert line in save
    # hooks are inserted once however often the rules are written
    for hook in RR.HOOKS:
        assert save.count(hook.line) == 1, hook.line
    assert out["present"]

    gone = child(netns, "cleanup", str(family))
    assert gone["sets"] and gone["chains"]
    assert "KUBE-" not in ns_out(netns, f"{prog}-{flavour}-save")
    assert not [s for s in ns_out(netns, "ipset", "list", "-n").split() if s.startswith("KUBE-")]
