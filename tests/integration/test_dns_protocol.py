"""The daemon -> DNS worker protocol version (`kproxy.dns.frames.PROTOCOL`).

A worker started with another version (kproxy upgraded in place while the daemon runs, and the
daemon restarting a worker from the new files) must refuse to serve instead of misreading the
model, and the daemon must say so (restart kproxy) without restarting it in a tight loop.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest

import kproxy
from kproxy.dns.frames import EXIT_PROTOCOL, PROTOCOL
from tests.integration.test_dns_server import free_port, loopback

ROOT = Path(kproxy.__file__).resolve().parent.parent


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-S", "-m", "kproxy.dns.worker", *args],
        input="",
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "theirs"),
    [(("--protocol", str(PROTOCOL + 1)), str(PROTOCOL + 1)), ((), "1 (unversioned)")],
    ids=["newer", "unversioned"],
)
def test_a_worker_refuses_another_protocol(args: tuple[str, ...], theirs: str) -> None:
    out = run_worker(*args, "--udp", "", "--tcp", "")
    assert out.returncode == EXIT_PROTOCOL
    (line,) = out.stderr.splitlines()
    assert f"protocol {theirs}, this worker {PROTOCOL}" in line
    assert "restart kproxy" in line
    assert json.loads(out.stdout) == {
        "event": "protocol_mismatch",
        "daemon": theirs,
        "worker": PROTOCOL,
    }


def test_a_worker_with_the_same_protocol_runs() -> None:
    # no "init" frame (stdin empty): it gets past the version check and stops, status 2
    out = run_worker("--protocol", str(PROTOCOL), "--udp", "", "--tcp", "")
    assert out.returncode == 2 and "protocol" not in out.stderr


DRIVER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from kproxy.dns import DNSOptions, DNSService
from tests.integration.test_dns_server import cluster
svc = DNSService(options=DNSOptions(listen=(sys.argv[1],), create_interface=False,
                                    upstreams=(), workers=1, allow_cidrs=("127.0.0.0/8",)))
svc.start()
svc.update(cluster())
assert svc.flush(10)
print("WORKER", svc.worker_pids[0], flush=True)
sys.stdin.readline()
svc.stop()
"""


def test_an_in_place_upgrade_is_reported_and_restarts_back_off(tmp_path: Path) -> None:
    # The daemon runs from a copy of kproxy; the copy is then "upgraded" (its PROTOCOL bumped
    # on disk) and the worker killed: the daemon restarts it from the new files.
    shutil.copytree(ROOT / "kproxy", tmp_path / "kproxy", ignore=shutil.ignore_patterns("*.pyc"))
    host = loopback()
    port = free_port(host)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(tmp_path), str(ROOT))))
    daemon = subprocess.Popen(
        [sys.executable, "-c", DRIVER, f"{host}:{port}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,  # python -c puts the current directory first on sys.path
    )
    lines: list[str] = []
    errors: list[str] = []
    try:
        assert daemon.stdout is not None and daemon.stderr is not None
        for line in daemon.stdout:
            if line.startswith("WORKER"):
                pid = int(line.split()[1])
                break
        else:
            pytest.fail(f"the daemon did not start: {daemon.stderr.read()}")
        reader = threading.Thread(target=lambda: lines.extend(daemon.stdout or ()), daemon=True)
        reader.start()
        threading.Thread(target=lambda: errors.extend(daemon.stderr or ()), daemon=True).start()
        q = dns.message.make_query("web.default.svc.cluster.local", "A")
        assert dns.query.udp(q, host, port=port, timeout=3).answer  # the normal path

        frames = tmp_path / "kproxy" / "dns" / "frames.py"
        text = frames.read_text()
        new = PROTOCOL + 1000
        frames.write_text(re.sub(r"^PROTOCOL = \d+", f"PROTOCOL = {new}", text, flags=re.M))
        shutil.rmtree(frames.parent / "__pycache__", ignore_errors=True)  # stale bytecode
        os.kill(pid, signal.SIGKILL)
        time.sleep(5.0)

        mismatches = [ln for ln in lines if "refuses to serve" in ln]
        assert mismatches, "".join(lines)
        assert f"protocol {new}, this running daemon {PROTOCOL}" in mismatches[0]
        assert "restart kproxy" in mismatches[0]
        # restarts after 1, 2, 4 s...: at most 3 attempts in 5 s, not a tight loop
        assert 1 <= len(mismatches) <= 3, "".join(lines)
        worker_lines = [ln for ln in errors if "dns-worker" in ln and "ERROR" in ln]
        assert worker_lines and f"this worker {new}" in worker_lines[0]
        # a refusing worker never serves the old daemon's model: no answer, no wrong answer
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(q, host, port=port, timeout=1)
    finally:
        if daemon.stdin is not None:
            daemon.stdin.close()
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
