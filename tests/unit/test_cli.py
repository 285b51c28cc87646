"""The CLI without root: render from manifests, config reference, version, bad config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kproxy.cli import main
from kproxy.render.chains import sep_chain, svc_chain

EXAMPLES = Path(__file__).parents[2] / "kproxy" / "examples"


@pytest.fixture
def manifests(tmp_path: Path) -> str:
    shutil.copy(EXAMPLES / "classic-lab.yaml", tmp_path / "lab.yaml")
    return str(tmp_path)


def test_render_prints_the_classic_lab(manifests: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--manifests", manifests, "--cluster-cidr", "10.244.0.0/16"]) == 0
    out = capsys.readouterr().out
    mysql = svc_chain("default/mysql-service:mysql", "tcp")
    assert '-A KUBE-SERVICES -m comment --comment "default/mysql-service:mysql cluster IP"' in out
    assert f"-j {mysql}" in out
    sep = sep_chain("default/mysql-service:mysql", "tcp", "10.244.1.14:3306")
    assert f"-A {sep}" in out and "--to-destination 10.244.1.14:3306" in out
    assert "--dport 30080 -j KUBE-EXT-" in out  # the NodePort
    assert "web-headless" not in out and "nginx-external" not in out  # DNS-only services
    assert out.count("*nat") == 1 and out.count("COMMIT") == 2


def test_render_ipvs(manifests: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--proxy-mode", "ipvs", "--manifests", manifests]) == 0
    out = capsys.readouterr().out
    assert "-A -t 10.96.100.50:3306 -s rr" in out
    assert "-a -t 10.96.100.80:80 -r 10.244.1.12:80 -m -w 1" in out


def test_render_nftables(manifests: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["render", "--proxy-mode", "nftables", "--manifests", manifests]
    assert main([*args, "--cluster-cidr", "10.244.0.0/16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("add table ip kube-proxy")
    # a plain ClusterIP service takes the chainless fast path: an element of the shared map
    # for its endpoint count, no chain, no service-ips element
    assert "mysql-service/" not in out
    assert "cluster-endpoints-1 { 10.96.100.50 . tcp . 3306 . 0 : 10.244.1.14 . 3306 }" in out
    assert "numgen random mod 1 map @cluster-endpoints-1" in out
    assert 'tcp . 30080 comment "default/nginx-nodeport:http" : goto external-' in out
    assert "dnat ip to numgen random mod 65536 map @endpoints-" in out
    assert "web-headless" not in out and "nginx-external" not in out


def test_bad_config_refuses_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mode: iptables\nunknownField: 1\n")
    with pytest.raises(SystemExit) as err:
        main(["run", "--config", str(cfg)])
    assert err.value.code == 2
    assert "unknownField" in capsys.readouterr().err


def test_version_and_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("kproxy ")
    assert main(["config-reference"]) == 0
    assert "--proxy-mode" in capsys.readouterr().out
