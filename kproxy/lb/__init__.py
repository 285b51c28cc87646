"""LoadBalancer addresses without a cloud: address pools, one allocator, layer-2 announcements.

Pure modules (standard library only, no I/O): `pools` (ranges and CIDRs), `allocator` (services
in, assignments out), `select` (which node answers ARP/NDP for an address), `election` (the Lease
rules of leader election and agent liveness), `packets` (ARP and NDP frames). The I/O edges live
where the rest of kproxy keeps them: `kproxy.kube.lbapi` (the API), `kproxy.backends.l2`
(AF_PACKET sockets), `kproxy.runtime.lb` (threads and wiring).
"""
