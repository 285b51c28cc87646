"""The systemd assets: the unit passes systemd's own checks (`systemd-analyze verify`, offline
`security` assessment), grants what kproxy needs and nothing more, and agrees with the config
module (the command line it runs parses; the IPVS modules cover every scheduler accepted)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
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


# -- the unit under a real systemd -------------------------------------------------------------
# systemd boots as PID 1 of a throwaway container (systemd-nspawn) whose root is an overlay of
# this machine's root on a tmpfs, with a private network namespace: the unit, its sandbox and the
# notify protocol run for real, kproxy programs iptables inside that namespace only, and nothing
# on the host changes. kproxy runs with --manifests (the bundled classic lab), so no cluster.
BOOT_TARGET = "kproxy-test.target"


class Container:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.name = f"kproxy-test-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mounts: list[Path] = []

    def prepare(self) -> None:
        layers = self.base / "layers"
        layers.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(layers)], check=True)
        self.mounts.append(layers)
        (layers / "upper").mkdir()
        (layers / "work").mkdir()
        self.root.mkdir()
        options = f"lowerdir=/,upperdir={layers}/upper,workdir={layers}/work"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)], check=True
        )
        self.mounts.insert(0, self.root)

    def write(self, path: str, text: str) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def boot(self, *, binds: list[Path]) -> None:
        console = (self.base / "console.log").open("wb")
        argv = ["systemd-nspawn", "-D", str(self.root), "-M", self.name, "--boot"]
        argv += ["--private-network", "--register=no", "--keep-unit", "--quiet"]
        argv += [f"--bind-ro={path}" for path in binds]
        argv += ["--", f"systemd.unit={BOOT_TARGET}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=console)

    def init_pid(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.console()
            pids = children.read_text().split() if children.exists() else []
            if pids:
                return int(pids[0])
            time.sleep(0.2)
        raise AssertionError("the container's init never started:\n" + self.console())

    def run(self, *argv: str, check: bool = True) -> str:
        """Run a command inside the container (its mount, PID and network namespaces)."""
        enter = ["nsenter", "-t", str(self.init_pid()), "-m", "-u", "-i", "-n", "-p", "--"]
        result = subprocess.run(
            [*enter, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        if check:
            assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
        return result.stdout

    def show(self, unit: str, *props: str, check: bool = True) -> dict[str, str]:
        argv = ("systemctl", "show", unit, *(f"--property={p}" for p in props))
        out = self.run(*argv, check=check)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def console(self) -> str:
        path = self.base / "console.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # nspawn shuts the container down cleanly on SIGTERM
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for mount in self.mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def _boot_test_skip_reason() -> str:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn not installed (systemd-container)"
    if not Path("/usr/lib/systemd/systemd").exists():
        return "no systemd binary"
    import kproxy

    where = Path(kproxy.__file__).resolve()
    if where.is_relative_to("/tmp") or where.is_relative_to("/var/tmp"):
        # the container mounts its own /tmp: a checkout there is invisible inside it
        return f"kproxy is installed from {where.parent}, which the container cannot see"
    return ""


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    reason = _boot_test_skip_reason()
    if reason:
        pytest.skip(reason)
    box = Container(tmp_path)
    try:
        box.prepare()
        yield box
    finally:
        box.close()


REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(sys.executable).resolve()
NET_CAP_MASK = (1 << 12) | (1 << 13) | (1 << 10)  # NET_ADMIN, NET_RAW, NET_BIND_SERVICE

# A stand-in for the daemon that speaks the same protocol through kproxy.runtime.sdnotify and
# probes the sandbox from inside: READY=1 with a status, then WATCHDOG=1 at watchdog_interval()
# (forever, or N pings and then a hang), STOPPING=1 and exit 0 on SIGTERM.
STAND_IN = """
import json, signal, sys, time
from kproxy.runtime.sdnotify import Notifier

def attempt(path, mode, data=""):
    try:
        with open(path, mode) as f:
            f.write(data)
        return "ok"
    except OSError as err:
        return err.__class__.__name__

probes = {
    "net_sysctl": attempt("/proc/sys/net/ipv4/ip_forward", "w", "1"),
    "kernel_sysctl": attempt("/proc/sys/kernel/domainname", "w", "x"),
    "xtables_lock": attempt("/run/xtables.lock", "a"),
    "usr": attempt("/usr/kproxy-probe", "w"),
    "runtime_dir": attempt("/run/kproxy/probe", "w"),
}
json.dump(probes, open("/run/kproxy/probes.json", "w"))
class Stop(Exception):
    pass

def on_term(*_):
    raise Stop  # interrupts the sleep below (a plain flag would wait for it to end)

signal.signal(signal.SIGTERM, on_term)
notifier = Notifier()
notifier.ready(status="synced 0 services (stand-in)")
pings = int(sys.argv[1])
try:
    while True:
        if pings != 0:
            notifier.watchdog()
            pings -= 1
        time.sleep(notifier.watchdog_interval() or 1.0)
except Stop:
    notifier.stopping()
"""


def install_unit(
    box: Container, name: str, exec_start: str, *, overrides: str = "", kproxy_args: str = ""
) -> None:
    unit = UNIT.read_text().replace(f"ExecStart={INSTALLED_EXEC} run ", f"ExecStart={exec_start} ")
    assert f"ExecStart={exec_start} " in unit
    box.write(f"/etc/systemd/system/{name}", unit)
    # The only change to the sandbox: this test's Python may live under /root.
    box.write(
        f"/etc/systemd/system/{name}.d/test.conf",
        "[Service]\nProtectHome=read-only\n" + overrides,
    )
    box.write("/etc/kproxy/config.yaml", (SYSTEMD / "config.yaml").read_text())
    box.write("/etc/default/kproxy", f'KPROXY_ARGS="{kproxy_args}"\n')


def boot(box: Container, *units: str) -> None:
    box.write(
        f"/etc/systemd/system/{BOOT_TARGET}",
        "[Unit]\nDescription=kproxy boot test\nRequires=basic.target\nAfter=basic.target\n"
        f"Wants={' '.join(units)}\n",
    )
    box.boot(binds=[REPO, PYTHON.parents[1]])


def wait_for(box: Container, unit: str, done: Callable[[dict[str, str]], bool]) -> dict[str, str]:
    props = ("ActiveState", "SubState", "Result", "NRestarts", "StatusText")
    state: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        # (systemctl fails until the container's systemd has opened its control socket)
        state = box.show(unit, *props, check=False)
        if state and done(state):
            return state
        time.sleep(0.3)
    raise AssertionError(f"{unit}: {state}\n{journal(box, unit)}")


def settled(state: dict[str, str]) -> bool:
    """Started (READY=1 arrived), failed, or failed once and being restarted."""
    return state["ActiveState"] in ("active", "failed") or state["NRestarts"] != "0"


def journal(box: Container, unit: str) -> str:
    return box.run("journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False)[-4000:]


def capability_bounding_set(box: Container, unit: str) -> int:
    pid = box.show(unit, "MainPID")["MainPID"]
    match = re.search(r"^CapBnd:\s+([0-9a-f]+)$", box.run("cat", f"/proc/{pid}/status"), re.M)
    assert match
    return int(match.group(1), 16)


@pytest.mark.slow
@pytest.mark.netns
def test_notify_watchdog_and_sandbox_under_real_systemd(container: Container) -> None:
    stand_in = "/opt/kproxy-test/stand_in.py"
    container.write(stand_in, STAND_IN)
    install_unit(container, "kproxy.service", f"{PYTHON} {stand_in} -1")
    # The same unit with a short watchdog and a stand-in that stops pinging after two pings.
    install_unit(
        container,
        "kproxy-hung.service",
        f"{PYTHON} {stand_in} 2",
        overrides="WatchdogSec=2\nRestart=no\n",
    )
    # ... and one that keeps pinging at watchdog_interval() under that short watchdog.
    install_unit(
        container,
        "kproxy-pinging.service",
        f"{PYTHON} {stand_in} -1",
        overrides="WatchdogSec=2\nRestart=no\n",
    )
    boot(container, "kproxy.service", "kproxy-hung.service", "kproxy-pinging.service")

    # Type=notify: "active" only once READY=1 arrived, with the STATUS= text.
    state = wait_for(container, "kproxy.service", settled)
    assert state["ActiveState"] == "active", journal(container, "kproxy.service")
    assert state["StatusText"] == "synced 0 services (stand-in)"
    assert container.show("kproxy.service", "WatchdogUSec")["WatchdogUSec"] == "30s"
    assert capability_bounding_set(container, "kproxy.service") == NET_CAP_MASK

    probes = json.loads(container.run("cat", "/run/kproxy/probes.json"))
    assert probes == {
        "net_sysctl": "ok",  # ReadWritePaths=/proc/sys/net under ProtectKernelTunables
        "kernel_sysctl": "OSError",  # EROFS: the rest of /proc/sys stays read-only
        "xtables_lock": "ok",  # created by ExecStartPre, bind-mounted writable
        "usr": "OSError",  # ProtectSystem=strict
        "runtime_dir": "ok",  # RuntimeDirectory=kproxy
    }

    # The same stand-in that stops pinging is killed by the watchdog (WatchdogSec=2).
    hung = wait_for(container, "kproxy-hung.service", lambda s: s["ActiveState"] == "failed")
    assert hung["Result"] == "watchdog"
    log = journal(container, "kproxy-hung.service")
    assert "Watchdog timeout" in log
    # PYTHONFAULTHANDLER=1 in the unit: the SIGABRT leaves the stack that hung in the journal.
    assert "most recent call first" in log
    time.sleep(2.0)  # past another full WatchdogSec
    pinging = container.show("kproxy-pinging.service", "ActiveState", "NRestarts", "Result")
    assert pinging == {"ActiveState": "active", "NRestarts": "0", "Result": "success"}

    # SIGTERM: STOPPING=1, exit 0, a clean "success".
    container.run("systemctl", "stop", "kproxy.service")
    after = container.show("kproxy.service", "ActiveState", "Result", "ExecMainStatus")
    assert after == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}


def _nat_rules(box: Container) -> str:
    return "".join(
        box.run(save, "-t", "nat", check=False)
        for save in ("iptables-nft-save", "iptables-legacy-save")
    )


@pytest.mark.slow
@pytest.mark.netns
def test_kproxy_runs_under_real_systemd(container: Container) -> None:
    if importlib.util.find_spec("kproxy.backends.iptables") is None:
        pytest.skip("kproxy's iptables backend is not there yet")
    # kproxy itself, in manifests mode on the bundled classic lab (no cluster needed).
    manifests = REPO / "kproxy" / "examples"
    install_unit(
        container,
        "kproxy.service",
        f"{PYTHON} -m kproxy run",
        kproxy_args=f"--manifests {manifests} -v=2",
    )
    boot(container, "kproxy.service")

    state = wait_for(container, "kproxy.service", settled)
    assert (state["ActiveState"], state["NRestarts"]) == ("active", "0"), journal(
        container, "kproxy.service"
    )
    assert state["StatusText"].startswith("synced"), state
    assert capability_bounding_set(container, "kproxy.service") == NET_CAP_MASK
    assert "10.96.100.50/32" in _nat_rules(container)

    # A stop is clean (exit 0) and leaves the rules in place.
    container.run("systemctl", "stop", "kproxy.service")
    after = container.show("kproxy.service", "ActiveState", "Result", "ExecMainStatus")
    assert after == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (
        journal(container, "kproxy.service")
    )
    assert "10.96.100.50/32" in _nat_rules(container)


def test_strict_arp_snippet_matches_what_the_agent_sets() -> None:
    """IPVS + LoadBalancer pools: the sysctl.d snippet the lab installs sets exactly what
    kproxy.runtime.lb.strict_arp writes (the agent cannot under ProtectKernelTunables)."""
    import inspect

    from kproxy.runtime.lb import strict_arp

    text = (SYSTEMD / "sysctl.d" / "91-kproxy-strict-arp.conf").read_text()
    settings = dict(
        (k.strip(), v.strip())
        for k, _, v in (
            line.partition("=") for line in text.splitlines() if line and not line.startswith("#")
        )
    )
    assert settings == {"net.ipv4.conf.all.arp_ignore": "1", "net.ipv4.conf.all.arp_announce": "2"}
    source = inspect.getsource(strict_arp)
    for key, value in settings.items():
        assert f'("{key}", "{value}")' in source
        assert Path("/proc/sys", *key.split(".")).exists()
    node_sh = (SYSTEMD.parent / "vagrant" / "provision" / "node.sh").read_text()
    assert "91-kproxy-strict-arp.conf" in node_sh and '"$KPROXY_MODE" = ipvs' in node_sh
