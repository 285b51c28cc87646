"""deploy/: the in-cluster DaemonSet, its RBAC and config.

The manifests are checked against the Kubernetes API's types twice, independently: once against
the `kubernetes` client's generated models (field names and types, unknown fields rejected; no
download, no cluster), and once with kubernetes-validate's bundled OpenAPI schemas in strict mode
(when installed; .ci/ops-setup.sh installs it). Then the properties that matter for a node proxy:
least-privilege RBAC, host networking, capabilities, and a config kproxy itself accepts.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

from kproxy.config import Settings, build_parser, parse_file_data, resolve

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.32.0"  # the lab's Kubernetes minor (vagrant/Vagrantfile)
NET_CAPS = {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"}


def load_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return docs


DOCS = load_documents()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == kind]


def the(kind: str) -> dict[str, Any]:
    [doc] = by_kind(kind)
    return doc


# -- a strict structural check against the kubernetes client's models ---------------------------
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "bytes": (str,),
    "datetime": (str,),
    "date": (str,),
}


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Field-by-field problems of `doc` against the API type its apiVersion/kind names."""
    version = doc.get("apiVersion", "").rsplit("/", 1)[-1]
    model = f"{version.capitalize()}{doc.get('kind', '')}"
    if not hasattr(kubernetes.client, model):
        return [f"no API type {model} for {doc.get('apiVersion')}/{doc.get('kind')}"]
    errors: list[str] = []
    _check(doc, model, "", errors)
    return errors


def _check(value: Any, type_name: str, path: str, errors: list[str]) -> None:
    if value is None or type_name == "object":
        return
    if m := re.fullmatch(r"List\[(.+)\]", type_name):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, m.group(1), f"{path}[{i}]", errors)
        return
    if m := re.fullmatch(r"Dict\[str, (.+)\]", type_name):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {type(value).__name__}")
            return
        for key, item in value.items():
            _check(item, m.group(1), f"{path}.{key}", errors)
        return
    if type_name in _PRIMITIVES:
        allowed = _PRIMITIVES[type_name]
        if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
            errors.append(f"{path}: expected {type_name}, got {value!r}")
        return
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {type_name} object, got {value!r}")
        return
    fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
            continue
        _check(item, model.openapi_types[fields[key]], f"{path}.{key}", errors)


def doc_id(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_matches_the_api_types(doc: dict[str, Any]) -> None:
    assert schema_errors(doc) == []


@pytest.mark.parametrize(
    ("path", "bad_value", "complaint"),
    [
        pytest.param(("spec", "template", "spec", "hostnetwork"), True, "unknown field", id="typo"),
        pytest.param(("spec", "replicas"), 3, "unknown field", id="not-a-daemonset-field"),
        pytest.param(
            ("spec", "template", "spec", "hostNetwork"), "yes", "expected bool", id="type"
        ),
        pytest.param(("spec", "template", "spec", "tolerations"), {}, "expected a list", id="list"),
    ],
)
def test_the_type_check_is_not_a_dead_check(
    path: tuple[str, ...], bad_value: Any, complaint: str
) -> None:
    daemonset = copy.deepcopy(the("DaemonSet"))
    node = daemonset
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad_value
    errors = schema_errors(daemonset)
    assert any(complaint in e and path[-1] in e for e in errors), errors


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_kubernetes_validate_strict(doc: dict[str, Any]) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(doc, K8S_VERSION, strict=True)


# -- RBAC: read services, endpointslices, nodes; nothing else --------------------------------------
ALLOWED = {
    ("", "services"): {"list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
    ("", "nodes"): {"get", "list", "watch"},
}


def granted() -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in the("ClusterRole")["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_is_read_only_and_limited_to_three_resources() -> None:
    grants = granted()
    assert set(grants) <= set(ALLOWED), set(grants) - set(ALLOWED)
    for key, verbs in grants.items():
        assert verbs <= ALLOWED[key], (key, verbs - ALLOWED[key])
        assert "*" not in verbs and "*" not in key


def test_rbac_grants_what_the_watchers_need() -> None:
    grants = granted()
    for key in ALLOWED:
        assert {"list", "watch"} <= grants.get(key, set()), key
    assert not by_kind("Role") and not by_kind("RoleBinding")


def test_binding_ties_the_role_to_the_daemonsets_service_account() -> None:
    binding, account, daemonset = the("ClusterRoleBinding"), the("ServiceAccount"), the("DaemonSet")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": the("ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert (
        daemonset["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    )
    assert daemonset["metadata"]["namespace"] == account["metadata"]["namespace"]


# -- the DaemonSet ------------------------------------------------------------------------------
def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = the("DaemonSet")["spec"]["template"]["spec"]
    return spec


def container(name: str = "kproxy") -> dict[str, Any]:
    [found] = [c for c in pod_spec()["containers"] if c["name"] == name]
    assert isinstance(found, dict)
    return found


def test_runs_on_every_node_in_the_host_network() -> None:
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    # kproxy is the cluster DNS: its own lookups must not go to itself.
    assert spec["dnsPolicy"] == "Default"


def test_agent_container_holds_only_network_capabilities() -> None:
    ctx = container()["securityContext"]
    assert ctx.get("privileged", False) is False
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert set(ctx["capabilities"]["add"]) == NET_CAPS


def test_node_paths_are_mounted() -> None:
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    lock = volumes[mounts["/run/xtables.lock"]["name"]]["hostPath"]
    assert lock == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert not mounts["/run/xtables.lock"].get("readOnly", False)
    modules = mounts["/lib/modules"]
    assert modules["readOnly"] is True
    assert volumes[modules["name"]]["hostPath"]["path"] == "/lib/modules"


def config_map_data() -> dict[str, str]:
    data: dict[str, str] = the("ConfigMap")["data"]
    return data


def test_command_line_and_config_are_accepted_by_kproxy(tmp_path: Path) -> None:
    agent = container()
    assert agent["command"] == ["kproxy"]
    assert agent["args"][0] == "run"
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "--hostname-override=$(NODE_NAME)" in agent["args"]

    # The ConfigMap is mounted where --config points; kproxy must accept both.
    [config_arg] = [a for a in agent["args"] if a.startswith("--config=")]
    config_path = Path(config_arg.split("=", 1)[1])
    [mount] = [m for m in agent["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    volume = {v["name"]: v for v in pod_spec()["volumes"]}[mount["name"]]
    assert volume["configMap"]["name"] == the("ConfigMap")["metadata"]["name"]
    (tmp_path / config_path.name).write_text(config_map_data()[config_path.name])

    args = [
        a.replace("$(NODE_NAME)", "worker-1").replace(
            str(config_path), str(tmp_path / "config.yaml")
        )
        for a in agent["args"][1:]
    ]
    settings = resolve(build_parser(argparse.ArgumentParser()).parse_args(args))
    assert settings.hostname_override == "worker-1"
    assert settings.proxy_mode in ("iptables", "ipvs")
    assert settings.ignored == ()


def test_config_map_config_parses() -> None:
    values, ignored = parse_file_data(yaml.safe_load(config_map_data()["config.yaml"]))
    assert values["cluster_cidr"] == ("10.244.0.0/16",)
    assert ignored == ()


def test_node_setup_script_is_valid_shell_and_is_what_the_init_container_runs() -> None:
    init = next(c for c in pod_spec()["initContainers"] if c["name"] == "node-setup")
    assert init["command"][-1] == "/etc/kproxy/node-setup.sh"
    script = config_map_data()["node-setup.sh"]
    shell = shutil.which("dash") or shutil.which("sh")
    assert shell is not None
    result = subprocess.run(
        [shell, "-n"], input=script, text=True, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr
    # The long-running container stays unprivileged: only the one-shot setup is privileged.
    assert init["securityContext"]["privileged"] is True


# -- the LoadBalancer overlay: only what address pools need ---------------------------------------
LB_DIR = DEPLOY / "loadbalancer"
LB_DOCS = [d for d in yaml.safe_load_all((LB_DIR / "rbac.yaml").read_text()) if d]


def lb_doc(kind: str) -> dict[str, Any]:
    [doc] = [d for d in LB_DOCS if d["kind"] == kind]
    return doc


def test_lb_overlay_adds_the_base_and_its_rbac_only() -> None:
    kustomization = yaml.safe_load((LB_DIR / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["..", "rbac.yaml"]
    assert {p.name for p in LB_DIR.glob("*.yaml")} == {"kustomization.yaml", "rbac.yaml"}
    assert sorted(d["kind"] for d in LB_DOCS) == sorted(
        ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
    )


@pytest.mark.parametrize("doc", LB_DOCS, ids=doc_id)
def test_lb_rbac_matches_the_api_types(doc: dict[str, Any]) -> None:
    assert schema_errors(doc) == []


def _grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_lb_rbac_is_least_privilege() -> None:
    """Cluster-wide: patching Service status only (what LBApi.patch_ingress does). Leases: in
    the lease namespace only, and no delete (a stopping agent releases by update)."""
    assert _grants(lb_doc("ClusterRole")) == {("", "services/status"): {"patch"}}
    role = lb_doc("Role")
    assert role["metadata"]["namespace"] == Settings().lb_lease_namespace
    assert _grants(role) == {
        ("coordination.k8s.io", "leases"): {"get", "list", "watch", "create", "update"}
    }


def test_lb_bindings_tie_the_roles_to_the_agents_service_account() -> None:
    account = the("ServiceAccount")
    subject = {
        "kind": "ServiceAccount",
        "name": account["metadata"]["name"],
        "namespace": account["metadata"]["namespace"],
    }
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = lb_doc(binding_kind)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": lb_doc(role_kind)["metadata"]["name"],
        }
        assert binding["subjects"] == [subject]
    assert lb_doc("RoleBinding")["metadata"]["namespace"] == lb_doc("Role")["metadata"]["namespace"]


def test_base_rbac_stays_read_only_without_pools() -> None:
    """The base kustomization does not include the overlay: no writes unless pools are wanted."""
    assert not any(d["kind"] in ("Role", "RoleBinding") for d in DOCS)
    assert all(verbs <= {"get", "list", "watch"} for verbs in granted().values())
