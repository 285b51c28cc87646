"""Framing between the daemon and its DNS worker processes: length-prefixed pickles.

Only ever used on the pipe between a `DNSService` and the worker processes it started itself.

`PROTOCOL` versions everything on that pipe: the frames and the pickled classes inside them
(`ModelDelta`, `DnsService`, `DnsSlice`, `DnsPort`, `DNSOptions`: their fields and what their
bytes mean) and the worker's JSON events. Bump it with any such change
(tests/unit/test_dns_protocol_shape.py fails on a changed field until it is bumped). The daemon
passes its own on the worker's command line; a worker that speaks another one (kproxy
upgraded in place while the daemon runs, and the daemon restarting a worker from the new
files) exits with `EXIT_PROTOCOL` instead of misreading the model.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, BinaryIO

PROTOCOL = 2  # 1: no version yet (kproxy before the --protocol argument)
EXIT_PROTOCOL = 3  # the worker's exit status for a protocol mismatch

_LEN = struct.Struct("!I")


def write_frame(stream: BinaryIO, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: BinaryIO) -> Any:
    """The next frame's object, or None at end of stream."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = _LEN.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)
