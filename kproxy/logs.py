"""Process-wide logging set-up: structured lines on stderr, for journald or a terminal.

kproxy code logs through the standard `logging` module and passes structured fields with
`extra=`: `log.info("sync done", extra={"duration_ms": 12.5, "changed": 3})`. This module owns
how those records look:

- text (default): `2024-05-01T10:00:00.123Z INFO kproxy.runtime.sync sync done duration_ms=12.5
  changed=3`. Values with spaces, quotes or `=` are double-quoted, so every line splits cleanly
  into key=value pairs. When stderr is the journal (systemd sets `JOURNAL_STREAM` to its
  device:inode) the timestamp is left out: journald stamps every line itself.
- json: one object per line with `ts`, `level`, `logger`, `msg`, the extra fields, and `exc`
  for a traceback.

Verbosity follows kube-proxy's `-v` spirit: 0 and 1 log kproxy's INFO and up, 2 and above add
DEBUG (kube-proxy's usual `-v=2` therefore shows one line per sync and per change). Third-party
libraries (the kubernetes client, urllib3, pyroute2) stay at WARNING until `-v=5`, where their
DEBUG output is what one is after.

`extra` keys must not collide with LogRecord attributes (`name`, `msg`, `args`, `message`, ...);
the logging module itself rejects `message` and `asctime`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

# Third-party loggers: chatty at DEBUG, and nothing a kproxy operator needs below -v=5.
_LIBRARY_LOGGERS = ("kubernetes", "urllib3", "pyroute2", "dnslib", "iptc", "asyncio")
_LIBRARY_DEBUG_VERBOSITY = 5

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


def level_for(verbosity: int) -> int:
    """The level of kproxy's own loggers for a `-v` value."""
    return logging.DEBUG if verbosity >= 2 else logging.INFO


def setup_logging(
    *,
    verbosity: int,
    fmt: LogFormat,
    stream: TextIO | None = None,
    timestamps: bool | None = None,
) -> logging.Handler:
    """Route all logging to `stream` (default: stderr) in `fmt`, replacing an earlier set-up.

    `timestamps=None` decides from the environment: off when the stream is the journal.
    Returns the installed handler.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (expected 'text' or 'json')")
    out = sys.stderr if stream is None else stream
    if timestamps is None:
        timestamps = not _is_journal(out)

    handler = logging.StreamHandler(out)
    formatter: logging.Formatter = (
        JsonFormatter() if fmt == "json" else TextFormatter(timestamps=timestamps)
    )
    handler.setFormatter(formatter)
    handler.set_name("kproxy")

    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "kproxy":
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= _LIBRARY_DEBUG_VERBOSITY else logging.WARNING)
    logging.getLogger("kproxy").setLevel(level_for(verbosity))
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.DEBUG if verbosity >= _LIBRARY_DEBUG_VERBOSITY else logging.WARNING
        )
    logging.captureWarnings(True)
    return handler


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a caller attached with `extra=`, in insertion order."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}


class TextFormatter(logging.Formatter):
    """`time level logger message key=value ...`, with the traceback on the following lines."""

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__()
        self._timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self._timestamps:
            parts.append(_rfc3339(record.created))
        parts += [record.levelname, record.name, record.getMessage()]
        parts += [f"{key}={_text_value(value)}" for key, value in extra_fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            # Structured fields never overwrite the four fixed keys.
            obj[key if key not in obj else f"extra_{key}"] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


def _rfc3339(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple, set, frozenset)):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    if text == "" or any(c.isspace() or c in '"=\\' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journald connection systemd set up (JOURNAL_STREAM=dev:ino)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"
