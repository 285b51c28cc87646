"""Network-namespace labs: a throwaway cluster (nodes, routed pods, an outside client) for the
integration tests and ``kproxy demo``.

- :mod:`kproxy.lab.netlab`: ``Lab.create(...)`` builds the namespaces; run, spawn, teardown;
- :mod:`kproxy.lab.servers`: HTTP/UDP servers that report their name and the client they saw;
- :mod:`kproxy.lab.traffic`: requests from inside a namespace (``http_get``, ``http_batch``,
  ``udp_query``, streams, held connections), run by :mod:`kproxy.lab.probe`;
- :mod:`kproxy.lab.nsexec`: argv/env conventions for running programs inside a namespace.

Nothing is imported here: the helpers start inside namespaces with ``python -S`` and must stay
cheap to import.
"""
