"""One service iptables-restore refuses must not stop the others (issue 12 item 2).

The refused service is a model object built directly (a 2,000-character name: validation
refuses such an object from a manifest or the API, so only this path can reach the backend
with it), synced by the real IptablesProxier with the real iptables-restore in a throwaway
namespace, both flavours."""

from __future__ import annotations

import pytest

from kproxy.render import chains as C
from tests.integration.test_iptables_backend import FLAVOURS, declared, netns, rules_of, run_in

__all__ = ["netns"]

pytestmark = [pytest.mark.netns]

BAD = "b" * 2000
SVC_A, SVC_C = C.svc_chain("ns1/a:p80", "tcp"), C.svc_chain("ns1/c:p80", "tcp")
SVC_BAD = C.svc_chain(f"ns1/{BAD}:p80", "tcp")

SCENARIO = """
BAD = "b" * 2000
store = Store()
def svc(name, ip):
    return make_service("ns1", name, cluster_ips=(ip,))
store.replace_services([svc("a", "172.30.0.1"), svc(BAD, "172.30.0.2"), svc("c", "172.30.0.3")])
store.replace_slices([
    make_slice("ns1", "a", endpoints=[make_endpoint("10.1.0.1")]),
    make_slice("ns1", BAD, endpoints=[make_endpoint("10.1.0.2")]),
    make_slice("ns1", "c", endpoints=[make_endpoint("10.1.0.3")])])
p = IptablesProxier(options=ProxyOptions(node_name="n", cluster_cidrs=("10.0.0.0/8",)),
                    flavour=FLAVOUR, restorer=REC, clock=lambda: next(tick),
                    nft_chunk_chains=4)
def rejected():
    return {str(ref)[:40]: bad.error for ref, bad in p.rejected.items()}
res = p.sync(*store.take(), full=True)
out["first"] = save() + save("filter")
out["first_rejected"] = rejected()
out["first_written"] = res.services_written
# a later change to a good service lands in a partial sync, without probing again
INPUTS.clear()
store.set_slice(make_slice("ns1", "a", endpoints=[make_endpoint("10.1.0.1"),
                                                  make_endpoint("10.1.0.9")]))
res = p.sync(*store.take(), full=False)
out["partial"] = dict(full=res.full, written=res.services_written, restores=len(INPUTS))
out["second"] = save()
# a periodic full sync leaves the refused service out without probing it again
INPUTS.clear()
p.sync(*store.take(), full=True)
out["periodic_probes"] = sum("KPRB-" in text for text in inputs())
out["periodic_rejected"] = rejected()
# a new bad service arriving in a partial sync: found, left out, the rest stays
store.set_service(make_service("ns2", BAD, cluster_ips=("172.30.0.4",)))
store.set_slice(make_slice("ns2", BAD, endpoints=[make_endpoint("10.1.0.4")]))
store.set_service(make_service("ns2", "d", cluster_ips=("172.30.0.5",)))
store.set_slice(make_slice("ns2", "d", endpoints=[make_endpoint("10.1.0.5")]))
p.sync(*store.take(), full=False)
out["third"] = save() + save("filter")
out["third_rejected"] = rejected()
# deleting the bad services forgets them
store.delete_service(Ref("ns1", BAD))
store.delete_service(Ref("ns2", BAD))
p.sync(*store.take(), full=False)
out["after_delete"] = rejected()
"""


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_refused_service_is_left_out_and_the_rest_programmed(netns: str, flavour: str) -> None:
    r = run_in(netns, flavour, SCENARIO)
    first = r["first"]
    assert {SVC_A, SVC_C, C.CANARY} <= declared(first)
    assert SVC_BAD not in first and BAD not in first
    assert not any(name.startswith("KPRB-") for name in declared(first))  # probes leave nothing
    assert r["first_written"] == 2
    ((ref, error),) = r["first_rejected"].items()
    assert ref.startswith("ns1/bbbb")
    assert "Parameter too long" in error or "too long" in error.lower(), error
    # both good services' cluster IPs are programmed
    services = "\n".join(rules_of(first, "KUBE-SERVICES"))
    assert "-d 172.30.0.1/32" in services and "-d 172.30.0.3/32" in services
    assert "172.30.0.2" not in services
    # the later change landed as a partial sync, in one restore
    assert r["partial"] == {"full": False, "written": 1, "restores": 1}
    assert "10.1.0.9:80" in r["second"]
    assert r["periodic_probes"] == 0 and len(r["periodic_rejected"]) == 1
    third = r["third"]
    assert C.svc_chain("ns2/d:p80", "tcp") in declared(third) and SVC_A in declared(third)
    assert "-d 172.30.0.5/32" in third and "172.30.0.4" not in third
    assert sorted(r["third_rejected"]) == ["ns1/" + "b" * 36, "ns2/" + "b" * 36]
    assert r["after_delete"] == {}
