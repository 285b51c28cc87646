"""What `kproxy run` imports: the agent's import graph must not grow back (issue 9, memory).

Every module an agent imports stays in its memory for its whole life (the agent's RSS with an
empty cluster was 63 MB, most of it imports). A fresh interpreter imports what an iptables-mode
agent with DNS imports (the daemon, the API source, the iptables backend, the DNS server side),
loads a kubeconfig, builds the `ApiClient` and reads the node's addresses (real netlink),
then prints `sys.modules`. Behaviour, not timing: these modules are simply absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
import kproxy.cli, kproxy.logs, kproxy.runtime.daemon
from kproxy.kube.watch import load_client_configuration
import kproxy.backends.iptables, kproxy.dns.server, kproxy.runtime.dnswiring
from kproxy.backends.netinfo import local_addresses
from kproxy.deferinit import initialised
from kubernetes import client

cfg = load_client_configuration(kubeconfig=sys.argv[1] or None, master=sys.argv[2] or None)
api = client.ApiClient(cfg)
headers = {}
api.update_params_for_auth(headers, [], ["BearerToken"], "/api/v1/services", "GET", None)
print(json.dumps({
    "modules": sorted(sys.modules),
    "host": cfg.host,
    "auth": headers.get("authorization"),
    "addresses": list(local_addresses()),
    "ca": cfg.ssl_ca_cert,
    "initialised": {p: initialised(p) for p in ("kubernetes", "kubernetes.config", "pyroute2")},
}))
"""

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "http://127.0.0.1:6443"}
users:
- name: u
  user: {token: secret-token}
contexts:
- name: ctx
  context: {cluster: c, user: u}
current-context: ctx
"""

# (module, why an iptables-mode agent must not import it): the module and its submodules, or
# only the submodules for a name ending in "."
FORBIDDEN = [
    ("kubernetes.client.models.", "generated model classes: the API JSON is parsed directly"),
    ("kubernetes.client.api.", "generated API classes: list/watch go through ApiClient"),
    ("kubernetes.dynamic", "kubernetes/__init__ only (jsonschema)"),
    ("kubernetes.stream", "kubernetes/__init__ only (websocket)"),
    ("kubernetes.leaderelection", "kubernetes/__init__ only"),
    ("kubernetes.informer", "kubernetes/__init__ only"),
    ("kubernetes.watch", "kubernetes/__init__ only: kproxy has its own watch loop"),
    ("jsonschema", "kubernetes.dynamic"),
    ("websocket", "kubernetes.stream"),
    # addresses, the DNS placement and conntrack cleanup use kproxy's own netlink requests
    # (backends/rtnetlink.py, backends/conntrack.py); only IPVS and L2 modes use pyroute2
    ("pyroute2.", "pyroute2: ~5 MB for IPRoute, ~10 MB with its package __init__"),
    ("pyroute2.ndb", "pyroute2/__init__ only (sqlite3)"),
    ("pyroute2.ipdb", "pyroute2/__init__ only"),
    ("asyncio", "pyroute2's sockets"),
    ("unittest", "pyroute2's IPRoute mock"),
    ("sqlite3", "pyroute2.ndb"),
    ("kproxy.backends.ipvs", "IPVS mode only"),
    ("kproxy.backends.ipvs_netlink", "IPVS mode only"),
    ("kproxy.backends.nftables", "nftables mode only"),
    ("kproxy.backends.userspace", "userspace mode only"),
    ("kproxy.lab", "the demo lab"),
    ("kproxy.inspect.explain", "the explain command"),
    # the daemon feeds the DNS worker processes; only they (or --dns-workers 0) serve
    ("kproxy.dns.engine", "DNS serving: the worker processes"),
    ("kproxy.dns.forward", "DNS serving: the worker processes"),
    ("kproxy.dns.wire", "DNS serving: the worker processes"),
    ("kproxy.dns.resolver", "DNS serving: the worker processes"),
]


def _within(module: str, prefix: str) -> bool:
    if prefix.endswith("."):
        return module.startswith(prefix)
    return module == prefix or module.startswith(prefix + ".")


# only a kubeconfig needs kubernetes.config.kube_config, and with it requests and oauthlib
KUBECONFIG_ONLY = [
    ("kubernetes.config.kube_config", "the kubeconfig loader"),
    ("requests", "kube_config (requests-oauthlib, for OIDC refresh)"),
    ("requests_oauthlib", "kube_config"),
    ("oauthlib", "kube_config"),
    ("charset_normalizer", "requests"),
]


def _probe(argv: list[str], kubeconfig: str = "", master: str = "") -> dict[str, object]:
    out = subprocess.run(
        [*argv, sys.executable, "-c", _PROBE, kubeconfig, master],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


def _unwanted(modules: object, forbidden: list[tuple[str, str]]) -> list[str]:
    assert isinstance(modules, list)
    return [f"{m} ({why})" for prefix, why in forbidden for m in modules if _within(m, prefix)]


def test_an_iptables_agent_imports_only_what_it_uses(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG, encoding="utf-8")
    found = _probe([], kubeconfig=str(kubeconfig))
    modules = found["modules"]
    assert isinstance(modules, list)
    # the probe did load the real client and read real addresses
    assert found["host"] == "http://127.0.0.1:6443"
    assert found["auth"] == "Bearer secret-token"
    assert "127.0.0.1" in found["addresses"]  # type: ignore[operator]
    assert "kubernetes.client.api_client" in modules
    assert "kubernetes.config.kube_config" in modules
    assert "kproxy.backends.conntrack" in modules  # the cleanup after endpoint changes
    bad = _unwanted(modules, FORBIDDEN)
    assert not bad, "\n".join(bad)
    # no library's own package __init__ ran (each imports all of the above)
    assert found["initialised"] == {
        "kubernetes": False,
        "kubernetes.config": False,
        "pyroute2": False,
    }


def test_without_a_kubeconfig_the_kubeconfig_loader_is_not_imported() -> None:
    found = _probe([], master="127.0.0.1:8080")
    assert found["host"] == "http://127.0.0.1:8080" and found["auth"] is None
    bad = _unwanted(found["modules"], FORBIDDEN + KUBECONFIG_ONLY)
    assert not bad, "\n".join(bad)


_IN_CLUSTER = """\
set -e
mount -t tmpfs kproxy-test /run
mkdir -p /run/secrets/kubernetes.io/serviceaccount
cd /run/secrets/kubernetes.io/serviceaccount
printf account-token > token
printf 'not checked before a connection' > ca.crt
cd "$OLDPWD"
exec "$@"
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_the_in_cluster_account_loads_without_the_kubeconfig_loader() -> None:
    """The DaemonSet's way: the service account's token and CA, placed in a private mount
    namespace (a tmpfs over /run, seen by the probe only), loaded by the official client."""
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    argv = [
        "env",
        *(f"{k}={v}" for k, v in env.items()),
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        _IN_CLUSTER,
        "sh",
    ]
    found = _probe(argv)
    assert found["host"] == "https://10.96.0.1:443"
    assert found["auth"] == "bearer account-token"  # the client's in-cluster spelling
    assert found["ca"] == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    bad = _unwanted(found["modules"], FORBIDDEN + KUBECONFIG_ONLY)
    assert not bad, "\n".join(bad)


def test_a_deferred_package_runs_its_init_on_first_use_of_a_name(tmp_path: Path) -> None:
    """`defer_init` semantics on a package made here: submodules import without the package's
    `__init__`; the first other name runs it, once, in the same module object."""
    from kproxy.deferinit import defer_init, initialised

    pkg = tmp_path / "kimp_probe_pkg"
    (pkg / "heavy").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from kimp_probe_pkg import heavy\nfrom kimp_probe_pkg.light import Light\n"
        "RUNS = heavy.RUNS\nRUNS.append('init')\n__version__ = '1.2'\n"
    )
    (pkg / "heavy" / "__init__.py").write_text("RUNS = []\n")
    (pkg / "light.py").write_text("class Light:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        defer_init("kimp_probe_pkg")
        defer_init("kimp_probe_pkg")  # twice: no effect
        import kimp_probe_pkg  # type: ignore[import-not-found]
        from kimp_probe_pkg.light import Light  # type: ignore[import-not-found]

        assert not initialised("kimp_probe_pkg")
        assert "kimp_probe_pkg.heavy" not in sys.modules
        from kimp_probe_pkg import heavy  # a submodule by name: imported, still no __init__

        assert heavy.RUNS == []
        assert not initialised("kimp_probe_pkg")
        assert kimp_probe_pkg.__version__ == "1.2"  # any other name runs the real __init__
        assert initialised("kimp_probe_pkg")
        assert kimp_probe_pkg.Light is Light
        assert kimp_probe_pkg.RUNS == ["init"] and heavy.RUNS == ["init"]
        assert sys.modules["kimp_probe_pkg"] is kimp_probe_pkg
        try:
            _ = kimp_probe_pkg.missing
        except AttributeError as err:
            assert "missing" in str(err)
        else:
            raise AssertionError("a name the package does not have must raise AttributeError")
        assert kimp_probe_pkg.RUNS == ["init"]  # once
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("kimp_probe_pkg")]:
            del sys.modules[name]
