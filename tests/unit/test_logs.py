"""Log lines as an operator reads them: text key=value lines, JSON lines, -v levels, journald."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy.logs import setup_logging

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("kproxy", "kubernetes", "urllib3", "pyroute2", "dnslib", "iptc", "asyncio")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_text_line_has_time_level_logger_message_and_fields() -> None:
    buf = io.StringIO()
    setup_logging(verbosity=0, fmt="text", stream=buf)
    logging.getLogger("kproxy.runtime.sync").info(
        "sync done",
        extra={
            "duration_ms": 12.5,
            "changed": 3,
            "reason": "endpoints changed",
            "mode": "iptables",
        },
    )
    [line] = lines(buf)
    ts, level, logger, rest = line.split(" ", 3)
    assert TIMESTAMP.match(ts)
    assert (level, logger) == ("INFO", "kproxy.runtime.sync")
    assert rest.startswith("sync done ")
    # shlex splits the tail the way a reader (or `journalctl | grep`) would.
    fields = dict(token.split("=", 1) for token in shlex.split(rest[len("sync done ") :]))
    assert fields == {
        "duration_ms": "12.5",
        "changed": "3",
        "reason": "endpoints changed",
        "mode": "iptables",
    }


def test_text_quotes_values_that_would_break_key_value_parsing() -> None:
    buf = io.StringIO()
    setup_logging(verbosity=0, fmt="text", stream=buf, timestamps=False)
    logging.getLogger("kproxy.kube").warning(
        "skipping service", extra={"service": "ns1/svc1", "why": 'bad port "x=1"', "empty": ""}
    )
    [line] = lines(buf)
    assert line.startswith("WARNING kproxy.kube skipping service ")
    tokens = shlex.split(line)[4:]
    assert dict(t.split("=", 1) for t in tokens) == {
        "service": "ns1/svc1",
        "why": 'bad port "x=1"',
        "empty": "",
    }


def test_json_is_one_object_per_record() -> None:
    buf = io.StringIO()
    setup_logging(verbosity=0, fmt="json", stream=buf)
    log = logging.getLogger("kproxy.runtime.sync")
    log.info("sync done", extra={"duration_ms": 12.5, "services": ["a/b", "c/d"]})
    log.warning("apiserver unreachable", extra={"retry_in_s": 2})
    first, second = (json.loads(line) for line in lines(buf))
    assert TIMESTAMP.match(first.pop("ts"))
    assert first == {
        "level": "INFO",
        "logger": "kproxy.runtime.sync",
        "msg": "sync done",
        "duration_ms": 12.5,
        "services": ["a/b", "c/d"],
    }
    assert second["level"] == "WARNING" and second["retry_in_s"] == 2


def test_json_keeps_a_traceback_inside_the_object() -> None:
    buf = io.StringIO()
    setup_logging(verbosity=0, fmt="json", stream=buf)
    try:
        raise RuntimeError("restore failed")
    except RuntimeError:
        logging.getLogger("kproxy.backends").exception("sync failed", extra={"attempt": 1})
    [line] = lines(buf)
    obj = json.loads(line)
    assert obj["msg"] == "sync failed" and obj["attempt"] == 1
    assert "RuntimeError: restore failed" in obj["exc"]


def test_text_traceback_follows_the_line() -> None:
    buf = io.StringIO()
    setup_logging(verbosity=0, fmt="text", stream=buf, timestamps=False)
    try:
        raise RuntimeError("restore failed")
    except RuntimeError:
        logging.getLogger("kproxy.backends").exception("sync failed")
    out = lines(buf)
    assert out[0] == "ERROR kproxy.backends sync failed"
    assert out[-1] == "RuntimeError: restore failed"


@pytest.mark.parametrize(
    ("verbosity", "debug_shown", "info_shown", "library_debug_shown"),
    [
        pytest.param(0, False, True, False, id="v0"),
        pytest.param(1, False, True, False, id="v1"),
        pytest.param(2, True, True, False, id="v2"),
        pytest.param(5, True, True, True, id="v5"),
    ],
)
def test_verbosity(
    verbosity: int, debug_shown: bool, info_shown: bool, library_debug_shown: bool
) -> None:
    buf = io.StringIO()
    setup_logging(verbosity=verbosity, fmt="text", stream=buf, timestamps=False)
    logging.getLogger("kproxy.x").debug("kproxy-debug")
    logging.getLogger("kproxy.x").info("kproxy-info")
    logging.getLogger("urllib3.connectionpool").debug("library-debug")
    logging.getLogger("urllib3.connectionpool").warning("library-warning")
    out = buf.getvalue()
    assert ("kproxy-debug" in out) is debug_shown
    assert ("kproxy-info" in out) is info_shown
    assert ("library-debug" in out) is library_debug_shown
    assert "library-warning" in out


def test_setting_up_again_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(verbosity=0, fmt="text", stream=first)
    setup_logging(verbosity=0, fmt="json", stream=second)
    logging.getLogger("kproxy").info("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["msg"] == "once"


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        setup_logging(verbosity=0, fmt="yaml", stream=io.StringIO())  # type: ignore[arg-type]


def test_no_timestamp_when_writing_to_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # systemd announces the journal connection as JOURNAL_STREAM=<st_dev>:<st_ino> of stderr;
    # a real file stands in for that stream here.
    with open(tmp_path / "journal", "w+") as journal:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging(verbosity=0, fmt="text", stream=journal)
        logging.getLogger("kproxy").info("hello", extra={"a": 1})
        journal.flush()
        other = io.StringIO()
        setup_logging(verbosity=0, fmt="text", stream=other)
        logging.getLogger("kproxy").info("hello")
    assert (tmp_path / "journal").read_text() == "INFO kproxy hello a=1\n"
    assert TIMESTAMP.match(other.getvalue().split(" ")[0])
