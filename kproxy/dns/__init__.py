"""kproxy's node-local cluster DNS: the Kubernetes DNS spec served from the proxy's own model.

Layers, bottom up: `records` (wire names and records), `index` (model -> names and records,
incremental), `resolver` (question + index -> answer, no I/O), `wire` (parse, encode, patch,
truncate), `forward` (upstreams and their cache), `engine` (sockets and threads), `worker`
(a serving process), `server` (`DNSService`, what the daemon uses), `placement` (the listen
addresses on the node). See docs/dns.md.

The names below are imported lazily: the serving processes import only what they use, which
keeps the placement's netlink code and the daemon-side modules out of their memory.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kproxy.dns.index import DnsIndex, IndexBuilder, ModelDelta, build_index, diff_snapshots
    from kproxy.dns.options import DNSOptions
    from kproxy.dns.server import DNSError, DNSService

_WHERE = {
    "DNSError": "kproxy.dns.server",
    "DNSService": "kproxy.dns.server",
    "DNSOptions": "kproxy.dns.options",
    "DnsIndex": "kproxy.dns.index",
    "IndexBuilder": "kproxy.dns.index",
    "ModelDelta": "kproxy.dns.index",
    "build_index": "kproxy.dns.index",
    "diff_snapshots": "kproxy.dns.index",
}

__all__ = [
    "DNSError",
    "DNSOptions",
    "DNSService",
    "DnsIndex",
    "IndexBuilder",
    "ModelDelta",
    "build_index",
    "diff_snapshots",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kproxy.dns' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
