"""kproxy's node-local cluster DNS: the Kubernetes DNS spec served from the proxy's own model.

Layers, bottom up: `records` (wire names and records), `index` (model -> names and records,
incremental), `resolver` (question + index -> answer, no I/O), `wire` (parse, encode, patch,
truncate), `forward` (upstreams and their cache), `engine` (sockets and threads), `worker`
(a serving process), `server` (`DNSService`, what the daemon uses), `placement` (the listen
addresses on the node). See docs/dns.md.
"""

from kproxy.dns.index import DnsIndex, IndexBuilder, ModelDelta, build_index, diff_snapshots
from kproxy.dns.options import DNSOptions
from kproxy.dns.server import DNSError, DNSService

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
