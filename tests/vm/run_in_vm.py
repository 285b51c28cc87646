"""Boot Debian's kernel under qemu (virtme-ng) with this machine's root filesystem and run one
command inside it: by default the `vm` test tier (`pytest tests/vm -m vm`).

The development kernel has no IPVS and no dummy interfaces; Debian's kernel has both as modules.
`.ci/vm-setup.sh` installs qemu and virtme-ng and unpacks that kernel; this runner boots it:

    vng --disable-kvm --disable-microvm --verbose -r VMLINUZ --rwdir RESULTS -- sh RESULTS/guest.sh

The guest sees the host's filesystem read-only (writable overlays on /etc, /usr, /var, /tmp...)
and RESULTS read-write. guest.sh loads the IPVS, dummy and netfilter modules, runs the command with
the host's Python, and writes its exit status to RESULTS/exit-code, because the guest's exit
status does not reach the host (vng exits 0 or 255 whatever the command did). The command's output
goes to RESULTS/output.log, the console (kernel and init messages) to RESULTS/console.log.

KVM is present on the lab machines but hangs under nesting, so the guest runs under TCG (software
emulation): boot takes 15-45 s, and code inside runs several times slower than on the host.

Usage:
    python3 tests/vm/run_in_vm.py [--results DIR] [--kernel VMLINUZ] [-- COMMAND...]
Exit status: the command's, or 124 on timeout, 125 when the guest never reported one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KPROXY_VM_CACHE", "/var/lib/kproxy-vm"))
IN_VM_ENV = "KPROXY_IN_VM"

MODULES = (
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_sh",
    "ip_vs_dh",
    "ip_vs_sed",
    "ip_vs_nq",
    "ip_vs_mh",
    "ip_vs_lblc",
    "ip_vs_lblcr",
    "ip_vs_ftp",
    "dummy",
    "veth",
    "bridge",
    "br_netfilter",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "iptable_nat",
    "iptable_filter",
    "iptable_mangle",
    "iptable_raw",
    "ip6table_nat",
    "ip6table_filter",
    "ip6table_mangle",
    "ip6table_raw",
    "nft_compat",
    "nft_chain_nat",
    "nf_tables",
    # the nftables mode's expressions (the kernel would also load them on first use)
    "nft_nat",
    "nft_numgen",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "nft_masq",
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    "nft_ct",
    "ip_set",
    "ip_set_hash_ip",
    "ip_set_hash_ipport",
    "ip_set_hash_ipportip",
    "ip_set_hash_ipportnet",
    "ip_set_hash_net",
    "ip_set_bitmap_port",
    "xt_set",
    "xt_comment",
    "xt_mark",
    "xt_conntrack",
    "xt_statistic",
    "xt_recent",
    "xt_addrtype",
    "xt_multiport",
    "xt_MASQUERADE",
    "xt_nat",
    "xt_REDIRECT",
    "xt_ipvs",
    "xt_physdev",
    "xt_socket",
    "xt_tcpudp",
    "ipt_REJECT",
    "ip6t_REJECT",
    "nf_reject_ipv4",
    "nf_reject_ipv6",
    "sch_netem",
)

DEFAULT_COMMAND = (
    "{python} -m pytest tests/vm -m vm -p no:cacheprovider -q --junitxml={results}/junit.xml"
)


def find_kernel() -> Path | None:
    """The vmlinuz `.ci/vm-setup.sh` prepared ($KPROXY_VM_KERNEL overrides)."""
    explicit = os.environ.get("KPROXY_VM_KERNEL")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    marker = CACHE / "current-vmlinuz"
    if marker.is_file():
        path = Path(marker.read_text().strip())
        if path.is_file():
            return path
    found = sorted(CACHE.glob("linux-image-*/boot/vmlinuz-*"))
    return found[-1] if found else None


def missing_tools() -> list[str]:
    """The host programs a VM run needs that are not installed."""
    return [t for t in ("vng", "qemu-system-x86_64") if shutil.which(t) is None]


def guest_script(command: str, results: Path, *, modules: Sequence[str] = MODULES) -> str:
    """The shell script the guest runs: modules, environment, the command, its exit status."""
    load = f'modprobe -a {" ".join(modules)} 2>>"$R/guest.log"' if modules else ":"
    python = os.path.realpath(sys.executable)
    path = os.pathsep.join(
        dict.fromkeys(
            [
                os.path.dirname(python),
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
        )
    )
    q = shlex.quote
    return f"""#!/bin/sh
# Written by tests/vm/run_in_vm.py; runs inside the guest.
R={q(str(results))}
export PATH={q(path)} HOME=/root {IN_VM_ENV}=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PYTHONPATH={q(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}
cd {q(str(REPO))} || {{ echo 125 > "$R/exit-code"; exit 0; }}
echo "guest: $(uname -r) up $(cut -d' ' -f1 /proc/uptime)s" > "$R/guest.log"
# one modprobe for all (each process start is slow under emulation); it goes on past a missing one
{load}
sysctl -qw net.ipv4.ip_forward=1 >/dev/null 2>&1
echo "guest: modules loaded at $(cut -d' ' -f1 /proc/uptime)s" >> "$R/guest.log"
( {command} ) > "$R/output.log" 2>&1 < /dev/null
rc=$?
echo "guest: command exited $rc at $(cut -d' ' -f1 /proc/uptime)s" >> "$R/guest.log"
echo "$rc" > "$R/exit-code"
sync
"""


def vng_argv(
    kernel: Path, results: Path, *, memory: str, cpus: int, extra: Sequence[str] = ()
) -> list[str]:
    return [
        "vng",
        "--disable-kvm",
        "--disable-microvm",
        "--verbose",
        "--memory",
        memory,
        "--cpus",
        str(cpus),
        "-r",
        str(kernel),
        "--rwdir",
        str(results),
        *extra,
        "--",
        f"sh {shlex.quote(str(results / 'guest.sh'))}",
    ]


def run(
    command: str,
    *,
    results: Path,
    kernel: Path,
    memory: str = "2G",
    cpus: int = 2,
    timeout: float = 900.0,
) -> int:
    """Boot the VM, run `command` in the repository root inside it, return its exit status."""
    results.mkdir(parents=True, exist_ok=True)
    for stale in ("exit-code", "output.log", "guest.log", "junit.xml"):
        (results / stale).unlink(missing_ok=True)
    (results / "guest.sh").write_text(guest_script(command, results))
    argv = vng_argv(kernel, results, memory=memory, cpus=cpus)
    started = time.monotonic()
    with open(results / "console.log", "wb") as console:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"run_in_vm: timed out after {timeout:.0f} s", file=sys.stderr)
            return 124
    elapsed = time.monotonic() - started
    (results / "elapsed").write_text(f"{elapsed:.1f}\n")
    code_file = results / "exit-code"
    if not code_file.is_file():
        tail = (results / "console.log").read_text(errors="replace").splitlines()[-40:]
        print("run_in_vm: the guest reported no exit code; console tail:", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
        return 125
    return int(code_file.read_text().strip() or "125")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="host folder the guest writes (default: temp)")
    parser.add_argument("--kernel", type=Path, help="vmlinuz to boot (default: vm-setup's)")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command (after --)")
    args = parser.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"run_in_vm: missing {', '.join(missing)} (run .ci/vm-setup.sh)", file=sys.stderr)
        return 2
    kernel = args.kernel or find_kernel()
    if kernel is None:
        print("run_in_vm: no kernel prepared (run .ci/vm-setup.sh)", file=sys.stderr)
        return 2
    results = args.results or Path(tempfile.mkdtemp(prefix="kproxy-vm-"))
    results = results.resolve()
    python = os.path.realpath(sys.executable)
    words = [w for w in args.command if w != "--"] if args.command else []
    if words:  # {python} and {results} may stand in the command's words
        words = [w.replace("{python}", python).replace("{results}", str(results)) for w in words]
        command = shlex.join(words)
    else:
        command = DEFAULT_COMMAND.format(
            python=shlex.quote(python), results=shlex.quote(str(results))
        )
    started = time.monotonic()
    rc = run(
        command,
        results=results,
        kernel=kernel,
        memory=args.memory,
        cpus=args.cpus,
        timeout=args.timeout,
    )
    output = results / "output.log"
    if output.is_file():
        sys.stdout.write(output.read_text(errors="replace"))
    guest_log = results / "guest.log"
    if guest_log.is_file():
        sys.stderr.write(guest_log.read_text(errors="replace"))
    print(
        f"run_in_vm: exit {rc} after {time.monotonic() - started:.1f} s; results in {results}",
        file=sys.stderr,
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
