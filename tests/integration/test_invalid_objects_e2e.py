"""Hostile manifests and refused rules against the real `kproxy run` (issue 12 items 2 and 5).

A manifests directory holds valid Services next to ones the API server would refuse (a
10,000-character name, port 70000, clusterIP 10.96.0.300) and one with leading-zero
addresses (172.30.0.041, endpoints like 010.244.001.002): the refused ones are skipped with one
log line each, everything else is programmed and carries real traffic, /healthz stays 200,
and later changes land. A Service whose rules iptables-restore refuses (injected below the
sources, see tests/support/rejecting_agent.py) is left out, reported in the log, the metrics,
/rejected and `kproxy status`, while every other service keeps working."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kproxy.lab.netlab import Lab
from kproxy.lab.nsexec import module_argv
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_batch
from tests.support.agent import Agent, eventually, http_json
from tests.support.objects import make_service_obj, make_slice_obj
from tests.support.rejecting_agent import BAD_NAME

pytestmark = [pytest.mark.netns]

LONG = "x" * 10_000


def zero_padded(ip: str) -> str:
    return ".".join(f"{int(part):03d}" for part in ip.split("."))


def service(name: str, ip: str, port: int = 80) -> dict[str, Any]:
    return make_service_obj(
        "default",
        name,
        clusterIP=ip,
        ports=[{"name": "http", "protocol": "TCP", "port": port, "targetPort": 80}],
    )


def slice_for(name: str, ips: list[str]) -> dict[str, Any]:
    return make_slice_obj("default", f"{name[:40]}-abcde", name, ips, [("http", 80)])


def write(directory: Path, filename: str, objects: list[dict[str, Any]]) -> None:
    (directory / filename).write_text(json.dumps({"kind": "List", "items": objects}))


def manifests_agent(lab: Lab, directory: Path, module: str = "kproxy", *extra: str) -> Agent:
    class ManifestAgent(Agent):
        def argv(self) -> list[str]:
            argv = super().argv()
            i = argv.index("--kubeconfig")
            del argv[i : i + 2]
            argv += ["--manifests", str(directory)]
            return module_argv(module, *argv[argv.index("run") :], *extra)

    return ManifestAgent(lab, lab.nodes[0], "")


def full_log(agent: Agent) -> str:
    return Path(agent.log_path).read_text(errors="replace")


def reaches_every_pod(lab: Lab, ip: str) -> bool:
    batch = http_batch(lab.pods[0].ns, ip, 80, n=30)
    assert batch.ok_count == 30, (ip, batch.results[:3])
    assert set(batch.names) == {p.name for p in lab.pods}, (ip, batch.names)
    return True


def test_refused_objects_are_skipped_and_valid_services_carry_traffic(
    lab: Lab, tmp_path: Path
) -> None:
    serve_pods(lab, tcp=[80])
    pods = [p.ip for p in lab.pods]
    write(
        tmp_path,
        "services.json",
        [
            service("web", "10.96.0.80"),
            slice_for("web", pods),
            service("zeros", "172.30.0.041"),
            slice_for("zeros", [zero_padded(ip) for ip in pods]),
            service(LONG, "10.96.0.82"),
            slice_for(LONG, pods),
            service("badport", "10.96.0.83", port=70000),
            slice_for("badport", pods),
            service("badip", "10.96.0.300"),
            slice_for("badip", pods),
        ],
    )
    agent = manifests_agent(lab, tmp_path)
    agent.start()
    assert reaches_every_pod(lab, "10.96.0.80")
    assert reaches_every_pod(lab, "172.30.0.41")  # 172.30.0.041, read as kube-proxy reads it
    assert http_json(lab.nodes[0].ns, "127.0.0.1", 10256, path="/healthz")[0] == 200
    log = full_log(agent)
    refused = [ln for ln in log.splitlines() if "skipping invalid Service" in ln]
    assert len(refused) == 3, refused
    assert all(len(ln) < 600 for ln in refused), [len(ln) for ln in refused]
    assert any("(10000 chars)" in ln and "metadata.name" in ln for ln in refused)
    assert any("default/badport" in ln and "70000" in ln for ln in refused)
    assert any("default/badip" in ln and "10.96.0.300" in ln for ln in refused)
    assert log.count("172.30.0.041") == 1  # noted once
    assert re.search(r'kproxy_invalid_objects_total\{kind="Service"\} 3\.0', agent.metrics())
    nat = agent.save()
    assert "10.96.0.82" not in nat and "10.96.0.83" not in nat and "xxxxxxxxxx" not in nat
    # later changes land: a new service in a new file, while the refused ones are still there
    write(tmp_path, "late.json", [service("late", "10.96.0.84"), slice_for("late", pods)])
    eventually(lambda: reaches_every_pod(lab, "10.96.0.84"), timeout=15)
    assert http_json(lab.nodes[0].ns, "127.0.0.1", 10256, path="/healthz")[0] == 200
    assert reaches_every_pod(lab, "172.30.0.41")
    # the reload read the refused objects again, without logging them again
    assert sum("skipping invalid Service" in ln for ln in full_log(agent).splitlines()) == 3


def test_service_iptables_refuses_is_left_out_and_reported(lab: Lab, tmp_path: Path) -> None:
    serve_pods(lab, tcp=[80])
    pods = [p.ip for p in lab.pods]
    write(tmp_path, "services.json", [service("web", "10.96.0.80"), slice_for("web", pods)])
    agent = manifests_agent(
        lab,
        tmp_path,
        "tests.support.rejecting_agent",
        "--inject-ip",
        "10.96.0.90",
        "--inject-endpoint",
        pods[0],
    )
    agent.start()
    node = lab.nodes[0].ns

    def rejected(*flags: str) -> list[dict[str, Any]]:
        argv = module_argv("kproxy", "status", "-o", "json", *flags)
        res = lab.run(node, argv, capture_output=True, text=True, check=False)
        doc = json.loads(res.stdout)
        assert res.returncode == 1 and doc["rejected"], (res.returncode, doc.get("rejected"))
        return list(doc["rejected"])

    # kproxy status shows it (also with the wanted state from flags), and exits 1
    (item,) = eventually(rejected, timeout=15)
    assert item["service"] == f"default/{BAD_NAME}" and item["family"] == 4
    assert "Parameter too long" in item["error"]
    flags = ("--manifests", str(tmp_path), "--hostname-override", lab.nodes[0].name)
    assert rejected(*flags) == [item]
    table = lab.run(node, module_argv("kproxy", "status"), capture_output=True, check=False)
    assert "Refused by iptables-restore" in table.stdout and "Parameter too long" in table.stdout
    assert reaches_every_pod(lab, "10.96.0.80")
    assert "10.96.0.90" not in agent.save()
    assert http_json(node, "127.0.0.1", 10256, path="/healthz")[0] == 200
    assert "kproxy_sync_rejected_services 1.0" in agent.metrics()
    log = full_log(agent)
    lines = [ln for ln in log.splitlines() if "iptables refused the rules of service" in ln]
    assert lines and all(len(ln) < 600 for ln in lines) and "(2000 chars)" in lines[0]
    # later changes still land
    write(tmp_path, "late.json", [service("late", "10.96.0.84"), slice_for("late", pods)])
    eventually(lambda: reaches_every_pod(lab, "10.96.0.84"), timeout=15)
    assert http_json(node, "127.0.0.1", 10256, path="/healthz")[0] == 200
    assert reaches_every_pod(lab, "10.96.0.80")
