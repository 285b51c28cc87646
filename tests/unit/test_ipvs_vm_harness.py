"""The VM harness's pure parts: the ipvsadm listing parser (on text a real ipvsadm printed in the
VM) and the guest script (run here, in a throwaway namespace, in place of the guest)."""

from __future__ import annotations

import ast
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.vm import ipvsadm as ipvsadm_oracle
from tests.vm.ipvsadm import ListedDest, ListedService, parse_list, parse_stats, restore_text
from tests.vm.run_in_vm import guest_script, vng_argv

# Printed by ipvsadm v1.31 in the VM after the `-R` input further down.
LISTING = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.0.0.1:80 rr
  -> 10.1.0.1:8080                Masq    3      0          0
  -> 10.1.0.2:8080                Masq    0      2          1
TCP  10.0.0.4:81 lblcr persistent 100 mask 255.255.255.0
  -> 10.1.0.9:81                  Route   1      0          0
UDP  10.0.0.2:53 sh (sh-fallback,sh-port) persistent 300
  -> 10.1.0.3:5353                Masq    1      0          0
TCP  [fd00::1]:443 mh (mh-port) persistent 60 mask 64
  -> [fd00:1::5]:8443             Masq    1      0          0
"""

PERSISTENT_LISTING = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port            Weight    PersistConn ActiveConn InActConn
  -> RemoteAddress:Port
TCP  10.0.0.1:80 rr
  -> 10.1.0.1:8080                3         0           0          0
  -> 10.1.0.2:8080                0         4           2          1
"""

STATS = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes
  -> RemoteAddress:Port
TCP  10.0.0.1:80                         3       18       12     1090      794
  -> 10.1.0.1:8080                       3       18       12     1090      794
"""


def listed(protocol: str, address: str, port: int, scheduler: str, *dests: ListedDest, **kw: Any):
    svc = ListedService(protocol, address, port, scheduler, **kw)
    svc.dests = {(d.address, d.port): d for d in dests}
    return svc


TABLE = [
    listed(
        "TCP",
        "10.0.0.1",
        80,
        "rr",
        ListedDest("10.1.0.1", 8080, 3, "masq"),
        ListedDest("10.1.0.2", 8080, 0, "masq", active=2, inactive=1),
    ),
    listed(
        "TCP",
        "10.0.0.4",
        81,
        "lblcr",
        ListedDest("10.1.0.9", 81, 1, "route"),
        persistent=100,
        mask="255.255.255.0",
    ),
    listed(
        "UDP",
        "10.0.0.2",
        53,
        "sh",
        ListedDest("10.1.0.3", 5353, 1, "masq"),
        sched_flags=("sh-fallback", "sh-port"),
        persistent=300,
    ),
    listed(
        "TCP",
        "fd00::1",
        443,
        "mh",
        ListedDest("fd00:1::5", 8443, 1, "masq"),
        sched_flags=("mh-port",),
        persistent=60,
        mask="64",
    ),
]


def test_listing_parses_to_what_was_programmed() -> None:
    assert parse_list(LISTING) == {svc.key: svc for svc in TABLE}


def test_a_firewall_mark_service_is_listed_by_its_mark() -> None:
    fwm = LISTING + "FWM  7 rr\n  -> 10.244.9.9:0                 Masq    1      0          0\n"
    assert parse_list(fwm)[("", "FWM", 7)] == listed(
        "FWM", "", 7, "rr", ListedDest("10.244.9.9", 0, 1, "masq")
    )


def test_persistent_conn_and_stats_listings() -> None:
    dest = parse_list(PERSISTENT_LISTING)[("10.0.0.1", "TCP", 80)].dests[("10.1.0.2", 8080)]
    assert (dest.weight, dest.persist, dest.active, dest.inactive) == (0, 4, 2, 1)
    svc, dests = parse_stats(STATS)[("10.0.0.1", "TCP", 80)]
    assert (svc.conns, svc.inpkts, svc.outbytes) == (3, 18, 794)
    assert dests[("10.1.0.1", 8080)].inbytes == 1090


@pytest.mark.parametrize(
    "line",
    [
        "TCP  10.0.0.1:80 rr quiescent",  # an option the reader does not know
        "TCP  10.0.0.1:80:1 rr",  # not an address:port
        "  -> 10.1.0.1:8080                Masq    3      0",  # a column short
        "XYZ  10.0.0.1:80 rr",
    ],
)
def test_a_line_the_reader_does_not_understand_is_refused(line: str) -> None:
    lines = LISTING.splitlines()
    with pytest.raises(ValueError):
        parse_list("\n".join([*lines[:4], line, *lines[4:]]))


def test_restore_text_is_what_ipvsadm_saves() -> None:
    # `ipvsadm -Sn` printed exactly these lines for the table above
    saved = """\
-A -t 10.0.0.1:80 -s rr
-a -t 10.0.0.1:80 -r 10.1.0.1:8080 -m -w 3
-a -t 10.0.0.1:80 -r 10.1.0.2:8080 -m -w 0
-A -t 10.0.0.4:81 -s lblcr -p 100 -M 255.255.255.0
-a -t 10.0.0.4:81 -r 10.1.0.9:81 -g -w 1
-A -u 10.0.0.2:53 -s sh -p 300 -b sh-fallback,sh-port
-a -u 10.0.0.2:53 -r 10.1.0.3:5353 -m -w 1
-A -t [fd00::1]:443 -s mh -p 60 -M 64 -b mh-port
-a -t [fd00::1]:443 -r [fd00:1::5]:8443 -m -w 1
"""
    assert restore_text(TABLE) == saved


def test_the_oracle_imports_nothing_from_kproxy() -> None:
    """The VM tests check kproxy's IPVS programming with this reader: sharing kproxy's listing
    parser (kproxy.inspect.ipvsadm) would let one mistake hide in both."""
    tree = ast.parse(Path(ipvsadm_oracle.__file__).read_text())
    imported = {
        name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
    }
    assert imported and not {m for m in imported if m.split(".")[0] in ("kproxy", "tests")}


def test_vng_command_line() -> None:
    argv = vng_argv(Path("/k/vmlinuz"), Path("/r"), memory="2G", cpus=2)
    assert argv[:4] == ["vng", "--disable-kvm", "--disable-microvm", "--verbose"]
    assert argv[argv.index("-r") + 1] == "/k/vmlinuz"
    assert argv[argv.index("--rwdir") + 1] == "/r"
    assert argv[-2:] == ["--", "sh /r/guest.sh"]


@pytest.mark.parametrize("status", [0, 3])
def test_guest_script_reports_the_command_status_in_a_file(tmp_path: Path, status: int) -> None:
    """Run the guest script here (in a throwaway network namespace, as its sysctl is per
    namespace) instead of in the VM: the exit-code file must carry the command's status."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a throwaway namespace")
    ns = f"kpgs{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True, check=False).returncode:
        pytest.skip("cannot create a network namespace here")
    try:
        script = tmp_path / "guest.sh"
        command = f'echo "in $PWD as $KPROXY_IN_VM"; exit {status}'
        script.write_text(guest_script(command, tmp_path, modules=()))  # no modules on the host
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, "sh", str(script)], capture_output=True, check=False
        )
        assert proc.returncode == 0  # the guest script itself always ends well
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    assert (tmp_path / "exit-code").read_text().strip() == str(status)
    repo = Path(__file__).resolve().parents[2]
    assert (tmp_path / "output.log").read_text().strip() == f"in {repo} as 1"
    assert f"command exited {status}" in (tmp_path / "guest.log").read_text()
