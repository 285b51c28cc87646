"""Importing a library's submodules without running its package `__init__` until it is needed.

kproxy uses a few submodules of two libraries whose top-level `__init__.py` imports everything
else they ship, and Python runs a package's `__init__.py` before any of its submodules:

- `kubernetes/__init__.py` imports `client`, `config`, and also `dynamic` (jsonschema,
  referencing, rpds), `stream` (websocket), `watch`, `utils`, `leaderelection` and `informer`,
  which kproxy never uses: ~4 MB of the agent's RSS. kproxy needs `kubernetes.client`
  (`Configuration`, `ApiClient`, `rest`, `exceptions`) and `kubernetes.config` (kubeconfig and
  in-cluster loading).
- `pyroute2/__init__.py` imports every pyroute2 API (NDB with sqlite3, IPDB, IPSet, IPVS,
  WireGuard, nl80211, devlink, plan9, ...): ~5 MB. kproxy needs `pyroute2.iproute`,
  `pyroute2.netlink.*` and (for conntrack) `pyroute2.netlink.nfnetlink.nfctsocket`.

`defer_init(name)` registers the package in `sys.modules` the way the import system does
(`importlib.util.module_from_spec`: the same `__spec__`, `__path__`, `__file__` and loader)
without executing its `__init__.py`, and gives the module a PEP 562 `__getattr__`:

- a name that is a submodule (`kubernetes.client`, `from pyroute2 import iproute`) is imported
  as that submodule, which is what the real `__init__` would have done for it;
- any other name (a class the `__init__` re-exports such as `pyroute2.IPRoute`,
  `kubernetes.__version__`, `__all__`) runs the real `__init__.py` in that same module object,
  once, and is then looked up as usual.

So whoever uses the package's top-level names gets the package exactly as a normal import makes
it, only later; submodules are the installed, unmodified library code (this is not a mock or a
patch: no library function is replaced). Nothing is done for a package that is already imported
(then its `__init__` has run) or not installed. `kproxy/__init__.py` calls it for `kubernetes`,
`kubernetes.config` and `pyroute2`, so it is in place before any kproxy module imports them;
tests/unit/test_import_graph.py checks which modules `kproxy run` ends up importing.

`kubernetes.config`'s `__init__` imports both loaders; its `kube_config` brings requests,
requests-oauthlib, oauthlib and charset_normalizer (~7 MB), which an agent using the in-cluster
service account (the DaemonSet) or `--master` never needs: kproxy/kube/watch.py imports
`kube_config` only when it is given a kubeconfig.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_lock = threading.RLock()


def defer_init(*packages: str) -> None:
    """Register each top-level `package` with its `__init__.py` deferred (see module doc)."""
    for name in packages:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)  # imports the parent of a subpackage
        except (ImportError, ValueError):
            continue
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            continue  # not installed, or not a package: import it normally when asked
        module = importlib.util.module_from_spec(spec)
        vars(module)["__getattr__"] = _resolver(module, spec)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)  # as the import system binds it


def initialised(package: str) -> bool:
    """Whether `package` is imported and its own `__init__.py` has run."""
    module = sys.modules.get(package)
    if module is None:
        return False
    return not getattr(vars(module).get("__getattr__"), "_deferred", False)


def _resolver(module: types.ModuleType, spec: Any) -> Any:
    name = module.__name__

    def __getattr__(attr: str) -> Any:
        if not attr.startswith("__") and importlib.util.find_spec(f"{name}.{attr}") is not None:
            return importlib.import_module(f"{name}.{attr}")
        with _lock:
            if vars(module).get("__getattr__") is __getattr__:
                del vars(module)["__getattr__"]  # the real __init__ may define its own
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    vars(module)["__getattr__"] = __getattr__
                    raise
        try:
            return vars(module)[attr]
        except KeyError:
            own = vars(module).get("__getattr__")
            if own is not None and own is not __getattr__:
                return own(attr)
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    __getattr__._deferred = True  # type: ignore[attr-defined]
    return __getattr__
