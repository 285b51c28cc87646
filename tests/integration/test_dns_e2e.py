"""Cluster DNS end to end: the real `kproxy run` in a node namespace against the fake apiserver,
answering `dig` from pod namespaces on 169.254.20.10 (the classic lab's services)."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.lab.netlab import Lab
from tests.support.agent import Agent, eventually
from tests.support.fakeapi import FakeApiServer
from tests.support.objects import make_service_obj, make_slice_obj

pytestmark = [pytest.mark.netns]

NODE_LOCAL = "169.254.20.10"
MYSQL_IP = "10.96.100.50"


def headless_slice(lab: Lab, pods: list[Any]) -> dict[str, Any]:
    return make_slice_obj(
        "default",
        "web-headless-abc12",
        "web-headless",
        [
            {"ip": p.ip, "node": p.node.name, "pod": f"web-{i}", "hostname": f"web-{i}"}
            for i, p in enumerate(pods)
        ],
        [("http", 80, "TCP")],
    )


@pytest.fixture
def dns_lab(lab: Lab, cluster_api: tuple[FakeApiServer, str]) -> tuple[FakeApiServer, Agent]:
    api, kubeconfig = cluster_api
    api.upsert(
        make_service_obj(
            "default",
            "mysql-service",
            clusterIP=MYSQL_IP,
            ports=[{"name": "mysql", "port": 3306, "targetPort": 3306, "protocol": "TCP"}],
        )
    )
    api.upsert(
        make_slice_obj("default", "mysql-service-x1", "mysql-service", [], [("mysql", 3306)])
    )
    api.upsert(make_service_obj("default", "web-headless", clusterIP="None"))
    api.upsert(headless_slice(lab, lab.pods))
    api.upsert(
        make_service_obj(
            "default",
            "nginx-external",
            type="ExternalName",
            externalName="mysql.external-domain.com",
        )
    )
    # nothing leaves the lab: the upstream is a closed port on the node itself
    agent = Agent(lab, lab.nodes[0], kubeconfig, dns=True, extra=["--dns-upstream", "127.0.0.1:9"])
    agent.start()
    return api, agent


def dig(lab: Lab, ns: str, *args: str) -> list[str]:
    out = lab.run(
        ns,
        ["dig", f"@{NODE_LOCAL}", "+time=1", "+tries=2", "+short", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.split()


def test_pods_resolve_the_classic_lab_services(lab: Lab, dns_lab: Any) -> None:
    pod = lab.pods[0]
    domain = "default.svc.cluster.local"
    eventually(lambda: dig(lab, pod.ns, f"mysql-service.{domain}") == [MYSQL_IP], timeout=15)
    assert sorted(dig(lab, pod.ns, f"web-headless.{domain}")) == sorted(p.ip for p in lab.pods)
    assert dig(lab, pod.ns, f"web-0.web-headless.{domain}") == [lab.pods[0].ip]
    assert dig(lab, pod.ns, f"nginx-external.{domain}", "CNAME") == ["mysql.external-domain.com."]
    srv = dig(lab, pod.ns, f"_mysql._tcp.mysql-service.{domain}", "SRV")
    assert srv == ["0", "100", "3306", f"mysql-service.{domain}."]
    assert dig(lab, pod.ns, "-x", MYSQL_IP) == [f"mysql-service.{domain}."]
    assert dig(lab, pod.ns, "-x", lab.pods[1].ip) == [f"web-1.web-headless.{domain}."]
    assert dig(lab, pod.ns, f"web-headless.{domain}", "+tcp") == dig(
        lab, pod.ns, f"web-headless.{domain}"
    )


def test_endpoint_changes_reach_dns(lab: Lab, dns_lab: Any) -> None:
    api, _ = dns_lab
    pod = lab.pods[0]
    name = "web-headless.default.svc.cluster.local"
    eventually(lambda: len(dig(lab, pod.ns, name)) == len(lab.pods), timeout=15)
    api.upsert(headless_slice(lab, lab.pods[:1]))
    eventually(lambda: dig(lab, pod.ns, name) == [lab.pods[0].ip], timeout=3)
