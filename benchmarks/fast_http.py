#!/usr/bin/env python3
"""A small, fast HTTP/1.x server for benchmarks: one epoll loop, a fixed 200 reply per request.

The lab's servers (kproxy.lab.servers) start a thread per connection, which caps a pod at about
2,000 new connections per second on this machine: too slow to measure a proxy against. This one
answers every request on a connection (keep-alive, or `Connection: close` from the client, which
it honours) with ``name=<NAME>`` and closes when the client asks, at well over 10,000 new
connections per second on one core.

    python3 benchmarks/fast_http.py --name web-0 --port 80

Prints READY once listening. Standard library only.
"""

from __future__ import annotations

import argparse
import select
import socket
import sys


def serve(name: str, port: int) -> None:
    body = f"name={name}\n".encode()
    keep = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    close = keep.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(4096)
    lsock.setblocking(False)
    ep = select.epoll()
    lfd = lsock.fileno()
    ep.register(lfd, select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    print("READY", flush=True)
    while True:
        for fd, _ev in ep.poll(-1, 512):
            if fd == lfd:
                for _ in range(128):
                    try:
                        c, _addr = lsock.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    conns[c.fileno()] = (c, bytearray())
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            c, buf = conns[fd]
            try:
                data = c.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                del conns[fd]
                c.close()
                continue
            buf += data
            done = False
            while b"\r\n\r\n" in buf:
                head, _, rest = bytes(buf).partition(b"\r\n\r\n")
                buf[:] = rest
                closing = b"connection: close" in head.lower() or head.startswith(b"GET / HTTP/1.0")
                try:
                    c.send(close if closing else keep)
                except OSError:
                    closing = True
                if closing:
                    done = True
                    break
            if done:
                ep.unregister(fd)
                del conns[fd]
                c.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="server")
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args()
    try:
        serve(args.name, args.port)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
