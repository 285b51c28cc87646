"""Chain names and hook jumps: kube-proxy's hash vectors and hook order, and what kproxy owns."""

from __future__ import annotations

import pytest

from kproxy.render import chains as C


@pytest.mark.parametrize(
    ("port_name", "protocol", "expected"),
    [
        # kube-proxy's proxier_test.go vectors
        ("ns1/svc1:p80", "tcp", "KUBE-SVC-XPGD46QRK7WJZT7O"),
        ("ns2/svc2:p80", "tcp", "KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
        ("ns3/svc3:p80", "tcp", "KUBE-SVC-X27LE4BHSL4DOUIK"),
        ("ns4/svc4:p80", "tcp", "KUBE-SVC-4SW47YFZTEDKD3PK"),
        ("ns5/svc5:p80", "tcp", "KUBE-SVC-NUKIZ6OKUXPJNT4C"),
        # the protocol is hashed lower case whatever the caller passes
        ("ns1/svc1:p80", "TCP", "KUBE-SVC-XPGD46QRK7WJZT7O"),
    ],
)
def test_service_chain_vectors(port_name: str, protocol: str, expected: str) -> None:
    assert C.svc_chain(port_name, protocol) == expected


@pytest.mark.parametrize(
    ("port_name", "endpoint", "expected"),
    [
        ("ns1/svc1:p80", "10.180.0.1:80", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
        ("ns2/svc2:p80", "10.180.0.2:80", "KUBE-SEP-RS4RBKLTHTF2IUXJ"),
        ("ns3/svc3:p80", "10.180.0.3:80", "KUBE-SEP-OYPFS5VJICHGATKP"),
        ("ns4/svc4:p80", "10.180.0.4:80", "KUBE-SEP-UKSFD7AGPMPPLUHC"),
        ("ns4/svc4:p80", "10.180.0.5:80", "KUBE-SEP-C6EBXVWJJZMIWKLZ"),
        ("ns5/svc5:p80", "10.180.0.3:80", "KUBE-SEP-I77PXRDZVX7PMWMN"),
    ],
)
def test_endpoint_chain_vectors(port_name: str, endpoint: str, expected: str) -> None:
    assert C.sep_chain(port_name, "tcp", endpoint) == expected


def test_policy_chains_share_the_service_hash() -> None:
    # kube-proxy: KUBE-FW-NUKIZ6OKUXPJNT4C and KUBE-EXT-GNZBNJ2PO5MGZ6GT in its expected rules
    assert C.fw_chain("ns5/svc5:p80", "tcp") == "KUBE-FW-NUKIZ6OKUXPJNT4C"
    assert C.ext_chain("ns2/svc2:p80", "tcp") == "KUBE-EXT-GNZBNJ2PO5MGZ6GT"
    assert C.svl_chain("ns2/svc2:p80", "tcp") == "KUBE-SVL-GNZBNJ2PO5MGZ6GT"


def test_names_fit_iptables_limit_and_differ_by_protocol() -> None:
    tcp, udp = C.svc_chain("ns/dns:dns", "tcp"), C.svc_chain("ns/dns:dns", "udp")
    assert tcp != udp
    assert all(len(name) <= 28 for name in (tcp, C.sep_chain("ns/a", "sctp", "[fd00::1]:53")))


def test_unnamed_port_hashes_without_colon() -> None:
    assert C.svc_chain("ns/svc", "tcp") != C.svc_chain("ns/svc:", "tcp")


def test_hooks_end_in_kube_proxy_order() -> None:
    """kube-proxy prepends its jumps in list order, so the last listed ends up first."""
    assert [h.target for h in C.hooks_for("filter", "INPUT")] == [
        C.PROXY_FIREWALL,
        C.NODEPORTS,
        C.EXTERNAL_SERVICES,
    ]
    assert [h.target for h in C.hooks_for("filter", "FORWARD")] == [
        C.PROXY_FIREWALL,
        C.FORWARD,
        C.SERVICES,
        C.EXTERNAL_SERVICES,
    ]
    assert [h.target for h in C.hooks_for("nat", "PREROUTING")] == [C.SERVICES]
    assert [h.target for h in C.hooks_for("nat", "POSTROUTING")] == [C.POSTROUTING]
    assert C.hooks_for("mangle", "PREROUTING") == ()


def test_hook_lines_are_in_iptables_save_form() -> None:
    # presence checks compare these lines with `iptables-save` output verbatim
    (hook,) = C.hooks_for("nat", "OUTPUT")
    assert (
        hook.line == '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    )


@pytest.mark.parametrize(
    ("table", "chain", "owned"),
    [
        ("nat", "KUBE-SVC-XPGD46QRK7WJZT7O", True),
        ("nat", "KUBE-XLB-XPGD46QRK7WJZT7O", True),  # older kube-proxy leftovers go too
        ("nat", "KUBE-SERVICES", True),
        ("filter", "KUBE-PROXY-FIREWALL", True),
        ("mangle", "KUBE-PROXY-CANARY", True),
        ("filter", "KUBE-SVC-XPGD46QRK7WJZT7O", False),  # service chains live in nat only
        # kubelet's chains are not ours
        ("filter", "KUBE-FIREWALL", False),
        ("nat", "KUBE-MARK-DROP", False),
        ("mangle", "KUBE-KUBELET-CANARY", False),
        ("mangle", "KUBE-IPTABLES-HINT", False),
        ("nat", "DOCKER", False),
    ],
)
def test_ownership(table: str, chain: str, owned: bool) -> None:
    assert C.is_owned(table, chain) is owned
