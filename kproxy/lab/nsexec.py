"""How to run a command inside a named network namespace, and how to run this package's own
helper programs (servers, probes) there quickly.

Owns the argv conventions only; it starts nothing itself. Helper programs run with
``python -S`` (no site import: ~20 ms instead of ~65 ms per start on the lab machines) and a
PYTHONPATH pointing at the directory that holds the ``kproxy`` package, so they work both from a
checkout and from an installed package, in any working directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

IP = "ip"

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` run inside network namespace `ns` (or in the current one when `ns` is None)."""
    if ns is None:
        return list(argv)
    return [IP, "netns", "exec", ns, *argv]


def module_argv(module: str, *args: str) -> list[str]:
    """argv that runs `python -m module args...` with the current interpreter (site-packages
    included: right for kproxy itself)."""
    return [sys.executable, "-m", module, *args]


def helper_argv(module: str, *args: str) -> list[str]:
    """argv for this package's standard-library-only helpers (servers, probe): `python -S`,
    which skips site-packages and starts ~3x faster."""
    return [sys.executable, "-S", "-m", module, *args]


def helper_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for helper programs: the caller's, plus PYTHONPATH reaching ``kproxy``."""
    env = dict(os.environ)
    paths = [_PACKAGE_ROOT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env
