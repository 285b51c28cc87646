"""`Written`: the compact record the iptables proxier keeps per service gives back exactly the
chain names, digests, rule counts and shared lines of the block it was made from."""

from __future__ import annotations

import pytest

from kproxy.backends.iptables import NOTHING_WRITTEN, Written
from kproxy.render import chains as C
from kproxy.render.iptables import EMPTY_SERVICE, ServiceRules, Shared

SVC = C.svc_chain("ns1/web:http", "tcp")
SEP = C.sep_chain("ns1/web:http", "tcp", "10.1.0.1:8080")
FW = C.fw_chain("ns1/web:http", "tcp")

BLOCKS = {
    "cluster-ip": ServiceRules(
        chains=((SVC, f"-A {SVC} -j {SEP}\n"), (SEP, f"-A {SEP} -j DNAT\n-A {SEP} -j MARK\n")),
        shared=Shared(nat_services=f"-A KUBE-SERVICES -d 10.96.0.1 -j {SVC}\n"),
    ),
    "filter lines": ServiceRules(
        chains=((FW, f"-A {FW} -j DROP\n"),),
        shared=Shared(filter_services="-A KUBE-SERVICES -d 10.96.0.2 -j REJECT\n"),
    ),
    "a name of another shape": ServiceRules(
        chains=((SVC, ""), ("KUBE-SEP-lower-case-hash", "-A KUBE-SEP-lower-case-hash -j X\n")),
    ),
}


@pytest.mark.parametrize("block", BLOCKS.values(), ids=BLOCKS.keys())
def test_written_gives_back_its_block(block: ServiceRules) -> None:
    w = Written.of(block)
    assert w.names == block.names
    assert w.chain_digests() == {name: hash(text) for name, text in block.chains}
    assert w.chain_counts() == {name: text.count("\n") for name, text in block.chains}
    assert w.shared == block.shared
    assert w.nat_rules == block.nat_rule_count
    assert Written.of(block) == w
    other = ServiceRules(chains=block.chains[:-1], shared=block.shared)
    assert Written.of(other) != w


def test_nothing_written_is_the_empty_block() -> None:
    assert Written.of(EMPTY_SERVICE) == NOTHING_WRITTEN
    assert NOTHING_WRITTEN.names == () and NOTHING_WRITTEN.shared == Shared()
