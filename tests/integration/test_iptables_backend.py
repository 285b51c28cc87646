"""IptablesProxier against the real kernel, both flavours, in throwaway namespaces.

Each test runs a small program inside a fresh network namespace (the proxier acts on the
namespace its process is in) that drives the proxier through a scenario and prints JSON: the
iptables-save text at each step and the restore inputs the proxier wrote (recorded by wrapping
the command runner, which still runs the real binaries).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.inspect import iptrace as T
from kproxy.render import chains as C
from tests.support.lab import require_netns
from tests.support.rulesets import as_installed

pytestmark = [pytest.mark.netns]

FLAVOURS = ["nft", "legacy"]


@pytest.fixture
def netns() -> Iterator[str]:
    require_netns()
    name = f"kpipt{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


PRELUDE = """
import json, subprocess, itertools
from kproxy.backends.base import SyncError
from kproxy.backends.iptables import IptablesProxier
from kproxy.backends.iptables_exec import ProcessRestorer
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Changes, Store
from kproxy.model.objects import Ref, EndpointPort
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

FLAVOUR = {flavour!r}
FAMILY = {family!r}
BASE = "ip6tables" if FAMILY == 6 else "iptables"
INPUTS = []

class Recorder:
    \"\"\"The real streaming restorer, remembering each input (and able to spoil the next).\"\"\"
    spoil = None

    def open(self, argv):
        real, parts = ProcessRestorer().open(argv), []
        INPUTS.append(parts)
        spoil, self.spoil = self.spoil, None

        class Sink:
            def write(self, text):
                nonlocal spoil
                if spoil and "COMMIT" in text:
                    text, spoil = text.replace("COMMIT", spoil + "\\nCOMMIT", 1), None
                parts.append(text)
                real.write(text)

            def end(self):
                real.end()

            def wait(self):
                real.wait()

            def abort(self):
                real.abort()

        return Sink()

REC = Recorder()

def inputs():
    return ["".join(parts) for parts in INPUTS]

def save(t="nat"):
    return subprocess.run([f"{{BASE}}-{{FLAVOUR}}-save", "-t", t], capture_output=True,
                          text=True, check=True).stdout

def ipt(*args):
    return subprocess.run([f"{{BASE}}-{{FLAVOUR}}", "-w", "5", *args], capture_output=True,
                          text=True, check=False)

tick = itertools.count(0, 100)  # a clock that always says the canary check is due
out = {{}}
"""


def run_in(ns: str, flavour: str, body: str, *, family: int = 4) -> dict[str, Any]:
    if shutil.which(f"iptables-{flavour}-restore") is None:
        pytest.skip(f"iptables-{flavour} missing")
    code = PRELUDE.format(flavour=flavour, family=family) + textwrap.dedent(body)
    code += "\nprint(json.dumps(out))\n"
    res = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def rules_of(save_text: str, chain: str) -> list[str]:
    return [ln for ln in save_text.splitlines() if ln.startswith(f"-A {chain} ")]


def declared(save_text: str) -> set[str]:
    return {ln[1:].split()[0] for ln in save_text.splitlines() if ln.startswith(":")}


def flow(
    rs: T.Ruleset, pkt: T.Packet, env: T.Environment
) -> tuple[str, bool | None, tuple[T.Outcome, ...]]:
    """(where the packet goes, masqueraded: True/False when every outcome agrees, else None,
    the outcomes). It enters at nat OUTPUT when sent from a node address, else PREROUTING."""
    hook = T.OUTPUT if env.is_local(pkt.src) else T.PREROUTING
    outcomes = T.trace_packet(rs, pkt, hook=hook, env=env)
    masq = {o.masquerade for o in outcomes}
    return T.flow_output(outcomes), masq.pop() if len(masq) == 1 else None, outcomes


SVC_A, SVC_B = C.svc_chain("ns1/a:p80", "tcp"), C.svc_chain("ns1/b:p80", "tcp")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_full_partial_delete_cleanup(netns: str, flavour: str) -> None:
    r = run_in(
        netns,
        flavour,
        """
        store = Store()
        store.replace_services([make_service("ns1", "a", cluster_ips=("172.30.0.1",)),
                                make_service("ns1", "b", cluster_ips=("172.30.0.2",))])
        store.replace_slices([
            make_slice("ns1", "a",
                       endpoints=[make_endpoint("10.1.0.1"), make_endpoint("10.1.0.2")]),
            make_slice("ns1", "b", endpoints=[make_endpoint("10.1.0.3")])])
        p = IptablesProxier(options=ProxyOptions(node_name="n", cluster_cidrs=("10.0.0.0/8",)),
                            flavour=FLAVOUR, restorer=REC, clock=lambda: next(tick))
        snap, ch = store.take()
        first = p.sync(snap, ch, full=True)
        out["first"] = save() + save("filter") + save("mangle")
        out["first_rules"] = first.rules
        snap, ch = store.take()
        again = p.sync(snap, ch, full=True)  # a restart-like second full sync
        out["second"] = save() + save("filter")
        # one endpoint of a goes away: a partial sync
        INPUTS.clear()
        store.set_slice(make_slice("ns1", "a", endpoints=[make_endpoint("10.1.0.2")]))
        snap, ch = store.take()
        part = p.sync(snap, ch, full=False)
        out["partial"] = dict(full=part.full, written=part.services_written, rules=part.rules)
        out["partial_inputs"] = inputs()
        out["third"] = save()
        # nothing changed: nothing is written
        INPUTS.clear()
        p.sync(*store.take(), full=False)
        store.set_service(make_service("ns1", "a", cluster_ips=("172.30.0.1",)))  # same object
        p.sync(*store.take(), full=False)
        out["idle_inputs"] = inputs()
        # b is deleted
        store.delete_service(Ref("ns1", "b"))
        snap, ch = store.take()
        p.sync(snap, ch, full=False)
        out["fourth"] = save() + save("filter")
        p.cleanup()
        out["after"] = save() + save("filter") + save("mangle")
        """,
    )
    first, second = r["first"], r["second"]
    assert {SVC_A, SVC_B, C.CANARY} <= declared(first)
    # the hook jumps exist exactly once, also after the second full sync
    for text in (first, second):
        for hook in C.HOOKS:
            assert text.splitlines().count(hook.line) == 1, hook.line
    # the second full sync rewrote the same rules (no duplicates anywhere)
    assert sorted(rules_of(first, "KUBE-SERVICES")) == sorted(rules_of(second, "KUBE-SERVICES"))
    assert r["first_rules"]["nat"] == sum(
        1 for ln in first.split("*filter")[0].splitlines() if ln.startswith("-A KUBE-")
    )
    # partial: one restore, only a's service chain and its vanished endpoint's chain
    assert not r["partial"]["full"] and r["partial"]["written"] == 1
    (inp,) = r["partial_inputs"]
    assert "*filter" not in inp and "KUBE-SERVICES" not in inp
    written = {ln[1:].split()[0] for ln in inp.splitlines() if ln.startswith(":")}
    gone = C.sep_chain("ns1/a:p80", "tcp", "10.1.0.1:80")
    assert written == {SVC_A, gone} and f"-X {gone}" in inp
    third = r["third"]
    assert gone not in declared(third) and "10.1.0.1:80" not in third
    assert "--to-destination 10.1.0.2:80" in third and "--to-destination 10.1.0.3:80" in third
    assert r["idle_inputs"] == []
    # deleting b removed its chains and its KUBE-SERVICES line, in place
    fourth = r["fourth"]
    assert SVC_B not in fourth and "ns1/b" not in fourth and SVC_A in fourth
    # cleanup leaves nothing of ours, hooks included
    assert "KUBE-" not in r["after"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_startup_reconciles_without_flushing(netns: str, flavour: str) -> None:
    """Chains left by a previous agent: wanted ones are rewritten in place, stale ones deleted,
    kubelet's chains and foreign rules in the built-in chains are left alone."""
    r = run_in(
        netns,
        flavour,
        f"""
        subprocess.run([f"{{BASE}}-{{FLAVOUR}}-restore", "--noflush"], text=True, check=True,
                       input=(
            "*nat\\n:KUBE-SERVICES - [0:0]\\n:KUBE-SVC-STALESTALESTALE - [0:0]\\n"
            ":KUBE-XLB-OLDOLDOLDOLDOLD - [0:0]\\n:KUBE-MARK-DROP - [0:0]\\n"
            ":{SVC_A} - [0:0]\\n"
            "-A KUBE-SERVICES -d 172.30.9.9/32 -j KUBE-SVC-STALESTALESTALE\\n"
            "-A KUBE-SVC-STALESTALESTALE -p tcp -j DNAT --to-destination 10.9.9.9:80\\n"
            "-A {SVC_A} -p tcp -j DNAT --to-destination 10.9.9.8:80\\n"
            "-A PREROUTING -m comment --comment \\"kubernetes service portals\\" "
            "-j KUBE-SERVICES\\n"
            "-A PREROUTING -p udp --dport 9999 -j DNAT --to-destination 10.7.7.7:9999\\n"
            "COMMIT\\n*mangle\\n:KUBE-KUBELET-CANARY - [0:0]\\nCOMMIT\\n"))
        store = Store()
        store.replace_services([make_service("ns1", "a", cluster_ips=("172.30.0.1",))])
        store.replace_slices([make_slice("ns1", "a", endpoints=[make_endpoint("10.1.0.1")])])
        p = IptablesProxier(options=ProxyOptions(node_name="n"), flavour=FLAVOUR, restorer=REC)
        res = p.sync(*store.take(), full=True)
        out["detail"] = res.detail
        out["nat"] = save()
        out["mangle"] = save("mangle")
        out["inputs"] = inputs()
        """,
    )
    nat = r["nat"]
    assert "STALE" not in nat and "KUBE-XLB-" not in nat and "10.9.9.9" not in nat
    assert "10.9.9.8" not in nat and "--to-destination 10.1.0.1:80" in nat
    assert "KUBE-MARK-DROP" in nat and "KUBE-KUBELET-CANARY" in r["mangle"]
    assert "-A PREROUTING -p udp -m udp --dport 9999 -j DNAT --to-destination 10.7.7.7:9999" in nat
    # the pre-existing hook was recognised, not inserted twice
    assert nat.splitlines().count(C.hooks_for("nat", "PREROUTING")[0].line) == 1
    # nothing was flushed outside the transaction that refilled it: one restore, and the only
    # chains it flushed without refilling are the ones it deleted
    (inp,) = r["inputs"]
    assert "-F" not in inp.split()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_failed_restore_and_flush_make_the_next_sync_full(netns: str, flavour: str) -> None:
    r = run_in(
        netns,
        flavour,
        """
        store = Store()
        store.replace_services([make_service("ns1", "a", cluster_ips=("172.30.0.1",))])
        store.replace_slices([make_slice("ns1", "a", endpoints=[make_endpoint("10.1.0.1")])])
        p = IptablesProxier(options=ProxyOptions(node_name="n"), flavour=FLAVOUR, restorer=REC,
                            clock=lambda: next(tick))
        p.sync(*store.take(), full=True)
        # a rule the kernel refuses (a target no module provides) fails the restore
        REC.spoil = "-A KUBE-SERVICES -j NO-SUCH-TARGET"
        store.set_slice(make_slice("ns1", "a", endpoints=[make_endpoint("10.1.0.2")]))
        try:
            p.sync(*store.take(), full=False)
            out["raised"] = False
        except SyncError as err:
            out["raised"] = True
            out["error"] = str(err)
        out["after_failure"] = save()
        res = p.sync(*store.take(), full=False)  # no new change, but the last one was lost
        out["retry_full"] = res.full
        out["retried"] = save()
        # someone flushes and deletes everything: the periodic check finds the canary gone,
        # and the next sync is full
        for table in ("nat", "filter", "mangle"):
            ipt("-t", table, "-F"); ipt("-t", table, "-X")
        out["drift"] = p.drift()
        res = p.sync(*store.take(), full=False)
        out["canary_full"] = res.full
        out["restored"] = save()
        """,
    )
    assert r["raised"] and "line" in r["error"]
    assert "10.1.0.1:80" in r["after_failure"]  # atomic: nothing of the failed sync applied
    assert r["retry_full"] and "10.1.0.2:80" in r["retried"]
    assert "canary" in r["drift"]
    assert r["canary_full"] and "10.1.0.2:80" in r["restored"]
    for hook in C.hooks_for("nat", "PREROUTING"):
        assert hook.line in r["restored"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_rule_family_loads_and_traces_the_same_as_rendered(netns: str, flavour: str) -> None:
    """The kernel accepts every kind of rule kproxy writes, and tracing iptables-save's
    read-back gives the same answers as tracing the rendered text."""
    r = run_in(
        netns,
        flavour,
        """
        from kproxy.render.iptables import render_ruleset
        from kproxy.model.view import build_views
        local = dict(node_name="n")
        store = Store()
        store.replace_services([
            make_service("ns1", "web", type="LoadBalancer", cluster_ips=("172.30.0.10",),
                         ports=(make_port(80, name="http", node_port=30080),
                                make_port(53, name="dns", protocol="UDP", node_port=30053)),
                         load_balancer_ips=("1.2.3.4",), external_ips=("192.168.99.9",),
                         load_balancer_source_ranges=("203.0.113.0/25",), affinity_timeout=600),
            make_service("ns1", "loc", type="NodePort", cluster_ips=("172.30.0.11",),
                         ports=(make_port(80, name="p80", node_port=30081),),
                         external_policy_local=True),
            make_service("ns1", "itp", cluster_ips=("172.30.0.12",), internal_policy_local=True),
            make_service("ns1", "none", cluster_ips=("172.30.0.13",)),
        ])
        ports = [EndpointPort("http", "TCP", 8080), EndpointPort("dns", "UDP", 5353)]
        store.replace_slices([
            make_slice("ns1", "web", endpoints=[make_endpoint("10.1.0.1", **local),
                                                make_endpoint("10.2.0.1")], ports=ports),
            make_slice("ns1", "loc", endpoints=[make_endpoint("10.1.0.2", **local),
                                                make_endpoint("10.2.0.2")]),
            make_slice("ns1", "itp", endpoints=[make_endpoint("10.2.0.3")]),
        ])
        opts = ProxyOptions(node_name="n", node_ips=("192.168.0.2",), cluster_cidrs=("10.0.0.0/8",),
                            nodeport_ips=None)
        p = IptablesProxier(options=opts, flavour=FLAVOUR, restorer=REC, nft_chunk_chains=4)
        snap, ch = store.take()
        p.sync(snap, ch, full=True)
        out["restores"] = p.restores
        out["saved"] = save() + save("filter")
        out["rendered"] = render_ruleset(build_views(snap, family=4, node_name="n"), opts)
        """,
    )
    if flavour == "nft":
        assert r["restores"] > 1  # split at service boundaries (tiny chunk size for the test)
    env = T.Environment(local_addresses=frozenset({"192.168.0.2"}))
    packets = [
        T.Packet("10.0.0.5", "172.30.0.10", 80),
        T.Packet("10.0.0.5", "172.30.0.10", 53, "udp"),
        T.Packet("203.0.113.9", "1.2.3.4", 80),
        T.Packet("203.0.113.200", "1.2.3.4", 80),
        T.Packet("203.0.113.9", "192.168.99.9", 80),
        T.Packet("203.0.113.9", "192.168.0.2", 30080),
        T.Packet("203.0.113.9", "192.168.0.2", 30053, "udp"),
        T.Packet("203.0.113.9", "192.168.0.2", 30081),
        T.Packet("10.0.0.5", "192.168.0.2", 30081),
        T.Packet("192.168.0.2", "192.168.0.2", 30081),
        T.Packet("10.0.0.5", "172.30.0.12", 80),
        T.Packet("10.0.0.5", "172.30.0.13", 80),
    ]
    live, rendered = T.parse_save(r["saved"]), as_installed(r["rendered"])
    for pkt in packets:
        got, masq, outcomes = flow(live, pkt, env)
        assert (got, masq) == flow(rendered, pkt, env)[:2], pkt
        # every rule on the way was evaluated: nothing assumed, no missing chain or target
        assert not any(o.notes for o in outcomes), (pkt, [o.notes for o in outcomes])
    assert flow(live, packets[3], env)[0] == "DROP"
    assert flow(live, packets[-1], env)[0] == "REJECT"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_ipv6(netns: str, flavour: str) -> None:
    if shutil.which(f"ip6tables-{flavour}-restore") is None:
        pytest.skip(f"ip6tables-{flavour} missing")
    r = run_in(
        netns,
        flavour,
        """
        store = Store()
        store.replace_services([make_service("ns1", "v6", type="NodePort",
                                             cluster_ips=("fd00:172:30::1",),
                                             ports=(make_port(80, name="p80", node_port=30080),),
                                             affinity_timeout=60)])
        store.replace_slices([make_slice("ns1", "v6", address_type="IPv6",
                                         endpoints=[make_endpoint("fd00:10::1"),
                                                    make_endpoint("fd00:10::2")])])
        p = IptablesProxier(options=ProxyOptions(family=6, node_name="n",
                                                 cluster_cidrs=("fd00:10::/64",)),
                            flavour=FLAVOUR, restorer=REC)
        p.sync(*store.take(), full=True)
        out["nat"] = save()
        p.cleanup()
        out["after"] = save() + save("filter") + save("mangle")
        """,
        family=6,
    )
    nat = r["nat"]
    assert "--to-destination [fd00:10::1]:80" in nat and "! -d ::1/128" in nat
    assert re.search(r"--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource", nat)
    got, masq, _ = flow(
        T.parse_save(nat), T.Packet("2001:db8::9", "fd00:172:30::1", 80), T.Environment()
    )
    assert got == "[fd00:10::1]:80, [fd00:10::2]:80" and masq
    assert "KUBE-" not in r["after"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_periodic_full_sync_repairs_hooks_without_reading_everything(
    netns: str, flavour: str
) -> None:
    r = run_in(
        netns,
        flavour,
        """
        store = Store()
        store.replace_services([make_service("ns1", "a", cluster_ips=("172.30.0.1",))])
        store.replace_slices([make_slice("ns1", "a", endpoints=[make_endpoint("10.1.0.1")])])
        p = IptablesProxier(options=ProxyOptions(node_name="n"), flavour=FLAVOUR, restorer=REC)
        out["first"] = p.sync(*store.take(), full=True).detail
        ipt("-t", "nat", "-D", "PREROUTING", "-m", "comment", "--comment",
            "kubernetes service portals", "-j", "KUBE-SERVICES")
        ipt("-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment",
            "kubernetes forwarding rules", "-j", "KUBE-FORWARD")
        out["second"] = p.sync(*store.take(), full=True).detail
        out["nat"] = save()
        out["filter"] = save("filter")
        """,
    )
    assert "read back" in r["first"] and "read back" not in r["second"]
    for hook in C.HOOKS:
        text = r["nat"] if hook.table == "nat" else r["filter"]
        assert text.splitlines().count(hook.line) == 1, hook.line


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_drift_check_is_cheap_when_idle_and_finds_a_flushed_service_chain(
    netns: str, flavour: str
) -> None:
    r = run_in(
        netns,
        flavour,
        """
        READS = []

        def run(argv, **kw):
            if "-save" in argv[0] or "-S" in argv:
                READS.append(argv[0])
            return subprocess.run(argv, **kw)

        store = Store()
        store.replace_services([make_service("ns1", "a", cluster_ips=("172.30.0.1",)),
                                make_service("ns1", "b", cluster_ips=("172.30.0.2",))])
        store.replace_slices([
            make_slice("ns1", "a",
                       endpoints=[make_endpoint("10.1.0.1"), make_endpoint("10.1.0.2")]),
            make_slice("ns1", "b", endpoints=[make_endpoint("10.1.0.3")]),
        ])
        p = IptablesProxier(options=ProxyOptions(node_name="n"), flavour=FLAVOUR, restorer=REC,
                            run=run)
        p.sync(*store.take(), full=True)
        # what kproxy wrote is exactly what it expects (also after a partial write)
        out["inspect_after_full"] = p.inspect()
        store.set_slice(make_slice("ns1", "a", endpoints=[make_endpoint("10.1.0.9")]))
        p.sync(*store.take(), full=False)
        out["inspect_after_partial"] = p.inspect()
        # idle: the check reads no table
        READS.clear()
        out["idle"] = [p.drift() for _ in range(3)]
        out["idle_reads"] = len(READS)
        # the other IP family's proxier writes (on nft: the same ruleset generation moves)
        p6 = IptablesProxier(options=ProxyOptions(family=6, node_name="n"), flavour=FLAVOUR,
                             run=run)
        p6.sync(*Store().take(), full=True)
        READS.clear()
        out["after_ipv6_write"] = p.drift()
        out["after_ipv6_write_reads"] = len(READS)
        # someone else writes elsewhere: one read-back, no drift, then cheap again
        ipt("-t", "filter", "-A", "INPUT", "-s", "192.0.2.1", "-j", "ACCEPT")
        READS.clear()
        out["elsewhere"] = p.drift()
        out["elsewhere_reads"] = len(READS)
        READS.clear()
        out["elsewhere_again"] = p.drift()
        out["elsewhere_again_reads"] = len(READS)
        # an outside flush of one service chain
        ipt("-t", "nat", "-F", SVC_A)
        out["flushed"] = save()
        out["drift"] = p.drift()
        res = p.sync(*store.take(), full=False)
        out["repair_full"] = res.full
        out["repaired"] = save()
        out["after_repair"] = p.drift()
        """.replace("SVC_A", repr(SVC_A)),
    )
    assert r["inspect_after_full"] is None and r["inspect_after_partial"] is None
    assert r["idle"] == [None, None, None] and r["idle_reads"] == 0
    assert r["after_ipv6_write"] is None and r["after_ipv6_write_reads"] == 0
    assert r["elsewhere"] is None and r["elsewhere_reads"] >= 1
    assert r["elsewhere_again"] is None and r["elsewhere_again_reads"] == 0
    assert rules_of(r["flushed"], SVC_A) == []
    assert r["drift"] and SVC_A in r["drift"]
    assert r["repair_full"]
    assert len(rules_of(r["repaired"], SVC_A)) > 0
    assert "10.1.0.9:80" in r["repaired"]
    assert r["after_repair"] is None
