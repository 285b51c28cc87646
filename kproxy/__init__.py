"""kproxy: a userspace Kubernetes node agent replacing kube-proxy and the node's cluster DNS."""

__version__ = "0.1.0"
