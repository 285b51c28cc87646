"""`kproxy explain` and `kproxy status` against the real agent in a namespace lab: what explain
predicts (the DNAT targets, masquerade, rejection) is what real traffic does, and status reads
back what is programmed and notices rules damaged by hand."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kproxy.lab.netlab import Lab
from kproxy.lab.nsexec import module_argv
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_batch, http_get
from kproxy.render.chains import SEP_PREFIX
from tests.support.agent import CLUSTER_CIDR, Agent, eventually
from tests.support.fakeapi import FakeApiServer
from tests.support.objects import make_service_obj, make_slice_obj

pytestmark = [pytest.mark.netns]

VIP = "10.96.0.80"
EMPTY_VIP = "10.96.0.99"
NODEPORT = 30080
REQUESTS = 60


def web_service(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "NodePort",
        "clusterIP": VIP,
        "ports": [
            {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": NODEPORT}
        ],
    }
    body.update(spec)
    return make_service_obj("default", "web", **body)


def web_slice(pods: list[Any]) -> dict[str, Any]:
    return make_slice_obj(
        "default",
        "web-abc12",
        "web",
        [{"ip": p.ip, "node": p.node.name, "pod": p.name} for p in pods],
        [("http", 80, "TCP")],
    )


def start(lab: Lab, api: FakeApiServer, kubeconfig: str, *, policy: str = "Cluster") -> Agent:
    serve_pods(lab, tcp=[80])
    api.upsert(web_service(externalTrafficPolicy=policy))
    api.upsert(web_slice(lab.pods))
    api.upsert(make_service_obj("default", "empty", clusterIP=EMPTY_VIP))
    api.upsert(make_slice_obj("default", "empty-x1", "empty", []))
    # no periodic full resync during the test: damage done by hand must stay visible
    agent = Agent(lab, lab.nodes[0], kubeconfig, extra=["--iptables-sync-period", "1h"])
    agent.start()
    eventually(lambda: "default/empty:http has no endpoints" in agent.save("filter"), timeout=15)
    return agent


def kproxy(lab: Lab, *args: str, check: bool = True) -> Any:
    return lab.run(lab.nodes[0].ns, module_argv("kproxy", *args), check=check)


def explain(lab: Lab, target: str, source: str | None = None) -> dict[str, Any]:
    args = ["explain", target, "-o", "json"]
    if source:
        args += ["--from", source]
    doc: dict[str, Any] = json.loads(kproxy(lab, *args).stdout)
    return doc


def predicted(doc: dict[str, Any]) -> set[str]:
    return {t["endpoint"] for t in doc["targets"]}


def hit(lab: Lab, batch: Any) -> set[str]:
    """The endpoints (ip:80) real traffic reached."""
    assert batch.ok_count == REQUESTS, batch.errors
    return {f"{lab.pod(name).ip}:80" for name in batch.names}


@pytest.fixture
def web(lab: Lab, cluster_api: tuple[FakeApiServer, str]) -> Agent:
    api, kubeconfig = cluster_api
    return start(lab, api, kubeconfig)


def test_explain_cluster_ip_from_a_pod_matches_real_traffic(lab: Lab, web: Agent) -> None:
    pod = lab.pods[0]
    doc = explain(lab, f"{VIP}:80/tcp", pod.ip)
    assert doc["hook"] == "PREROUTING" and doc["result"] == "dnat"
    assert doc["service"] == "default/web:http"
    assert predicted(doc) == hit(lab, http_batch(pod.ns, VIP, 80, n=REQUESTS))
    assert sum(t["probability"] for t in doc["targets"]) == pytest.approx(1.0)
    # the source pod is one of the endpoints: only its own outcome is masqueraded (hairpin)
    masq = {o["dnat"] for o in doc["outcomes"] if o["masquerade"]}
    assert masq == {f"{pod.ip}:80"}


def test_explain_nodeport_from_the_client_matches_real_traffic(lab: Lab, web: Agent) -> None:
    node = lab.nodes[0]
    doc = explain(lab, f"{node.ip}:{NODEPORT}", lab.client.ip)
    assert doc["hook"] == "PREROUTING" and doc["result"] == "dnat"
    batch = http_batch(lab.client.ns, node.ip, NODEPORT, n=REQUESTS)
    assert predicted(doc) == hit(lab, batch)
    # explain says masqueraded: the pods see the node, not the client
    assert all(o["masquerade"] for o in doc["outcomes"])
    assert lab.client.ip not in {r.client_ip for r in batch.results}


def test_explain_from_the_node_itself_matches_real_traffic(lab: Lab, web: Agent) -> None:
    doc = explain(lab, f"{VIP}:80")  # no --from: sent by a process on the node
    assert doc["hook"] == "OUTPUT" and doc["result"] == "dnat"
    assert predicted(doc) == hit(lab, http_batch(lab.nodes[0].ns, VIP, 80, n=REQUESTS))


def test_explain_rejection_and_unknown_addresses(lab: Lab, web: Agent) -> None:
    pod = lab.pods[0]
    doc = explain(lab, f"{EMPTY_VIP}:80/tcp", pod.ip)
    assert doc["result"] == "rejected" and doc["targets"] == []
    res = http_get(pod.ns, EMPTY_VIP, 80, timeout=3.0)
    assert not res.ok and res.error_kind == "refused"
    doc = explain(lab, "10.96.55.55:80", pod.ip)
    assert doc["result"] == "not-a-service"
    text = kproxy(lab, "explain", "10.96.55.55:80", "--from", pod.ip).stdout
    assert "kproxy does not touch this packet" in text


def test_explain_local_policy_matches_real_traffic(
    lab2: Lab, cluster_api2: tuple[FakeApiServer, str]
) -> None:
    api, kubeconfig = cluster_api2
    start(lab2, api, kubeconfig, policy="Local")
    node = lab2.nodes[0]
    doc = explain(lab2, f"{node.ip}:{NODEPORT}", lab2.client.ip)
    local_pods = {f"{p.ip}:80" for p in lab2.pods_on(node)}
    assert predicted(doc) == local_pods
    batch = http_batch(lab2.client.ns, node.ip, NODEPORT, n=REQUESTS)
    assert hit(lab2, batch) == local_pods
    # explain says the source is kept, and the pods do see the client
    assert not any(o["masquerade"] for o in doc["outcomes"])
    assert {r.client_ip for r in batch.results} == {lab2.client.ip}


def test_status_is_ok_then_flags_a_flushed_endpoint_chain(lab: Lab, web: Agent) -> None:
    node = lab.nodes[0]
    args = [
        "status",
        "--kubeconfig",
        web.kubeconfig,
        "--hostname-override",
        node.name,
        "--cluster-cidr",
        CLUSTER_CIDR,
    ]
    out = kproxy(lab, *args, "-o", "json", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["ok"] and doc["mode"] == "iptables"
    rows = {s["service"]: s for s in doc["services"]}
    assert set(rows) == {"default/web:http", "default/empty:http"}
    assert all(s["state"] == "ok" for s in rows.values())
    web_row = rows["default/web:http"]
    assert {b["endpoint"] for b in web_row["backends"]} == {f"{p.ip}:80" for p in lab.pods}
    assert rows["default/empty:http"]["verdicts"] == ["REJECT (no endpoints)"]

    # traffic shows in the counters
    http_batch(lab.client.ns, node.ip, NODEPORT, n=9)
    doc = json.loads(kproxy(lab, *args, "-o", "json").stdout)
    assert {s["service"]: s for s in doc["services"]}["default/web:http"]["packets"] >= 9

    # flush one endpoint's chain by hand, with the same iptables the agent uses
    binary = doc["rules_from"].split()[0].replace("-save", "")
    victim = lab.pods[1]
    nat = web.save("nat", binary=f"{binary}-save")
    sep = next(
        line.split()[1]
        for line in nat.splitlines()
        if line.startswith(f"-A {SEP_PREFIX}") and f"--to-destination {victim.ip}:80" in line
    )
    lab.run(node.ns, [binary, "-w", "5", "-t", "nat", "-F", sep])
    out = kproxy(lab, *args, "-o", "json", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert not doc["ok"]
    row = {s["service"]: s for s in doc["services"]}["default/web:http"]
    assert row["state"] == "mismatch"
    assert f"endpoint {victim.ip}:80 is not programmed" in row["problems"]
    assert any(sep in p for p in row["problems"])
    table = kproxy(lab, *args, check=False)
    assert table.returncode == 1 and "MISMATCH default/web:http" in table.stdout
