"""Tiny HTTP and UDP servers that say who they are and whom they saw, for lab pods.

Run inside a namespace::

    python3 -m kproxy.lab.servers --name web-0 --tcp 80 --tcp 8080 --udp 53 [--bind ADDR]

HTTP (any path; HTTP/1.1 keep-alive and HTTP/1.0 both work) answers 200 with the body
``name=<NAME> client=<ip>:<port> server=<ip>:<port>\\n``; the path ``/delay/<ms>`` answers after
that many milliseconds. UDP answers every datagram with ``name=<NAME> client=<ip>:<port>``.
Addresses are written without brackets, IPv4-mapped IPv6 addresses as plain IPv4, so
``rsplit(":", 1)`` splits them. By default every port is bound once on ``::`` accepting IPv4 too
(or on 0.0.0.0 where IPv6 is off). "READY" is printed on stdout once every socket listens.

Standard library only and no ``http.server`` import: a server starts in ~30 ms.
:func:`start_server` (host side) spawns one in a lab namespace and waits for READY.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

    from kproxy.lab.netlab import Lab, Pod

MAX_HEADER = 65536
IDLE_TIMEOUT = 300.0


def format_addr(addr: Any) -> tuple[str, int]:
    """(ip, port) from a socket address, IPv4-mapped IPv6 shown as IPv4."""
    ip, port = str(addr[0]), int(addr[1])
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[len("::ffff:") :]
    return ip, port


def _reply_text(name: str, peer: Any) -> str:
    ip, port = format_addr(peer)
    return f"name={name} client={ip}:{port}"


def _listen(bind: str, port: int, kind: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and bind == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((bind, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(1024)
    return sock


def _default_binds() -> list[str]:
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        probe.bind(("::", 0))
        probe.close()
    except OSError:
        return ["0.0.0.0"]
    return ["::"]


def _serve_tcp(sock: socket.socket, name: str) -> None:
    while True:
        conn, peer = sock.accept()
        threading.Thread(target=_handle_http, args=(conn, peer, name), daemon=True).start()


def _handle_http(conn: socket.socket, peer: Any, name: str) -> None:
    conn.settimeout(IDLE_TIMEOUT)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    local = format_addr(conn.getsockname())
    buf = b""
    with contextlib.suppress(OSError), conn:
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk or len(buf) > MAX_HEADER:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split()
            if len(parts) != 3:
                return
            method, path, version = parts
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
            }
            conn_hdr = headers.get("connection", "").lower()
            keep = conn_hdr == "keep-alive" if version == "HTTP/1.0" else conn_hdr != "close"
            if path.startswith("/delay/"):
                with contextlib.suppress(ValueError):
                    time.sleep(int(path[len("/delay/") :]) / 1000)
            body = f"{_reply_text(name, peer)} server={local[0]}:{local[1]}\n".encode()
            head_out = (
                f"{version} 200 OK\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep else 'close'}"
                "\r\n\r\n"
            ).encode()
            conn.sendall(head_out + (b"" if method == "HEAD" else body))
            if not keep:
                return


def _serve_udp(sock: socket.socket, name: str) -> None:
    while True:
        try:
            _, peer = sock.recvfrom(65535)
            sock.sendto(_reply_text(name, peer).encode(), peer)
        except OSError:
            continue


def serve(*, name: str, tcp: Sequence[int], udp: Sequence[int], binds: Sequence[str]) -> None:
    """Bind everything, print READY, serve until SIGTERM/SIGINT."""
    binds = list(binds) or _default_binds()
    workers = []
    for bind in binds:
        for port in tcp:
            workers.append((_serve_tcp, _listen(bind, port, socket.SOCK_STREAM)))
        for port in udp:
            workers.append((_serve_udp, _listen(bind, port, socket.SOCK_DGRAM)))
    for target, sock in workers:
        threading.Thread(target=target, args=(sock, name), daemon=True).start()
    sys.stdout.write(f"READY name={name} tcp={list(tcp)} udp={list(udp)} bind={binds}\n")
    sys.stdout.flush()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m kproxy.lab.servers", description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", type=int, action="append", default=[], help="HTTP port")
    parser.add_argument("--udp", type=int, action="append", default=[], help="UDP port")
    parser.add_argument("--bind", action="append", default=[], help="address (default ::)")
    args = parser.parse_args(argv)
    if not args.tcp and not args.udp:
        parser.error("give at least one --tcp or --udp port")
    serve(name=args.name, tcp=args.tcp, udp=args.udp, binds=args.bind)


# ---------------------------------------------------------------------- host side


def server_argv(
    *, name: str, tcp: Sequence[int] = (), udp: Sequence[int] = (), binds: Sequence[str] = ()
) -> list[str]:
    """argv running this server (to be run inside a namespace)."""
    from kproxy.lab.nsexec import helper_argv

    args = ["--name", name]
    args += [a for p in tcp for a in ("--tcp", str(p))]
    args += [a for p in udp for a in ("--udp", str(p))]
    args += [a for b in binds for a in ("--bind", b)]
    return helper_argv("kproxy.lab.servers", *args)


def start_server(
    lab: Lab,
    ns: str,
    *,
    name: str,
    tcp: Sequence[int] = (),
    udp: Sequence[int] = (),
    binds: Sequence[str] = (),
    timeout: float = 10.0,
) -> subprocess.Popen[bytes]:
    """Spawn a server in `ns` (killed on lab teardown) and wait until it prints READY."""
    return start_servers(lab, [(ns, name)], tcp=tcp, udp=udp, binds=binds, timeout=timeout)[0]


def start_servers(
    lab: Lab,
    targets: Sequence[tuple[str, str]],
    *,
    tcp: Sequence[int] = (),
    udp: Sequence[int] = (),
    binds: Sequence[str] = (),
    timeout: float = 10.0,
) -> list[subprocess.Popen[bytes]]:
    """Spawn one server per (namespace, name) at once and wait until each is READY."""
    import subprocess

    procs = [
        lab.spawn(
            ns,
            server_argv(name=name, tcp=tcp, udp=udp, binds=binds),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for ns, name in targets
    ]
    deadline = time.monotonic() + timeout
    for proc, (ns, name) in zip(procs, targets, strict=True):
        line = _read_line(proc, deadline)
        if not line.startswith(b"READY"):
            proc.kill()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"server {name} in {ns} did not start: {line!r} {err.strip()}")
        if proc.stderr is not None:
            proc.stderr.close()
    return procs


def serve_pods(
    lab: Lab,
    pods: Sequence[Pod] | None = None,
    *,
    tcp: Sequence[int] = (80,),
    udp: Sequence[int] = (),
    timeout: float = 10.0,
) -> dict[str, subprocess.Popen[bytes]]:
    """Start a server named after each pod (default: every pod in the lab); pod name -> process."""
    chosen = list(lab.pods if pods is None else pods)
    procs = start_servers(lab, [(p.ns, p.name) for p in chosen], tcp=tcp, udp=udp, timeout=timeout)
    return {p.name: proc for p, proc in zip(chosen, procs, strict=True)}


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf


if __name__ == "__main__":
    main()
