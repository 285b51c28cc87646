"""Giving freed heap memory back to the kernel after the big, short-lived allocations.

A full sync at 10k services renders tens of megabytes of rule text that is written and dropped
at once; the DNS worker builds a new index beside the old one. CPython frees those objects, but
glibc's malloc keeps the pages (and one arena per thread that allocated): the process's RSS stays
at its peak. `trim()` asks glibc to return every free page (malloc_trim(0)), and `limit_arenas()`
caps the per-thread arenas (mallopt M_ARENA_MAX), which kproxy's few threads do not need for
speed. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("kproxy")

M_ARENA_MAX = -8
_libc: ctypes.CDLL | None = None
_loaded = False


def _glibc() -> ctypes.CDLL | None:
    global _libc, _loaded
    if not _loaded:
        _loaded = True
        try:
            lib = ctypes.CDLL("libc.so.6")  # glibc's soname (find_library would run ldconfig)
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _libc = lib
        except (OSError, AttributeError):
            _libc = None
    return _libc


def trim() -> bool:
    """Return free heap pages to the kernel; True when something was released."""
    lib = _glibc()
    return bool(lib.malloc_trim(0)) if lib is not None else False


def limit_arenas(count: int = 2) -> bool:
    """At most `count` malloc arenas (call before starting threads); True when set."""
    lib = _glibc()
    return bool(lib.mallopt(M_ARENA_MAX, count)) if lib is not None else False
