"""Where the running agent's inspection socket lives, and the version of what it serves.

Shared by the server (kproxy.runtime.inspectsock) and its readers (kproxy.inspect.wanted), so
both name the same file: /run/kproxy/kproxy.sock in the host's network namespace,
/run/kproxy/netns-NAME.sock inside a namespace made by `ip netns add NAME`.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR = Path("/run/kproxy")
NETNS_DIR = Path("/run/netns")
STATE_VERSION = 1


def netns_inode() -> int:
    """The inode of this process's network namespace (0 when /proc cannot tell)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def netns_name(netns_dir: Path = NETNS_DIR) -> str:
    """The `ip netns` name of this process's network namespace, "" when it has none."""
    own = netns_inode()
    if not own:
        return ""
    try:
        names = sorted(os.listdir(netns_dir))
    except OSError:
        return ""
    for name in names:
        try:
            if os.stat(netns_dir / name).st_ino == own:
                return name
        except OSError:
            continue
    return ""


def default_socket_path(run_dir: Path = RUN_DIR) -> Path:
    name = netns_name()
    return run_dir / (f"netns-{name}.sock" if name else "kproxy.sock")
