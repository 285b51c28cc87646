"""Finding the services iptables-restore refuses (kproxy.backends.iptables_rejects): the probe
inputs leave nothing behind, the suspects named by the refused line go first, and the halving
search finds every refused service with few probes. The real iptables-restore runs these in
tests/integration/test_iptables_rejects.py; here a probe is a plain function of its input."""

from __future__ import annotations

from kproxy.backends.iptables_rejects import find_rejected, probe_input, suspects_of
from kproxy.model.objects import Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.view import service_views
from kproxy.render.iptables import Renderer, ServiceRules
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

RENDERER = Renderer(ProxyOptions(node_name="n", cluster_cidrs=("10.0.0.0/8",)))


def block(name: str, i: int) -> tuple[Ref, ServiceRules]:
    svc = make_service(
        "ns",
        name,
        type="NodePort",
        cluster_ips=(f"172.30.{i // 250}.{i % 250 + 1}",),
        ports=(make_port(80, name="p80", node_port=30000 + i),),
    )
    eps = make_slice("ns", name, endpoints=[make_endpoint(f"10.1.{i // 250}.{i % 250 + 1}")])
    return svc.ref, RENDERER.render_service(service_views(svc, [eps], family=4, node_name="n"))


BAD = {37: "bad-a", 211: "bad-b"}
ITEMS = [block(BAD.get(i, f"s{i}"), i) for i in range(300)]
BAD_REFS = {Ref("ns", name) for name in BAD.values()}


class Probe:
    """Refuses any input holding a rule of a service called "bad-*"; counts its calls."""

    def __init__(self, *, control_fails: bool = False) -> None:
        self.calls = 0
        self.control_fails = control_fails

    def __call__(self, text: str) -> str:
        self.calls += 1
        if self.control_fails:
            return "Another app is currently holding the xtables lock"
        return "Parameter too long!" if "ns/bad-" in text else ""


def test_probe_input_declares_flushes_and_deletes_only_probe_chains() -> None:
    no_endpoints = make_service("ns", "empty", cluster_ips=("172.31.0.1",))
    empty = RENDERER.render_service(service_views(no_endpoints, [], family=4, node_name="n"))
    text = probe_input([b for _, b in ITEMS[:3]] + [empty])
    assert "*filter" in text and "*nat" in text
    assert "KUBE-" not in text
    lines = text.splitlines()
    for table in [ln[1:] for ln in text.splitlines() if ln.startswith("*")]:
        start = lines.index(f"*{table}")
        end = lines.index("COMMIT", start)
        section = lines[start:end]
        declared = {ln[1:].split()[0] for ln in section if ln.startswith(":")}
        used = {ln.split()[1] for ln in section if ln.startswith("-A ")}
        assert used <= declared
        assert {ln.split()[1] for ln in section if ln.startswith("-X ")} == declared
        assert {ln.split()[1] for ln in section if ln.startswith("-F ")} == declared
    assert probe_input(()).count(":KPRB-") == 1  # the control probe


def test_bisect_finds_every_refused_service() -> None:
    probe = Probe()
    found = find_rejected(ITEMS, [probe], max_chains=200)
    assert set(found) == BAD_REFS and set(found.values()) == {"Parameter too long!"}
    assert probe.calls < 40


def test_suspects_first() -> None:
    probe = Probe()
    line = next(ln for ln in ITEMS[37][1].shared[0].splitlines())
    suspects = suspects_of(ITEMS, line)
    assert suspects == [Ref("ns", "bad-a")]
    assert find_rejected(ITEMS, [probe], suspects=suspects) == {
        Ref("ns", "bad-a"): "Parameter too long!"
    }
    assert probe.calls == 2  # the control, then the suspect
    # a shared-chain edit of a partial sync names the same service
    edit = line.replace("-A KUBE-SERVICES ", "-I KUBE-SERVICES 1 ", 1)
    assert suspects_of(ITEMS, edit) == [Ref("ns", "bad-a")]
    chain = ITEMS[5][1].names[0]
    assert suspects_of(ITEMS, f":{chain} - [0:0]") == [ITEMS[5][0]]
    assert suspects_of(ITEMS, "COMMIT") == []


def test_nothing_is_blamed_when_the_control_probe_fails_or_no_service_is_refused() -> None:
    assert find_rejected(ITEMS, [Probe(control_fails=True)]) == {}
    good = [item for item in ITEMS if item[0] not in BAD_REFS]
    assert find_rejected(good, [Probe()]) == {}


def test_the_cheap_probe_first_then_the_committing_one() -> None:
    cheap, committing = Probe(), Probe()
    find_rejected(ITEMS, [cheap, committing])
    assert cheap.calls and not committing.calls
    blind = Probe()
    blind.__class__ = type("Blind", (Probe,), {"__call__": lambda self, text: ""})
    find_rejected(ITEMS, [blind, committing])
    assert committing.calls
