"""Framing between the daemon and its DNS worker processes: length-prefixed pickles.

Only ever used on the pipe between a `DNSService` and the worker processes it started itself.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, BinaryIO

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
