"""The systemd assets: the unit passes systemd's own checks (`systemd-analyze verify`, offline
`security` assessment), grants what kproxy needs and nothing more, and agrees with the config
module (the command line it runs parses; the IPVS modules cover every scheduler accepted)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kproxy.config import IPVS_SCHEDULERS, build_parser, resolve

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "kproxy.service"
IPVS_DROPIN = SYSTEMD / "kproxy-ipvs.conf"
INSTALLED_EXEC = "/usr/local/bin/kproxy"
NET_CAPS = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def parse_unit(*paths: Path) -> dict[str, list[str]]:
    """`Section.Key` -> every value assigned, in order, across the unit and its drop-ins."""
    out: dict[str, list[str]] = {}
    for path in paths:
        section = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(key, [])
    assert len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


def words(unit: dict[str, list[str]], key: str) -> set[str]:
    return {w for value in unit.get(key, []) for w in value.split()}


def staged_unit(tmp_path: Path, *, with_ipvs: bool) -> Path:
    """The unit as installed, with ExecStart pointing at an executable that exists here
    (verify insists the binary exists; the pip-installed `kproxy` script, else python)."""
    exe = shutil.which("kproxy") or sys.executable
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = UNIT.read_text().replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={exe} ")
    assert f"ExecStart={exe} " in text
    (tmp_path / "kproxy.service").write_text(text)
    if with_ipvs:
        (tmp_path / "kproxy.service.d").mkdir()
        shutil.copy(IPVS_DROPIN, tmp_path / "kproxy.service.d" / "ipvs.conf")
    return tmp_path


def analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A unit path ending in ":" appends the built-in search path (for the units we reference).
    env = {"SYSTEMD_UNIT_PATH": f"{unit_dir}:", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=unit_dir,
        timeout=60,
        check=False,
    )


@needs_analyze
@pytest.mark.parametrize("with_ipvs", [False, True], ids=["iptables", "ipvs-dropin"])
def test_systemd_analyze_verify_passes(tmp_path: Path, with_ipvs: bool) -> None:
    unit_dir = staged_unit(tmp_path, with_ipvs=with_ipvs)
    result = analyze(unit_dir, "verify", "kproxy.service")
    assert result.returncode == 0, result.stderr
    # verify reports unknown directives as warnings on stderr without failing.
    assert "kproxy.service" not in result.stderr, result.stderr


def security(unit_dir: Path) -> dict[str, bool]:
    result = analyze(unit_dir, "security", "--offline=yes", "--json=short", "kproxy.service")
    assert result.returncode == 0, result.stderr
    return {item["name"]: item["set"] for item in json.loads(result.stdout)}


@needs_analyze
def test_systemd_rates_the_sandbox_as_tight(tmp_path: Path) -> None:
    unit_dir = staged_unit(tmp_path, with_ipvs=False)
    # Exposure is 0..10; --threshold takes tenths and fails the command above it.
    # 3.0 is well inside systemd's "OK" band for a root service with network capabilities.
    result = analyze(unit_dir, "security", "--offline=yes", "--threshold=30", "kproxy.service")
    assert result.returncode == 0, result.stdout[-2000:]
    checks = security(unit_dir)
    for protected in (
        "CapabilityBoundingSet=~CAP_SYS_MODULE",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)",
        "ProtectKernelModules=",
        "ProtectKernelTunables=",
        "ProtectHome=",
        "PrivateTmp=",
        "NoNewPrivileges=",
        "RestrictAddressFamilies=~AF_PACKET",
    ):
        assert checks[protected], protected


@needs_analyze
def test_ipvs_dropin_adds_module_loading_and_nothing_else(tmp_path: Path) -> None:
    base = security(staged_unit(tmp_path / "base", with_ipvs=False))
    ipvs = security(staged_unit(tmp_path / "ipvs", with_ipvs=True))
    loosened = {name for name, ok in base.items() if ok and not ipvs.get(name, True)}
    assert loosened == {
        "CapabilityBoundingSet=~CAP_SYS_MODULE",
        "ProtectKernelModules=",
        "SystemCallFilter=~@module",
    }


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return parse_unit(UNIT)


def test_notify_watchdog_and_restart(unit: dict[str, list[str]]) -> None:
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"
    assert re.fullmatch(r"\d+s?", one(unit, "Service.WatchdogSec"))
    assert one(unit, "Service.Restart") == "on-failure"
    # SIGTERM is the signal kproxy treats as "exit, leave the rules in place".
    assert one(unit, "Service.KillSignal") == "SIGTERM"
    # A node agent must not hit the start rate limit while the apiserver is down.
    assert one(unit, "Unit.StartLimitIntervalSec") == "0"


def test_capabilities_are_exactly_the_network_ones(unit: dict[str, list[str]]) -> None:
    assert words(unit, "Service.CapabilityBoundingSet") == NET_CAPS
    assert words(unit, "Service.AmbientCapabilities") == NET_CAPS
    both = parse_unit(UNIT, IPVS_DROPIN)
    assert words(both, "Service.CapabilityBoundingSet") == NET_CAPS | {"CAP_SYS_MODULE"}
    assert one(parse_unit(IPVS_DROPIN), "Service.ProtectKernelModules") == "no"


def test_sandbox_leaves_writable_what_kproxy_writes(unit: dict[str, list[str]]) -> None:
    assert one(unit, "Service.ProtectSystem") == "strict"
    writable = {p.lstrip("-") for p in words(unit, "Service.ReadWritePaths")}
    # iptables-legacy serialises with kubelet through this lock; it is created before start.
    assert "/run/xtables.lock" in writable
    assert any("/run/xtables.lock" in pre for pre in unit["Service.ExecStartPre"])
    # ProtectKernelTunables makes /proc/sys read-only; kproxy sets net.* sysctls.
    if one(unit, "Service.ProtectKernelTunables") == "yes":
        assert "/proc/sys/net" in writable
    assert words(unit, "Service.RestrictAddressFamilies") >= {"AF_NETLINK", "AF_INET", "AF_UNIX"}


def test_exec_start_command_line_is_accepted_by_kproxy(unit: dict[str, list[str]]) -> None:
    argv = shlex.split(one(unit, "Service.ExecStart"))
    assert argv[:2] == [INSTALLED_EXEC, "run"]
    assert one(unit, "Service.EnvironmentFile") == "-/etc/default/kproxy"
    # What systemd runs on a fresh install: the shipped config file and /etc/default/kproxy.
    env = dict(
        line.split("=", 1)
        for line in (SYSTEMD / "default" / "kproxy").read_text().splitlines()
        if line and not line.startswith("#")
    )
    # EnvironmentFile strips the quotes; an unquoted $VAR then splits on whitespace.
    extra = " ".join(shlex.split(env["KPROXY_ARGS"])).split()
    args = [a for a in argv[2:] if a != "$KPROXY_ARGS"] + extra
    args[args.index("--config") + 1] = str(SYSTEMD / "config.yaml")
    settings = resolve(build_parser(argparse.ArgumentParser()).parse_args(args))
    assert settings.kubeconfig
    assert settings.proxy_mode in ("iptables", "ipvs")
    assert settings.dns_listen == ("169.254.20.10:53",)


def modules_in(name: str) -> set[str]:
    return {
        line.strip()
        for line in (SYSTEMD / "modules-load.d" / name).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }


def test_modules_cover_both_modes_and_every_ipvs_scheduler() -> None:
    always, ipvs = modules_in("kproxy.conf"), modules_in("kproxy-ipvs.conf")
    # br_netfilter: bridged pod traffic through iptables; dummy: kproxy-dns and kube-ipvs0.
    assert {"br_netfilter", "dummy"} <= always
    assert {"ip_vs", "nf_conntrack"} <= ipvs
    assert {f"ip_vs_{s}" for s in IPVS_SCHEDULERS} <= ipvs


def test_sysctls_are_well_formed_and_required_ones_exist() -> None:
    settings: dict[str, str] = {}
    for raw in (SYSTEMD / "sysctl.d" / "90-kproxy.conf").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, line
        settings[key.strip()] = value.strip()
    assert settings["net.ipv4.ip_forward"] == "1"
    for key in settings:
        if not key.startswith("-"):
            # Lines without "-" make systemd-sysctl fail when the key is absent: they must
            # exist on any Linux node (here: this machine's kernel).
            assert Path("/proc/sys", *key.split(".")).exists(), key
    assert settings["-net.ipv4.vs.conntrack"] == "1"
    assert settings["-net.bridge.bridge-nf-call-iptables"] == "1"
