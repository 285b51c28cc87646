"""`kproxy status` and `kproxy explain` with no flags on a node where `kproxy run` runs: the
wanted state and settings come from the agent's inspection socket, whatever its source
(kubeconfig against the fake apiserver, or a manifests directory), and say the same as the
invocation that names the source with flags. Without an agent and without flags: one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kproxy.lab.netlab import Lab, Node
from kproxy.lab.nsexec import module_argv
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_batch
from tests.integration.test_inspect_e2e import EMPTY_VIP, NODEPORT, VIP, start, web_slice
from tests.integration.test_inspect_e2e import web_service as web_service_obj
from tests.support.agent import CLUSTER_CIDR, Agent, eventually
from tests.support.fakeapi import FakeApiServer
from tests.support.objects import make_service_obj, make_slice_obj

pytestmark = [pytest.mark.netns]


class ManifestAgent(Agent):
    """`kproxy run --manifests DIR` in a node namespace (iptables mode)."""

    def __init__(self, lab: Lab, node: Node, directory: Path) -> None:
        super().__init__(lab, node, "", dns=False, extra=["--iptables-sync-period", "1h"])
        self.directory = directory

    def source_args(self) -> list[str]:
        return ["--manifests", str(self.directory)]


def write(directory: Path, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    path = directory / f"{obj['kind']}-{meta.get('namespace', '')}-{meta['name']}.json"
    path.write_text(json.dumps(obj))


def run(lab: Lab, *args: str) -> Any:
    return lab.run(lab.nodes[0].ns, module_argv("kproxy", *args), check=False)


def as_json(res: Any) -> dict[str, Any]:
    assert res.stdout, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def comparable_status(doc: dict[str, Any]) -> dict[str, Any]:
    """A status document without what differs between two reads: where the wanted state came
    from, the agent's details and the packet counters."""
    out = {k: v for k, v in doc.items() if k not in ("wanted_from", "agent")}
    out["services"] = [
        {
            **{k: v for k, v in s.items() if k != "packets"},
            "backends": [{**b, "packets": 0} for b in s["backends"]],
        }
        for s in doc["services"]
    ]
    return out


def comparable_explain(doc: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(doc))
    out["wanted"].pop("from")
    for o in out["outcomes"]:
        for step in o["steps"] + ([o["verdict_rule"]] if o["verdict_rule"] else []):
            step["packets"] = None
    return out


def check_status_and_explain(lab: Lab, flags: list[str], *, source: str) -> None:
    """No-flag status/explain agree with the flag-based ones and with the cluster."""
    node = lab.nodes[0]
    bare = run(lab, "status", "-o", "json")
    assert bare.returncode == 0, bare.stdout + bare.stderr
    doc = as_json(bare)
    assert doc["ok"] and doc["mode"] == "iptables"
    assert doc["wanted_from"].startswith("the running agent (/run/kproxy/netns-"), doc
    assert doc["agent"]["node_name"] == node.name
    rows = {s["service"]: s for s in doc["services"]}
    assert set(rows) == {"default/web:http", "default/empty:http"}
    assert {b["endpoint"] for b in rows["default/web:http"]["backends"]} == {
        f"{p.ip}:80" for p in lab.pods
    }
    assert rows["default/empty:http"]["verdicts"] == ["REJECT (no endpoints)"]
    flagged = run(lab, "status", *flags, "-o", "json")
    assert flagged.returncode == 0, flagged.stdout + flagged.stderr
    assert as_json(flagged)["wanted_from"] == source
    assert comparable_status(doc) == comparable_status(as_json(flagged))
    table = run(lab, "status")
    assert table.returncode == 0 and "all 2 service ports programmed as wanted" in table.stdout

    pod = lab.pods[0]
    for target, frm in ((f"{VIP}:80/tcp", pod.ip), (f"{node.ip}:{NODEPORT}", lab.client.ip)):
        ex = as_json(run(lab, "explain", target, "--from", frm, "-o", "json"))
        assert ex["result"] == "dnat", ex
        wanted = ex["wanted"]
        assert wanted["service"] == "default/web:http" and not wanted["differs"], wanted
        assert set(wanted["endpoints"]) == {t["endpoint"] for t in ex["targets"]}
        ex_flags = as_json(run(lab, "explain", target, "--from", frm, *flags, "-o", "json"))
        assert ex_flags["wanted"]["from"] == source
        assert comparable_explain(ex) == comparable_explain(ex_flags)
    text = run(lab, "explain", f"{EMPTY_VIP}:80", "--from", pod.ip).stdout
    assert "Wanted:  default/empty:http (cluster IP) -> no endpoints (the running agent" in text
    # and what explain predicts is what traffic does
    batch = http_batch(pod.ns, VIP, 80, n=30)
    assert batch.ok_count == 30 and len(set(batch.names)) > 1


def test_no_flags_next_to_a_kubeconfig_agent(
    lab: Lab, cluster_api: tuple[FakeApiServer, str]
) -> None:
    api, kubeconfig = cluster_api
    agent = start(lab, api, kubeconfig)
    flags = [
        "--kubeconfig",
        agent.kubeconfig,
        "--hostname-override",
        lab.nodes[0].name,
        "--cluster-cidr",
        CLUSTER_CIDR,
    ]
    check_status_and_explain(lab, flags, source=f"--kubeconfig {kubeconfig}")

    # a change reaches the no-flag status through the agent (no source is read by the command)
    api.upsert(make_service_obj("default", "late", clusterIP="10.96.0.81"))
    api.upsert(make_slice_obj("default", "late-x1", "late", []))
    eventually(
        lambda: (
            "default/late:http"
            in {s["service"] for s in as_json(run(lab, "status", "-o", "json"))["services"]}
        ),
        timeout=15,
    )


def test_no_flags_next_to_a_manifests_agent(lab: Lab) -> None:
    directory = lab.workdir / "manifests"
    directory.mkdir()
    serve_pods(lab, tcp=[80])
    write(directory, web_service_obj(externalTrafficPolicy="Cluster"))
    write(directory, web_slice(lab.pods))
    write(directory, make_service_obj("default", "empty", clusterIP=EMPTY_VIP))
    write(directory, make_slice_obj("default", "empty-x1", "empty", []))
    agent = ManifestAgent(lab, lab.nodes[0], directory)
    agent.start()
    eventually(lambda: "default/empty:http has no endpoints" in agent.save("filter"), timeout=15)
    flags = [
        "--manifests",
        str(directory),
        "--hostname-override",
        lab.nodes[0].name,
        "--cluster-cidr",
        CLUSTER_CIDR,
    ]
    check_status_and_explain(lab, flags, source=f"--manifests {directory}")

    # the agent stopped: one clear line, no traceback, exit 2; explain still traces the kernel
    agent.stop()
    res = run(lab, "status")
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no running kproxy agent found" in lines[0], res.stderr
    assert "--manifests DIR" in lines[0]
    res = run(lab, "explain", f"{VIP}:80", "--from", lab.pods[0].ip)
    assert res.returncode == 0 and "DNAT to" in res.stdout
    assert "no running kproxy agent found" in res.stderr and "Traceback" not in res.stderr
