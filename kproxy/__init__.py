"""kproxy: a userspace Kubernetes node agent replacing kube-proxy and the node's cluster DNS."""

from kproxy.deferinit import defer_init

__version__ = "0.1.0"

# Import only the parts of these libraries kproxy uses; their package __init__ runs on first use
# of a top-level name (kproxy/deferinit.py says why and how).
defer_init("kubernetes", "kubernetes.config", "pyroute2")
