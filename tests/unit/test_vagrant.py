"""vagrant/: the lab's Vagrantfile passes `vagrant validate` (Debian's vagrant with the libvirt
provider; VirtualBox settings cannot be validated without VirtualBox), defines the machines it
says, refuses bad settings; the provisioning scripts pass shellcheck; the example manifests are
the classic lab and agree with the cluster the provisioning builds."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.config import load_file

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "vagrant"
SCRIPTS = [
    LAB / "check.sh",
    *sorted((LAB / "provision").glob("*.sh")),
    ROOT / ".ci" / "ops-setup.sh",
]

needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant not installed")


def vagrant(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run vagrant in vagrant/ with all its state (machine index, lab secrets) under tmp_path."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_NO_COLOR": "1",
        **settings,
    }
    return subprocess.run(
        ["vagrant", *args],
        cwd=LAB,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def machines(tmp_path: Path, **settings: str) -> list[str]:
    result = vagrant(tmp_path, "status", "--machine-readable", **settings)
    assert result.returncode == 0, result.stdout + result.stderr
    names = []
    for line in result.stdout.splitlines():
        fields = line.split(",")
        if len(fields) >= 4 and fields[2] == "state" and fields[1] not in names:
            names.append(fields[1])
    return names


@needs_vagrant
@pytest.mark.slow
def test_vagrant_validate_and_machines(tmp_path: Path) -> None:
    result = vagrant(tmp_path, "validate")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout
    # The tokens the nodes share are made once, kept with the machine state, and well-formed.
    secrets_file = tmp_path / "dot" / "kproxy-lab-secrets.json"
    secrets = json.loads(secrets_file.read_text())
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", secrets["join_token"])
    assert len(secrets["kproxy_token"]) >= 32

    # One control plane and two workers; every later vagrant command sees the same tokens.
    assert machines(tmp_path) == ["cp", "w1", "w2"]
    assert json.loads(secrets_file.read_text()) == secrets


@needs_vagrant
@pytest.mark.slow
def test_bad_settings_are_refused(tmp_path: Path) -> None:
    result = vagrant(tmp_path, "validate", KPROXY_LAB_MODE="nftables")
    assert result.returncode != 0
    assert "must be iptables or ipvs" in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script: Path) -> None:
    result = subprocess.run(
        ["shellcheck", "-x", script.name],
        cwd=script.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout


# -- the example manifests ----------------------------------------------------------------------
def example_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((LAB / "examples").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


DOCS = example_docs()


def find(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads_selected_by(service: dict[str, Any]) -> list[dict[str, Any]]:
    selector = service["spec"].get("selector", {})
    return [
        d
        for d in DOCS
        if d["kind"] in ("Deployment", "StatefulSet")
        and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


def replicas_behind(service: dict[str, Any]) -> int:
    return sum(w["spec"].get("replicas", 1) for w in workloads_selected_by(service))


def vagrant_setting(name: str) -> str:
    match = re.search(rf'"{name}" => "([^"]+)"', (LAB / "Vagrantfile").read_text())
    assert match, name
    return match.group(1)


def test_classic_lab_services() -> None:
    mysql = find("Service", "mysql-service")["spec"]
    assert (mysql["type"], mysql["clusterIP"]) == ("ClusterIP", "10.96.100.50")
    assert (mysql["ports"][0]["port"], mysql["ports"][0]["targetPort"]) == (3306, 3306)
    assert mysql["selector"] == {"app": "mysql"}

    nodeport = find("Service", "nginx-nodeport")
    assert nodeport["spec"]["type"] == "NodePort"
    assert nodeport["spec"]["ports"][0]["nodePort"] == 30080
    assert nodeport["spec"]["ports"][0]["port"] == 80
    assert replicas_behind(nodeport) == 3

    lb = find("Service", "nginx-loadbalancer")
    assert (lb["spec"]["type"], lb["spec"]["ports"][0]["port"]) == ("LoadBalancer", 80)

    headless = find("Service", "web-headless")
    assert headless["spec"]["clusterIP"] == "None"
    [web] = workloads_selected_by(headless)
    assert (web["kind"], web["metadata"]["name"]) == ("StatefulSet", "web")
    assert web["spec"]["serviceName"] == "web-headless" and web["spec"]["replicas"] == 3

    external = find("Service", "nginx-external")["spec"]
    assert external == {"type": "ExternalName", "externalName": "mysql.external-domain.com"}


def test_every_proxied_service_has_pods_and_resolvable_target_ports() -> None:
    for svc in (d for d in DOCS if d["kind"] == "Service"):
        if svc["spec"].get("type") == "ExternalName":
            continue
        workloads = workloads_selected_by(svc)
        assert workloads, svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in workloads:
                container_ports = [
                    p
                    for c in workload["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])
                ]
                if isinstance(target, str):
                    assert target in {p.get("name") for p in container_ports}, svc
                else:
                    assert target in {p["containerPort"] for p in container_ports}, svc


def test_fixed_cluster_ip_lies_in_the_labs_service_cidr() -> None:
    cidr = ipaddress.ip_network(vagrant_setting("SERVICE_CIDR"))
    assert ipaddress.ip_address(find("Service", "mysql-service")["spec"]["clusterIP"]) in cidr


def test_kubelet_points_pods_at_kproxy_dns() -> None:
    match = re.search(
        r"clusterDNS: \[\"([0-9.]+)\"\]", (LAB / "provision" / "control-plane.sh").read_text()
    )
    assert match
    values, _ = load_file(str(ROOT / "systemd" / "config.yaml"))
    listen_ips = {addr.rsplit(":", 1)[0] for addr in values["dns_listen"]}
    assert match.group(1) in listen_ips
    assert vagrant_setting("POD_CIDR") in values["cluster_cidr"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_examples_kubernetes_validate_strict(doc: dict[str, Any]) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(doc, "1.32.0", strict=True)


# -- LoadBalancer pool and Ingress (issue 13) ---------------------------------------------------
def lab_pool() -> str:
    match = re.search(r'"LB_POOL" => "([^"]+)"', (LAB / "Vagrantfile").read_text())
    assert match
    subnet = re.search(r'^SUBNET = "([0-9.]+)"', (LAB / "Vagrantfile").read_text(), re.M)
    assert subnet
    return match.group(1).replace("#{SUBNET}", subnet.group(1))


def test_lb_pool_lies_on_the_host_only_network_clear_of_the_nodes() -> None:
    from kproxy.lb.pools import Pools

    pools = Pools.parse([lab_pool()])
    assert pools.size() == 21
    network = ipaddress.ip_network("192.168.56.0/24")
    [r] = pools.ranges
    assert r.first in network and r.last in network
    taken = {"192.168.56.1", "192.168.56.10", *(f"192.168.56.{10 + i}" for i in range(1, 10))}
    assert not any(pools.contains(ip) for ip in taken)


def test_lab_gives_kproxy_the_pool_and_its_permissions() -> None:
    start = (LAB / "provision" / "start-kproxy.sh").read_text()
    assert "--lb-pool $LB_POOL" in start
    cp = (LAB / "provision" / "control-plane.sh").read_text()
    assert '"$SRC/deploy/loadbalancer/rbac.yaml"' in cp
    roles = {
        d["kind"]: d["metadata"]["name"]
        for d in yaml.safe_load_all((ROOT / "deploy" / "loadbalancer" / "rbac.yaml").read_text())
        if d
    }
    assert f"--clusterrole={roles['ClusterRole']}" in cp
    assert f"--role={roles['Role']}" in cp
    assert cp.count("--group=kproxy:nodes") >= 3  # read-only role + both LB roles
    # the lab's token group is the one the API server maps kproxy's token to
    assert 'kproxy,kproxy,\\"kproxy:nodes\\"' in cp


def test_ingress_nginx_is_installed_behind_a_loadbalancer() -> None:
    cp = (LAB / "provision" / "control-plane.sh").read_text()
    assert "deploy/static/provider/cloud/deploy.yaml" in cp
    assert 'grep -q "type: LoadBalancer" /root/ingress-nginx.yaml' in cp
    assert re.search(r'"INGRESS_NGINX_RELEASE" => INGRESS', (LAB / "Vagrantfile").read_text())


def test_ingress_examples_route_hosts_and_paths_to_example_services() -> None:
    ingresses = [d for d in DOCS if d["kind"] == "Ingress"]
    hosts = {r.get("host") for i in ingresses for r in i["spec"]["rules"]}
    assert {"app1.lab.local", "app2.lab.local", "lab.local"} <= hosts
    paths = [p["path"] for i in ingresses for r in i["spec"]["rules"] for p in r["http"]["paths"]]
    assert any(p.startswith("/app1") for p in paths) and any(p.startswith("/app2") for p in paths)
    for ingress in ingresses:
        assert ingress["spec"]["ingressClassName"] == "nginx"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = find("Service", backend["name"])
                assert backend["port"]["number"] in {p["port"] for p in svc["spec"]["ports"]}
                assert replicas_behind(svc) >= 1
