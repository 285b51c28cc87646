"""Settings: defaults < KubeProxyConfiguration file < flags; unknown/invalid fields are errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kproxy.config import (
    ConfigError,
    Settings,
    build_parser,
    parse_duration,
    reference_markdown,
    resolve,
)

KUBE_PROXY_CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
clusterCIDR: 10.244.0.0/16
conntrack:
  maxPerCore: 32768
  tcpEstablishedTimeout: 24h0m0s
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: worker-1
iptables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  scheduler: wlc
  strictARP: true
  syncPeriod: 45s
metricsBindAddress: 127.0.0.1:10249
mode: ipvs
nodePortAddresses: ["192.168.50.0/24"]
featureGates:
  SomeGate: true
kproxy:
  dns:
    listen: ["169.254.20.10:53", "10.96.0.10:53"]
    ttl: 10
"""


def parse(argv: list[str]) -> Settings:
    return resolve(build_parser(argparse.ArgumentParser()).parse_args(argv))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_match_kube_proxy() -> None:
    s = parse([])
    assert s.proxy_mode == "iptables"
    assert s.healthz_bind_address == "0.0.0.0:10256"
    assert s.metrics_bind_address == "127.0.0.1:10249"
    assert s.iptables_sync_period == 30 and s.iptables_min_sync_period == 1
    assert s.masquerade_bit == 14 and s.dns_listen == ("169.254.20.10:53",)


def test_kube_proxy_config_file_loads_unchanged(tmp_path: Path) -> None:
    s = parse(["--config", write(tmp_path, KUBE_PROXY_CONFIG)])
    assert s.proxy_mode == "ipvs" and s.ipvs_scheduler == "wlc" and s.ipvs_sync_period == 45
    assert s.ipvs_strict_arp and not parse([]).ipvs_strict_arp  # MetalLB's requirement
    assert s.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert s.cluster_cidr == ("10.244.0.0/16",) and s.hostname_override == "worker-1"
    assert s.nodeport_addresses == ("192.168.50.0/24",)
    assert s.dns_listen == ("169.254.20.10:53", "10.96.0.10:53") and s.dns_ttl == 10
    assert "conntrack.maxPerCore" in s.ignored and "featureGates" in s.ignored


def test_flags_override_file(tmp_path: Path) -> None:
    s = parse(
        [
            "--config",
            write(tmp_path, KUBE_PROXY_CONFIG),
            "--proxy-mode",
            "iptables",
            "--iptables-sync-period=1m30s",
            "--masquerade-all",
            "-v",
            "--no-dns",
        ]
    )
    assert s.proxy_mode == "iptables" and s.iptables_sync_period == 90
    assert s.masquerade_all and s.verbosity == 1 and not s.dns
    assert parse(["--v=4"]).verbosity == 4 and parse(["-v", "-v"]).verbosity == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("mode: ipvs\nbogus: 1\n", "'bogus'"),
        ("iptables:\n  syncPeriod: 30s\n  frobnicate: true\n", "'iptables.frobnicate'"),
        ("mode: kernelspace\n", "'mode'"),
        ("iptables:\n  syncPeriod: soon\n", "'iptables.syncPeriod'"),
        ("ipvs:\n  scheduler: random\n", "'ipvs.scheduler'"),
        ("healthzBindAddress: nowhere\n", "'healthzBindAddress'"),
        ("kind: Deployment\n", "kind"),
        ("- a\n- b\n", "top level"),
        ("kproxy:\n  dns:\n    tll: 5\n", "'kproxy.dns.tll'"),
    ],
    ids=[
        "unknown",
        "unknown-nested",
        "bad-mode",
        "bad-duration",
        "bad-scheduler",
        "bad-address",
        "bad-kind",
        "not-a-map",
        "typo-in-kproxy-section",
    ],
)
def test_invalid_files_name_the_field(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse(["--config", write(tmp_path, text)])


def test_bad_flag_value_exits() -> None:
    with pytest.raises(SystemExit):
        parse(["--proxy-mode", "kernelspace"])


def test_userspace_mode_from_flag_and_file(tmp_path: Path) -> None:
    assert parse(["--proxy-mode", "userspace"]).proxy_mode == "userspace"
    s = parse(["--config", write(tmp_path, "mode: userspace\nudpIdleTimeout: 1s\n")])
    assert s.proxy_mode == "userspace" and s.udp_idle_timeout == 1.0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        parse(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("1m0s", 60), ("1h2m3s", 3723), ("500ms", 0.5), ("0", 0), (15, 15)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_reference_lists_every_flag() -> None:
    text = reference_markdown()
    for flag in ("--proxy-mode", "--cluster-cidr", "--dns-listen", "--iptables-sync-period"):
        assert f"`{flag}`" in text


def test_committed_reference_is_current() -> None:
    committed = Path(__file__).parents[2] / "docs" / "configuration.md"
    assert committed.read_text() == reference_markdown(), "run: kproxy config-reference"
