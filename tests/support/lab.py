"""pytest fixtures for namespace labs (see kproxy/lab/netlab.py).

Load with ``pytest_plugins = ["tests.support.lab"]`` (root conftest) or import the fixtures.

- ``lab``: 1 node, 3 pods, the client (function scope);
- ``lab2``: 2 nodes with 2 pods each, the client (function scope);
- ``lab_factory``: ``lab_factory(nodes=..., pods_per_node=..., ipv6=...)`` builds more labs, all
  torn down after the test.

The first use per session also deletes labs leaked by killed test runs (``cleanup_stale``).
All skip (not fail) when not root or when ``ip netns`` cannot create a namespace here.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kproxy.lab.netlab import Lab, cleanup_stale


@functools.cache
def netns_unavailable() -> str | None:
    """Why namespace labs cannot run here, or None when they can (checked once per session)."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    name = f"kplprobe{secrets.token_hex(3)}"
    add = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    if add.returncode != 0:
        return f"`ip netns add` failed: {add.stderr.strip()}"
    cleanup_stale()  # labs leaked by killed runs (never those of live processes)
    return None


def require_netns() -> None:
    """Skip the calling test when namespace labs cannot run here."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    require_netns()
    labs: list[Lab] = []

    def make(**kw: Any) -> Lab:
        lab = Lab.create(**kw)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.teardown()


@pytest.fixture
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    return lab_factory(nodes=1, pods_per_node=3)


@pytest.fixture
def lab2(lab_factory: Callable[..., Lab]) -> Lab:
    return lab_factory(nodes=2, pods_per_node=2)
