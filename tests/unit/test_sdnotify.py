"""sd_notify against real AF_UNIX datagram listeners, the way systemd receives it: path sockets,
abstract sockets, sender credentials (what NotifyAccess=main checks), and the no-op case."""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy.runtime.sdnotify import Notifier


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(2.0)

    def receive(self) -> tuple[dict[str, str], int]:
        """One message as a field dict, plus the sender's PID from SCM_CREDENTIALS."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", payload[:12])
        lines = data.decode().split("\n")
        fields = dict(line.split("=", 1) for line in lines)
        assert len(fields) == len(lines), f"duplicate or malformed fields in {data!r}"
        return fields, pid

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(2.0)
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[tuple[Listener, str]]:
    path = str(tmp_path / "notify.sock")
    listener = Listener(path)
    yield listener, path
    listener.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[Listener, str]]:
    name = f"kproxy-test-notify-{uuid.uuid4().hex[:12]}"
    listener = Listener(b"\0" + name.encode())
    yield listener, "@" + name
    listener.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_messages_reach_the_listener_with_our_credentials(
    kind: str,
    path_listener: tuple[Listener, str],
    abstract_listener: tuple[Listener, str],
) -> None:
    listener, address = path_listener if kind == "path" else abstract_listener
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.enabled
        assert notifier.ready(status="synced 3 services")
        fields, pid = listener.receive()
        assert fields == {"READY": "1", "STATUS": "synced 3 services"}
        assert pid == os.getpid()

        assert notifier.watchdog()
        assert listener.receive()[0] == {"WATCHDOG": "1"}

        assert notifier.status("syncing")
        assert listener.receive()[0] == {"STATUS": "syncing"}

        assert notifier.stopping()
        assert listener.receive()[0] == {"STOPPING": "1"}


def test_status_stays_one_field(path_listener: tuple[Listener, str]) -> None:
    listener, address = path_listener
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        notifier.status("first line\nREADY=1")
        fields, _ = listener.receive()
    # A newline in the text must not smuggle a READY=1 to systemd.
    assert set(fields) == {"STATUS"}
    assert "first line" in fields["STATUS"]


def test_extend_timeout_and_reloading(path_listener: tuple[Listener, str]) -> None:
    listener, address = path_listener
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        notifier.extend_timeout(1.5)
        assert listener.receive()[0] == {"EXTEND_TIMEOUT_USEC": "1500000"}
        notifier.reloading()
        fields, _ = listener.receive()
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) > 0


def test_without_notify_socket_everything_is_a_noop(path_listener: tuple[Listener, str]) -> None:
    listener, _ = path_listener
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert notifier.watchdog_interval() is None
    assert not listener.pending()


def test_reads_the_process_environment(
    path_listener: tuple[Listener, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, address = path_listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with Notifier() as notifier:
        assert notifier.watchdog_interval() == pytest.approx(15.0)
        assert notifier.watchdog()
    assert listener.receive()[0] == {"WATCHDOG": "1"}


def test_vanished_listener_is_reported_not_raised(tmp_path: Path) -> None:
    path = str(tmp_path / "gone.sock")
    listener = Listener(path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready()
    listener.close()
    os.unlink(path)
    assert not notifier.watchdog()
    # A new listener at the same path (systemd re-executed) is picked up again.
    again = Listener(path)
    try:
        assert notifier.watchdog()
        assert again.receive()[0] == {"WATCHDOG": "1"}
    finally:
        notifier.close()
        again.close()


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        pytest.param({"WATCHDOG_USEC": "30000000"}, 42, 15.0, id="no-pid"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42, 15.0, id="our-pid"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42, None, id="other-pid"),
        pytest.param({"WATCHDOG_USEC": "0"}, 42, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "soon"}, 42, None, id="malformed"),
        pytest.param({}, 42, None, id="unset"),
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int, expected: float | None) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/run/unused", **env}, pid=pid)
    if expected is None:
        assert notifier.watchdog_interval() is None
        assert notifier.watchdog_timeout() is None
    else:
        assert notifier.watchdog_interval() == pytest.approx(expected)
        assert notifier.watchdog_timeout() == pytest.approx(expected * 2)


def test_unsupported_socket_kind_disables_notifications() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
