"""The client half of :mod:`kproxy.lab.traffic`: runs inside a namespace, makes the requests and
prints JSON.

Invoked as ``python3 -S -m kproxy.lab.probe '<json spec>'``; the spec's "op" is one of
``http`` (N requests, a new connection each), ``http_many`` (one request to each target),
``udp`` (N queries from one socket), ``wait`` (retry
HTTP until one succeeds), ``stream`` (a request every `interval` until `duration` or SIGINT) and
``hold`` (one keep-alive HTTP connection exchanging a request every `interval`). ``stream`` and
``hold`` print ``STARTED`` first. Standard library only and few imports: it starts in ~25 ms.

Failures are sorted into kinds: refused (RST or ICMP port unreachable: REJECT / no listener),
timeout (no answer: DROP), unreachable (ICMP host/net unreachable or no route), reset, denied
(EPERM: a local OUTPUT rule), closed (connection closed before a reply), http (non-200),
bind (source address/port unusable), or error:<ERRNO>.
"""

from __future__ import annotations

import errno
import json
import signal
import socket
import sys
import time
from typing import Any


class Stopped(Exception):
    """SIGINT/SIGTERM asked a stream or hold to finish and report."""


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "unreachable"
        if exc.errno in (errno.EPERM, errno.EACCES):
            return "denied"
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            return "bind"
        if exc.errno == errno.ETIMEDOUT:
            return "timeout"
        return "error:" + errno.errorcode.get(exc.errno, str(exc.errno))
    return "error:" + type(exc).__name__


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _host(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _socket(spec: dict[str, Any], kind: int) -> socket.socket:
    sock = socket.socket(_family(spec["ip"]), kind)
    if spec.get("src_ip") or spec.get("src_port"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.get("src_ip") or "", int(spec.get("src_port") or 0)))
    return sock


def _read_response(sock: socket.socket, deadline: float) -> tuple[int, str]:
    """Read one HTTP response (Content-Length framed, or until EOF)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = int(value)
    while length is None or len(body) < length:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            if length is None:
                break
            raise EOFError
        body += chunk
    return status, body.decode(errors="replace")


def _outcome(ok: bool, kind: str | None, body: str, error: str, started: float) -> dict[str, Any]:
    return {
        "ok": ok,
        "kind": kind,
        "body": body,
        "error": error,
        "elapsed": round(time.monotonic() - started, 6),
        "t": round(started, 6),
    }


def http_once(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + float(spec.get("timeout", 1.0))
    try:
        sock = _socket(spec, socket.SOCK_STREAM)
    except OSError as exc:
        return _outcome(False, classify(exc), "", str(exc), started)
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect((spec["ip"], int(spec["port"])))
        request = (
            f"GET {spec.get('path', '/')} HTTP/1.1\r\nHost: {_host(spec['ip'], spec['port'])}\r\n"
            "Connection: close\r\n\r\n"
        )
        sock.sendall(request.encode())
        status, body = _read_response(sock, deadline)
    except EOFError:
        return _outcome(False, "closed", "", "connection closed before a reply", started)
    except (OSError, ValueError, IndexError) as exc:
        return _outcome(False, classify(exc), "", str(exc), started)
    finally:
        sock.close()
    if status != 200:
        return _outcome(False, "http", body, f"HTTP {status}", started)
    return _outcome(True, None, body, "", started)


def op_http(spec: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    interval = float(spec.get("interval", 0.0))
    for i in range(int(spec.get("n", 1))):
        if i and interval:
            time.sleep(interval)
        results.append(http_once(spec))
    return results


def op_http_many(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [http_once({**spec, "ip": ip, "port": port}) for ip, port in spec["targets"]]


def op_udp(spec: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    timeout = float(spec.get("timeout", 1.0))
    interval = float(spec.get("interval", 0.0))
    payload = str(spec.get("payload", "ping")).encode()
    try:
        sock = _socket(spec, socket.SOCK_DGRAM)
        sock.connect((spec["ip"], int(spec["port"])))
    except OSError as exc:
        return [_outcome(False, classify(exc), "", str(exc), time.monotonic())]
    with sock:
        for i in range(int(spec.get("n", 1))):
            if i and interval:
                time.sleep(interval)
            started = time.monotonic()
            try:
                sock.settimeout(timeout)
                sock.send(payload)
                data = sock.recv(65535)
                results.append(_outcome(True, None, data.decode(errors="replace"), "", started))
            except OSError as exc:
                results.append(_outcome(False, classify(exc), "", str(exc), started))
    return results


def op_wait(spec: dict[str, Any]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + float(spec.get("deadline", 5.0))
    want = spec.get("expect")
    while True:
        result = http_once(spec)
        good = result["ok"] and (want is None or want in result["body"])
        if good or time.monotonic() >= deadline:
            return [result]
        time.sleep(float(spec.get("interval", 0.02)))


def _install_stop() -> None:
    def handler(signum: int, frame: object) -> None:
        raise Stopped

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _started() -> None:
    sys.stdout.write("STARTED\n")
    sys.stdout.flush()


def op_stream(spec: dict[str, Any]) -> dict[str, Any]:
    """A request every `interval` s (new connection each; UDP: new socket each)."""
    interval = float(spec.get("interval", 0.02))
    duration = float(spec.get("duration") or 600.0)
    once = op_udp if spec.get("proto") == "udp" else None
    results: list[dict[str, Any]] = []
    _install_stop()
    _started()
    start = time.monotonic()
    next_at = start
    try:
        while time.monotonic() - start < duration:
            results.append(once(spec)[0] if once else http_once(spec))
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    except Stopped:
        pass
    return {"results": results, "duration": time.monotonic() - start}


def op_hold(spec: dict[str, Any]) -> dict[str, Any]:
    """One HTTP/1.1 keep-alive connection, a request every `interval` s, until the first
    failure, `duration` or SIGINT."""
    interval = float(spec.get("interval", 0.1))
    duration = float(spec.get("duration") or 600.0)
    timeout = float(spec.get("timeout", 1.0))
    exchanges: list[dict[str, Any]] = []
    _install_stop()
    start = time.monotonic()
    error: dict[str, Any] | None = None
    local: tuple[str, int] = ("", 0)
    announced = False
    sock = _socket(spec, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((spec["ip"], int(spec["port"])))
        local = sock.getsockname()[:2]
        _started()
        announced = True
        host = _host(spec["ip"], spec["port"])
        request = f"GET {spec.get('path', '/')} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        while time.monotonic() - start < duration:
            t0 = time.monotonic()
            sock.sendall(request)
            status, body = _read_response(sock, t0 + timeout)
            if status != 200:
                raise ValueError(f"HTTP {status}")
            exchanges.append(_outcome(True, None, body, "", t0))
            time.sleep(interval)
    except Stopped:
        pass
    except EOFError:
        error = {"kind": "closed", "error": "connection closed"}
    except (OSError, ValueError, IndexError) as exc:
        error = {"kind": classify(exc), "error": str(exc)}
    finally:
        sock.close()
    if not announced:
        _started()
    return {
        "exchanges": exchanges,
        "error": error,
        "local": [local[0], local[1]],
        "duration": time.monotonic() - start,
    }


OPS: dict[str, Any] = {
    "http": op_http,
    "http_many": op_http_many,
    "udp": op_udp,
    "wait": op_wait,
    "stream": op_stream,
    "hold": op_hold,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = OPS[spec["op"]](spec)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
