"""`kproxy explain` and `kproxy status` without a kernel: explanations of packets through rendered
rulesets, the read-back of programmed backends and its comparison with the wanted state, and the
ipvsadm listing reader."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kproxy.inspect import explain as E
from kproxy.inspect import iptrace as T
from kproxy.inspect import status as S
from kproxy.inspect.ipvsadm import parse_listing
from kproxy.model.objects import EndpointSlice, Service
from kproxy.model.view import service_views
from kproxy.render import chains as C
from kproxy.render.iptables import render_ruleset
from kproxy.render.ipvs import render_desired
from tests.support.builders import make_endpoint, make_port, make_service, make_slice
from tests.support.rulesets import hooks_text, ipvs_companions_as_installed
from tests.unit.test_iptrace import (
    CLIENT,
    ENV,
    LOCAL,
    NODE,
    NODE_IP,
    OPTS,
    POD,
    THREE,
    VIP,
    three_pods,
)


def rendered(*services: tuple[Service, list[EndpointSlice]]) -> str:
    views = {
        svc.ref: service_views(svc, slices, family=4, node_name=NODE) for svc, slices in services
    }
    return render_ruleset(views, OPTS)


def ruleset(*services: tuple[Service, list[EndpointSlice]]) -> T.Ruleset:
    return T.parse_save(rendered(*services), T.parse_save(hooks_text()))


def explain(rs: T.Ruleset, src: str, dst: str, port: int, **kw: Any) -> E.Explanation:
    hook, reason = E.choose_hook(src, local=ENV.local_addresses)
    return E.explain_packet(
        rs,
        T.Packet(src, dst, port, kw.pop("proto", "tcp")),
        hook=hook,
        env=ENV,
        hook_reason=reason,
        **kw,
    )


def nodeport(**kw: Any) -> Service:
    return make_service(
        name="web", type="NodePort", ports=(make_port(80, name="p80", node_port=30080),), **kw
    )


def web_pods() -> EndpointSlice:
    return make_slice(
        service="web",
        endpoints=[
            make_endpoint(THREE[0], node_name=NODE),
            make_endpoint(THREE[1], node_name="node2"),
            make_endpoint(THREE[2], node_name="node2"),
        ],
    )


# -- targets and hooks -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.96.0.10:53/udp", ("10.96.0.10", 53, "udp")),
        ("10.96.0.1:443", ("10.96.0.1", 443, "tcp")),
        ("[fd00::10]:80/TCP", ("fd00::10", 80, "tcp")),
        ("[fd00:0::a]:53/udp", ("fd00::a", 53, "udp")),
    ],
    ids=["udp", "default-tcp", "ipv6", "ipv6-canonical"],
)
def test_parse_target(text: str, want: tuple[str, int, str]) -> None:
    assert E.parse_target(text) == want


@pytest.mark.parametrize(
    "text",
    ["10.96.0.1", "10.96.0.1:0", "10.96.0.1:70000", "10.96.0.1:80/icmp", "fd00::1:80", "x:80"],
)
def test_parse_target_rejects(text: str) -> None:
    with pytest.raises(E.TargetError):
        E.parse_target(text)


def test_hook_follows_the_source() -> None:
    assert E.choose_hook(CLIENT, local=ENV.local_addresses)[0] == T.PREROUTING
    assert E.choose_hook(POD, local=ENV.local_addresses)[0] == T.PREROUTING
    assert E.choose_hook(NODE_IP, local=ENV.local_addresses)[0] == T.OUTPUT
    assert E.choose_hook("127.0.0.5", local=frozenset())[0] == T.OUTPUT


# -- explanations ------------------------------------------------------------------------------
def test_nodeport_from_outside_is_explained() -> None:
    ex = explain(ruleset((nodeport(), [web_pods()])), CLIENT, NODE_IP, 30080)
    assert ex.result == "dnat" and ex.service == "ns1/web:p80"
    doc = E.to_json(ex)
    got = {t["endpoint"]: t["probability"] for t in doc["targets"]}
    assert set(got) == {f"{ip}:80" for ip in THREE}
    assert math.isclose(sum(got.values()), 1.0)
    assert all(o["masquerade"] for o in doc["outcomes"])
    text = E.render_text(ex)
    for ip in THREE:
        assert f"33.3%  DNAT to {ip}:80" in text
    assert "then one of 3 ways" in text and "random 33.3%" in text
    assert "masquerade: yes, external traffic" in text
    assert "nat PREROUTING" in text and "filter FORWARD" in text and "nat POSTROUTING" in text


def test_cluster_ip_from_a_pod_keeps_the_source() -> None:
    ex = explain(ruleset((make_service(), [three_pods()])), POD, VIP, 80)
    assert ex.result == "dnat"
    assert f"masquerade: no: the endpoint sees the real client address {POD}" in E.render_text(ex)


def test_local_policy_says_why_the_source_is_kept() -> None:
    ex = explain(
        ruleset((nodeport(external_policy_local=True), [web_pods()])), CLIENT, NODE_IP, 30080
    )
    assert {t["endpoint"] for t in E.to_json(ex)["targets"]} == {f"{THREE[0]}:80"}
    assert "traffic policy Local" in E.render_text(ex)


def test_no_endpoints_is_rejected() -> None:
    ex = explain(ruleset((make_service(), [make_slice(endpoints=[])])), POD, VIP, 80)
    assert ex.result == "rejected" and ex.service == "ns1/svc1:p80"
    assert "rejected: ns1/svc1:p80 has no endpoints" in E.render_text(ex)
    doc = E.to_json(ex)
    assert doc["targets"] == [] and doc["outcomes"][0]["verdict_rule"]["target"] == "REJECT"


def test_not_a_service_says_so_and_what_the_address_is() -> None:
    rs = ruleset((make_service(), [three_pods()]))
    ex = explain(rs, POD, VIP, 8080)
    assert ex.result == "not-a-service"
    text = E.render_text(ex)
    assert "not a service address: kproxy does not touch this packet" in text
    assert f"{VIP} is the cluster IP of ns1/svc1:p80 on 80/tcp" in text
    ex = explain(rs, POD, "10.1.2.3", 80)
    assert ex.result == "not-a-service" and not ex.hints


def test_affinity_is_explained() -> None:
    rs = ruleset((make_service(affinity_timeout=600), [three_pods()]))
    ex = explain(rs, POD, VIP, 80)
    assert set(ex.affinity.values()) == {600} and len(ex.affinity) == 3
    assert "sticky for 600s once chosen" in E.render_text(ex)


def test_hairpin_is_explained() -> None:
    rs = ruleset((make_service(), [make_slice(endpoints=[make_endpoint(THREE[0])])]))
    assert "hairpin" in E.render_text(explain(rs, THREE[0], VIP, 80))


def test_damaged_rules_are_called_out() -> None:
    text = rendered((make_service(), [make_slice(endpoints=[make_endpoint(THREE[0])])]))
    damaged = "".join(
        line + "\n"
        for line in text.splitlines()
        if not (line.startswith(f"-A {C.SEP_PREFIX}") and "DNAT" in line)
    )
    ex = explain(T.parse_save(damaged, T.parse_save(hooks_text())), POD, VIP, 80)
    assert ex.result == "untranslated"
    assert "no endpoint rule translated it" in E.render_text(ex)


LISTING = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  172.30.0.41:80 rr
  -> 10.244.1.11:80               Masq    1      2          0
  -> 10.244.2.11:80               Masq    1      0          1
  -> 10.244.2.12:80               Masq    2      0          0
TCP  172.30.0.42:80 sh (sh-fallback,sh-port) persistent 600
UDP  [fd00::10]:53 rr
  -> [fd00:1::5]:53               Masq    1      0          0
FWM  7 wlc
"""


def test_ipvsadm_listing_is_read() -> None:
    vss = parse_listing(LISTING)
    assert [(v.protocol, v.address, v.port, v.scheduler) for v in vss] == [
        ("TCP", "172.30.0.41", 80, "rr"),
        ("TCP", "172.30.0.42", 80, "sh"),
        ("UDP", "fd00::10", 53, "rr"),
        ("FWM", "", 7, "wlc"),
    ]
    first, second, v6, _ = vss
    assert [(r.hostport, r.weight, r.active, r.inactive) for r in first.reals] == [
        ("10.244.1.11:80", 1, 2, 0),
        ("10.244.2.11:80", 1, 0, 1),
        ("10.244.2.12:80", 2, 0, 0),
    ]
    assert first.shares() == {"10.244.1.11:80": 0.25, "10.244.2.11:80": 0.25, "10.244.2.12:80": 0.5}
    assert second.persistent == 600 and second.flags == ("sh-fallback", "sh-port")
    assert second.shares() is None
    assert v6.reals[0].hostport == "[fd00:1::5]:53"


def ipvs_ruleset() -> tuple[T.Ruleset, T.Environment]:
    svc = make_service()
    views = {svc.ref: service_views(svc, [three_pods()], family=4, node_name=NODE)}
    desired = render_desired(views, OPTS)
    rs = ipvs_companions_as_installed(OPTS)
    env = T.Environment(local_addresses=frozenset((*LOCAL, *desired.bind)), sets=desired.sets)
    return rs, env


def test_ipvs_mode_shows_the_virtual_server() -> None:
    rs, env = ipvs_ruleset()
    for src, masq in ((POD, False), (NODE_IP, True)):
        hook, _ = E.choose_hook(src, local=env.local_addresses)
        ex = E.explain_packet(
            rs, T.Packet(src, VIP, 80), hook=hook, env=env, mode="ipvs", ipvs_listing=LISTING
        )
        assert ex.result == "ipvs" and ex.ipvs is not None and ex.ipvs.service is not None
        assert set(ex.ipvs.masquerade.values()) == {masq}
        text = E.render_text(ex)
        assert "virtual server TCP 172.30.0.41:80, scheduler rr" in text
        assert "-> 10.244.2.12:80  masq weight 2 (50% of new connections" in text
    ex = E.explain_packet(
        rs, T.Packet(POD, VIP, 81), hook=T.PREROUTING, env=env, mode="ipvs", ipvs_listing=LISTING
    )
    # a port of a VIP no service uses: KUBE-IPVS-FILTER refuses it
    assert ex.result == "rejected" and ex.ipvs is not None and ex.ipvs.service is None


# -- status ------------------------------------------------------------------------------------
def ports(text: str) -> dict[str, S.PortState]:
    return S.read_ports(T.parse_save(text))


def test_read_back_of_a_rendered_ruleset() -> None:
    lb = make_service(
        name="lb",
        type="LoadBalancer",
        load_balancer_ips=("203.0.113.10",),
        load_balancer_source_ranges=("192.168.50.0/24",),
        ports=(make_port(80, name="p80", node_port=30081),),
        cluster_ips=("172.30.0.43",),
    )
    got = ports(
        rendered(
            (make_service(), [three_pods()]),
            (nodeport(cluster_ips=("172.30.0.42",), external_policy_local=True), [web_pods()]),
            (
                make_service(name="empty", cluster_ips=("172.30.0.44",)),
                [make_slice(service="empty")],
            ),
            (lb, [make_slice(service="lb", endpoints=[make_endpoint(THREE[1])])]),
        )
    )
    assert set(got) == {"ns1/svc1:p80", "ns1/web:p80", "ns1/empty:p80", "ns1/lb:p80"}
    svc = got["ns1/svc1:p80"]
    assert svc.addresses == [f"{VIP}:80"] and svc.protocol == "TCP"
    assert set(svc.internal) == {f"{ip}:80" for ip in THREE} and svc.external is None
    web = got["ns1/web:p80"]
    assert web.addresses == ["172.30.0.42:80", "nodePort 30080"]
    assert set(web.internal) == {f"{ip}:80" for ip in THREE}
    assert set(web.external or {}) == {f"{THREE[0]}:80"}
    empty = got["ns1/empty:p80"]
    assert empty.internal == {} and empty.verdicts == {"REJECT (no endpoints)"}
    assert empty.addresses == ["172.30.0.44:80"]
    lbp = got["ns1/lb:p80"]
    assert "203.0.113.10:80 (lb)" in lbp.addresses and set(lbp.external or {}) == {f"{THREE[1]}:80"}
    rows = S.compare(got, got)
    assert all(r.ok for r in rows)
    table = S.render_table(rows)
    assert "(none: REJECT (no endpoints))" in table and "MISMATCH" not in table
    assert "all 4 service ports programmed as wanted" in table


def test_flushed_endpoint_chain_is_a_mismatch() -> None:
    text = rendered((make_service(), [three_pods()]))
    want = ports(text)
    sep = C.sep_chain("ns1/svc1:p80", "tcp", f"{THREE[1]}:80")
    damaged = "".join(
        line + "\n" for line in text.splitlines() if not line.startswith(f"-A {sep} ")
    )
    (row,) = S.compare(want, ports(damaged))
    assert not row.ok
    assert f"endpoint {THREE[1]}:80 is not programmed" in row.problems
    assert f"chain {sep} has no DNAT rule (flushed by hand?)" in row.problems
    # the share meant for the flushed endpoint fell through to the next rule
    assert set(row.backends) == {f"{THREE[0]}:80", f"{THREE[2]}:80"}
    assert not math.isclose(row.backends[f"{THREE[0]}:80"], 0.5, abs_tol=0.01)
    doc = S.to_json([row], mode="iptables", rules_from="test")
    assert doc["ok"] is False and doc["services"][0]["state"] == "mismatch"


def test_stale_and_missing_services_and_endpoints() -> None:
    both = ports(rendered((make_service(), [three_pods()]), (nodeport(), [web_pods()])))
    one = ports(rendered((make_service(), [make_slice(endpoints=[make_endpoint(THREE[0])])])))
    rows = {r.name: r for r in S.compare(one, both)}
    assert "programmed, but no such service port is wanted (stale)" in rows["ns1/web:p80"].problems
    assert f"endpoint {THREE[1]}:80 is programmed but not wanted" in rows["ns1/svc1:p80"].problems
    rows = {r.name: r for r in S.compare(both, one)}
    assert rows["ns1/web:p80"].problems == ["wanted, but not programmed at all"]


def test_uneven_split_is_a_mismatch() -> None:
    text = rendered((make_service(), [three_pods()]))
    skewed = text.replace("--probability 0.3333333333", "--probability 0.9000000000", 1)
    assert skewed != text
    (row,) = S.compare(ports(text), ports(skewed))
    assert any("gets 90.0% of new connections" in p for p in row.problems)


def test_ipvs_status_rows() -> None:
    svc = make_service()
    views = {svc.ref: service_views(svc, [three_pods()], family=4, node_name=NODE)}
    desired = render_desired(views, OPTS).servers
    listing = "\n".join(LISTING.splitlines()[:8]) + "\n"
    rows = {tuple(r.addresses): r for r in S.ipvs_rows(desired, listing)}
    row = rows[("172.30.0.41:80",)]
    assert row.ok, row.problems
    assert row.packets == 3 and row.name == "ns1/svc1:p80"
    stale = rows[("172.30.0.42:80",)]
    assert stale.problems == ["virtual server programmed but not wanted (stale)"]
    fewer = listing.replace("  -> 10.244.2.12:80               Masq    2      0          0\n", "")
    row = {tuple(r.addresses): r for r in S.ipvs_rows(desired, fewer)}[("172.30.0.41:80",)]
    assert row.problems == ["real server 10.244.2.12:80 is not programmed"]
    # a real server no longer wanted: a mismatch while it takes new connections, draining (not
    # a mismatch) once kproxy set its weight to 0
    extra = listing.replace(
        "  -> 10.244.2.12:80               Masq    2      0          0\n",
        "  -> 10.244.2.12:80               Masq    2      0          0\n"
        "  -> 10.244.9.9:80                Masq    {w}      1          2\n",
    )
    row = {tuple(r.addresses): r for r in S.ipvs_rows(desired, extra.format(w=1))}[
        ("172.30.0.41:80",)
    ]
    assert row.problems == ["real server 10.244.9.9:80 is programmed but not wanted"]
    row = {tuple(r.addresses): r for r in S.ipvs_rows(desired, extra.format(w=0))}[
        ("172.30.0.41:80",)
    ]
    assert row.ok, row.problems
    assert row.verdicts == ["draining 10.244.9.9:80 (weight 0, 1 active / 2 inactive)"]
    assert row.backends["10.244.9.9:80"] == 0.0


def test_flushed_endpoint_chain_shows_in_the_walk() -> None:
    text = rendered((make_service(), [three_pods()]))
    sep = C.sep_chain("ns1/svc1:p80", "tcp", f"{THREE[1]}:80")
    damaged = "".join(
        line + "\n" for line in text.splitlines() if not line.startswith(f"-A {sep} ")
    )
    ex = explain(T.parse_save(damaged, T.parse_save(hooks_text())), POD, VIP, 80)
    assert ex.result == "dnat"
    assert {t["endpoint"] for t in E.to_json(ex)["targets"]} == {f"{THREE[0]}:80", f"{THREE[2]}:80"}
    assert f"-> {sep} (an empty chain: the packet comes back and goes on)" in E.render_text(ex)
