"""`kproxy render` writes a LoadBalancer's source-range rules exactly as the running agent
does (issue 12 item 5): the agent takes the node's addresses from its interfaces, render from
the Node manifest's InternalIP; with --node-ip-override both take the flag's address."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kproxy.lab.netlab import Lab
from kproxy.lab.nsexec import module_argv
from tests.integration.test_invalid_objects_e2e import full_log, manifests_agent, slice_for
from tests.support.agent import CLUSTER_CIDR, node_obj
from tests.support.objects import make_service_obj

pytestmark = [pytest.mark.netns]


def fw_lines(text: str) -> list[str]:
    """The KUBE-FW rules, with "-s ADDR/LEN" where and as iptables-save prints it."""
    out = []
    for line in text.splitlines():
        if line.startswith("-A KUBE-FW-"):
            m = re.search(r" -s (\S+)", line)
            if m:
                addr = m.group(1) if "/" in m.group(1) else f"{m.group(1)}/32"
                chain, rest = line.replace(m.group(0), "", 1)[3:].split(" ", 1)
                line = f"-A {chain} -s {addr} {rest}"
            out.append(line)
    return sorted(out)


@pytest.mark.parametrize("override", [None, "192.0.2.1"], ids=["node-addresses", "override"])
def test_render_matches_the_agents_firewall_rules(
    lab: Lab, tmp_path: Path, override: str | None
) -> None:
    node = lab.nodes[0]
    lb = make_service_obj(
        "default",
        "lb",
        type="LoadBalancer",
        clusterIP="10.96.0.70",
        ports=[
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80, "nodePort": 30070}
        ],
        loadBalancerSourceRanges=[f"{node.ip}/32", "203.0.113.0/24"],
        status={"loadBalancer": {"ingress": [{"ip": "198.51.100.70"}]}},
    )
    objects = [lb, slice_for("lb", [p.ip for p in lab.pods]), node_obj(node)]
    (tmp_path / "objects.json").write_text(json.dumps({"kind": "List", "items": objects}))
    flags = ["--node-ip-override", override] if override else []
    agent = manifests_agent(lab, tmp_path, "kproxy", *flags)
    agent.start()
    live = fw_lines(agent.save())
    argv = ["render", "--manifests", str(tmp_path), "--hostname-override", node.name]
    argv += ["--cluster-cidr", CLUSTER_CIDR, *flags]
    rendered = fw_lines(lab.run(node.ns, module_argv("kproxy", *argv)).stdout)
    assert live, full_log(agent)[-3000:]
    assert rendered == live, "\n".join(["rendered:", *rendered, "live:", *live])
    allow_lb_ip = any("-s 198.51.100.70/32" in ln for ln in live)
    # the node's own address is in the ranges; an override outside them is not
    assert allow_lb_ip is (override is None)
