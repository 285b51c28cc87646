"""The root of kproxy's own exceptions and its few meaningful families.

Every error kproxy raises on purpose derives from `KproxyError`, through the family that says
what went wrong and so what a caller can do about it:

- `ConfigError`: a setting is unknown or invalid (kproxy refuses to start; the message names it);
- `InputError`: an object, a name, a packet or a command-line target is malformed (it is logged
  with its name and skipped, answered FORMERR, or refused with one line);
- `SourceError`: the cluster source or an upstream cannot be read (retried with backoff);
- `DataplaneError`: the kernel refused or could not take what kproxy programmed (the sync fails
  and the next one is full).

Each class keeps the builtin base its callers already catch (ValueError, RuntimeError, ...).
Private flow-control exceptions inside one module (e.g. the watch's "410 Gone") are not part of
this hierarchy.
"""

from __future__ import annotations


class KproxyError(Exception):
    """Something kproxy detected and reports; never a bug."""


class ConfigError(KproxyError, ValueError):
    """A setting is unknown or invalid; the message names it."""


class InputError(KproxyError, ValueError):
    """A malformed object, name, packet or target."""


class SourceError(KproxyError):
    """The cluster source (API server, manifests) or a DNS upstream failed."""


class KubeConfigError(SourceError):
    """No usable way to reach the apiserver (bad kubeconfig, not in a cluster, no --master).
    Here rather than in kproxy.kube.watch, so a caller can catch it without importing the
    Kubernetes client (`kproxy status` reading a running agent's socket never needs it)."""


class DataplaneError(KproxyError, RuntimeError):
    """The kernel (iptables, nftables, IPVS, ipset, conntrack, links) refused a change or a
    read."""
