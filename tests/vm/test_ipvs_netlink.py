"""The IPVS netlink adapter and the kube-ipvs0 dummy interface on a real IPVS kernel (the VM).

Everything happens in a fresh network namespace per test, and every check reads the kernel back
through an independent tool: `ipvsadm -Ln` (and `--persistent-conn`, `--stats --exact`) parsed by
tests/vm/ipvsadm.py, or `ip addr`.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

import pytest

from kproxy.backends.ipvs_census import SockoptReader, key_hash
from kproxy.backends.ipvs_netlink import IPVSAdapter, IPVSOpError
from kproxy.backends.netlink import netns_socket
from kproxy.render.ipvs import FLAG_PERSISTENT, FLAG_SCHED1, FLAG_SCHED2, Dest, VirtualServer, VSKey
from kproxy.render.ipvs_diff import (
    AddDest,
    AddVS,
    DelDest,
    DelVS,
    EditDest,
    EditVS,
    ObservedDest,
    ObservedVS,
    Op,
    diff_ipvs,
)
from tests.vm.conftest import Run, del_netns, new_netns, sh
from tests.vm.ipvsadm import ListedDest, ListedService, parse_list, parse_stats, restore_text

pytestmark = pytest.mark.vm

Table = dict[VSKey, VirtualServer]


# -- builders ------------------------------------------------------------------------------------
def make_vs(
    address: str,
    port: int = 80,
    protocol: str = "TCP",
    *,
    scheduler: str = "rr",
    flags: int = 0,
    timeout: int = 0,
    dests: Iterable[Dest] = (),
) -> VirtualServer:
    """A desired virtual server as the renderer builds one (PERSISTENT with a timeout)."""
    flags |= FLAG_PERSISTENT if timeout else 0
    return VirtualServer(VSKey(address, protocol, port), scheduler, flags, timeout, tuple(dests))


def table_of(*servers: VirtualServer) -> Table:
    return {vs.key: vs for vs in servers}


def make_table(services: int, dests: int, *, scheduler: str = "rr") -> Table:
    """`services` TCP virtual servers 10.96.x.y:80, each with `dests` real servers :8080."""
    vbase = int(ipaddress.IPv4Address("10.96.0.0"))
    rbase = int(ipaddress.IPv4Address("10.128.0.0"))
    return table_of(
        *(
            make_vs(
                str(ipaddress.IPv4Address(vbase + i)),
                scheduler=scheduler,
                dests=[
                    Dest(str(ipaddress.IPv4Address(rbase + i * 16 + j)), 8080, weight=1 + j % 3)
                    for j in range(dests)
                ],
            )
            for i in range(services)
        )
    )


def ops_for(table: Table) -> list[Op]:
    return [AddVS(vs) for vs in table.values()]


def expected_listing(vs: VirtualServer) -> ListedService:
    """What `ipvsadm -Ln` must show for `vs` (connection counts 0), in the oracle's terms."""
    names = {"sh": ("sh-fallback", "sh-port"), "mh": ("mh-fallback", "mh-port")}.get(vs.scheduler)
    sched_flags = ()
    if names:
        sched_flags = tuple(
            n for bit, n in zip((FLAG_SCHED1, FLAG_SCHED2), names, strict=True) if vs.flags & bit
        )
    listed = ListedService(
        vs.key.protocol,
        vs.key.address,
        vs.key.port,
        vs.scheduler,
        sched_flags=sched_flags,
        persistent=vs.timeout or None,
    )
    listed.dests = {
        (d.address, d.port): ListedDest(d.address, d.port, d.weight, "masq") for d in vs.dests
    }
    return listed


def assert_kernel_holds(ipvs: IPVSAdapter, ipvsadm: Run, table: Table) -> None:
    """ipvsadm's listing shows exactly `table`, and the adapter's dump of it is what kproxy's
    diff finds nothing to change in."""
    assert parse_list(ipvsadm("-Ln")) == {k: expected_listing(vs) for k, vs in table.items()}
    dumped = ipvs.dump()
    assert {k: (o.scheduler, o.flags, o.timeout, o.netmask) for k, o in dumped.items()} == {
        k: (vs.scheduler, vs.flags, vs.timeout, None) for k, vs in table.items()
    }
    assert {
        k: {(d.address, d.port, d.weight, d.forward) for d in o.dests} for k, o in dumped.items()
    } == {k: {(d.address, d.port, d.weight, "masq") for d in vs.dests} for k, vs in table.items()}
    assert diff_ipvs(table, dumped, owned=lambda _k: True).empty


def dest_of(observed: ObservedVS, address: str, port: int) -> ObservedDest:
    (found,) = [d for d in observed.dests if (d.address, d.port) == (address, port)]
    return found


# -- the table ---------------------------------------------------------------------------------
MIXED: Table = table_of(
    make_vs("10.96.0.1", 80, dests=[Dest("10.244.1.5", 8080), Dest("10.244.2.7", 8080)]),
    make_vs(
        "10.96.0.10",
        53,
        "UDP",
        scheduler="sh",
        flags=FLAG_SCHED1 | FLAG_SCHED2,
        dests=[Dest("10.244.1.9", 53, weight=2)],
    ),
    make_vs(
        "10.96.0.11",
        443,
        scheduler="wrr",
        timeout=10800,
        dests=[Dest("10.244.3.1", 8443, weight=5), Dest("10.244.3.2", 8443, weight=0)],
    ),
    make_vs("10.96.0.12", 9000, scheduler="lc", timeout=60),
    make_vs(
        "fd00:96::1",
        80,
        scheduler="mh",
        flags=FLAG_SCHED2,
        timeout=300,
        dests=[Dest("fd00:244::1:5", 8080)],
    ),
    make_vs("fd00:96::2", 53, "UDP", scheduler="wlc", dests=[Dest("fd00:244::2:9", 5353)]),
    make_vs("10.96.0.13", 36412, "SCTP", scheduler="dh", dests=[Dest("10.244.4.4", 36412)]),
)


def test_applied_table_matches_ipvsadm_listing(ipvs: IPVSAdapter, ipvsadm: Run) -> None:
    result = ipvs.apply(ops_for(MIXED))
    assert result.ok, result.failures
    assert result.done == result.messages == sum(1 + len(vs.dests) for vs in MIXED.values())
    assert_kernel_holds(ipvs, ipvsadm, MIXED)
    # --persistent-conn shows the same real servers and weights
    persist = parse_list(ipvsadm("-Ln", "--persistent-conn"))
    assert {k: {d: x.weight for d, x in s.dests.items()} for k, s in persist.items()} == {
        k: {(d.address, d.port): d.weight for d in vs.dests} for k, vs in MIXED.items()
    }


def test_drift_census_reads_agree_with_ipvsadm(
    vm_netns: str, ipvs: IPVSAdapter, ipvsadm: Run
) -> None:
    """The drift check's reads (kproxy.backends.ipvs_census): the sockopt census of the IPv4
    virtual servers and the undecoded netlink counts, against the table ipvsadm lists (an fwmark
    service and its real server count nowhere)."""
    assert ipvs.apply(ops_for(MIXED)).ok
    ipvsadm("-A", "-f", "7", "-s", "rr")
    ipvsadm("-a", "-f", "7", "-r", "10.244.9.9", "-m")
    listed = parse_list(ipvsadm("-Ln"))
    v4 = [vs for vs in MIXED.values() if ":" not in vs.key.address]
    reader = SockoptReader(netns=vm_netns)
    try:
        census = reader.read_v4()
        assert (census.services, census.dests) == (len(v4), sum(len(vs.dests) for vs in v4))
        assert census.fingerprint == sum(key_hash(vs.key, len(vs.dests)) for vs in v4)
        assert ipvs.count_services(4) == len(v4) and ipvs.count_services(6) == 2
        for vs in MIXED.values():
            assert ipvs.count_dests(vs.key) == len(vs.dests) == len(listed[vs.key].dests)
        assert ipvs.count_dests(VSKey("10.96.0.99", "TCP", 80)) == 0  # no such service
        # an outside delete of one real server changes the census at once
        ipvsadm("-d", "-t", "10.96.0.1:80", "-r", "10.244.1.5:8080")
        after = reader.read_v4()
        assert (after.services, after.dests) == (census.services, census.dests - 1)
        assert after.fingerprint != census.fingerprint
        assert ipvs.count_dests(VSKey("10.96.0.1", "TCP", 80)) == 1
        # a larger table (~30 KB of records)
        more = [
            make_vs(
                f"10.97.{i // 200}.{i % 200 + 1}",
                dests=[Dest("10.244.5.1", 80), Dest("10.244.5.2", 80)],
            )
            for i in range(300)
        ]
        assert ipvs.apply([AddVS(vs) for vs in more]).ok
        grown = reader.read_v4()
        assert (grown.services, grown.dests) == (len(v4) + 300, after.dests + 600)
    finally:
        reader.close()


@pytest.mark.parametrize(
    "scheduler", ["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh"]
)
def test_every_scheduler(ipvs: IPVSAdapter, ipvsadm: Run, scheduler: str) -> None:
    table = make_table(2, 3, scheduler=scheduler)
    assert ipvs.apply(ops_for(table)).ok
    assert_kernel_holds(ipvs, ipvsadm, table)


def test_ipvsadm_programmed_table_dumps_as_objects(ipvs: IPVSAdapter, ipvsadm: Run) -> None:
    ipvsadm("-R", stdin=restore_text(expected_listing(vs) for vs in MIXED.values()))
    assert_kernel_holds(ipvs, ipvsadm, MIXED)


def test_kernel_only_facts_are_observed_and_the_diff_repairs_forwarding(
    ipvs: IPVSAdapter, ipvsadm: Run
) -> None:
    """What kproxy never sets (a persistence netmask, direct routing), programmed by ipvsadm,
    shows on the observed records; the diff turns a direct-routing real server back to
    masquerade."""
    odd = [
        ListedService("TCP", "10.96.0.12", 9000, "lc", persistent=60, mask="255.255.255.0"),
        ListedService("TCP", "fd00:96::1", 80, "mh", ("mh-port",), persistent=300, mask="64"),
        # direct routing cannot change the port: ipvsadm gives the real server the service's
        ListedService("TCP", "192.168.50.1", 30080, "nq"),
    ]
    odd[2].dests = {("10.244.1.5", 30080): ListedDest("10.244.1.5", 30080, 1, "route")}
    ipvsadm("-R", stdin=restore_text(odd))
    assert parse_list(ipvsadm("-Ln")) == {svc.key: svc for svc in odd}
    dumped = ipvs.dump()
    assert {k: (o.scheduler, o.flags, o.timeout, o.netmask) for k, o in dumped.items()} == {
        VSKey("10.96.0.12", "TCP", 9000): ("lc", FLAG_PERSISTENT, 60, 24),
        VSKey("fd00:96::1", "TCP", 80): ("mh", FLAG_SCHED2 | FLAG_PERSISTENT, 300, 64),
        VSKey("192.168.50.1", "TCP", 30080): ("nq", 0, 0, None),
    }
    routed = dumped[VSKey("192.168.50.1", "TCP", 30080)].dests
    assert [(d.address, d.port, d.weight, d.forward) for d in routed] == [
        ("10.244.1.5", 30080, 1, "route")
    ]
    want = make_vs("192.168.50.1", 30080, scheduler="nq", dests=[Dest("10.244.1.5", 30080)])
    plan = diff_ipvs({want.key: want}, {want.key: dumped[want.key]}, owned=lambda _k: True)
    assert plan.ops == (EditDest(want.key, Dest("10.244.1.5", 30080)),)
    assert ipvs.apply(plan.ops).ok
    (fixed,) = ipvs.dump()[want.key].dests
    assert (fixed.forward, fixed.weight) == ("masq", 1)


def test_edit_service_and_dest(ipvs: IPVSAdapter, ipvsadm: Run) -> None:
    table = make_table(3, 3)
    ipvs.apply(ops_for(table))
    vs0, vs1 = list(table.values())[:2]
    new0 = replace(vs0, scheduler="sh", flags=FLAG_SCHED1 | FLAG_PERSISTENT, timeout=900)
    reweighted = Dest(vs1.dests[0].address, vs1.dests[0].port, weight=0)
    result = ipvs.apply([EditVS(new0), EditDest(vs1.key, reweighted)])
    assert result.ok, result.failures
    table[vs0.key] = new0
    table[vs1.key] = replace(vs1, dests=(reweighted, *vs1.dests[1:]))
    assert_kernel_holds(ipvs, ipvsadm, table)
    # persistence off again
    plain = replace(vs0, scheduler="rr")
    ipvs.apply_one(EditVS(plain))
    table[vs0.key] = plain
    assert_kernel_holds(ipvs, ipvsadm, table)


def test_delete_and_idempotence(ipvs: IPVSAdapter, ipvsadm: Run) -> None:
    table = make_table(3, 2)
    ipvs.apply(ops_for(table))
    vs0, vs1 = list(table.values())[:2]
    gone = vs1.dests[0]
    ops: list[Op] = [DelVS(vs0.key), DelDest(vs1.key, gone.address, gone.port)]
    first = ipvs.apply(ops)
    assert first.ok and first.already == 0
    del table[vs0.key]
    table[vs1.key] = replace(vs1, dests=vs1.dests[1:])
    assert_kernel_holds(ipvs, ipvsadm, table)
    again = ipvs.apply(ops)  # both already gone: success, counted as already
    assert again.ok and again.done == 2 and again.already == 2
    assert_kernel_holds(ipvs, ipvsadm, table)


def test_add_of_existing_objects_edits_them(ipvs: IPVSAdapter, ipvsadm: Run) -> None:
    table = make_table(1, 2)
    ipvs.apply(ops_for(table))
    (vs,) = table.values()
    wanted = make_vs(vs.key.address, scheduler="wlc", timeout=30)
    heavier = Dest(vs.dests[0].address, vs.dests[0].port, weight=7)
    result = ipvs.apply([AddVS(wanted), AddDest(vs.key, heavier)])
    assert result.ok and result.already == 2 and result.done == 2
    assert_kernel_holds(ipvs, ipvsadm, table_of(replace(wanted, dests=(heavier, vs.dests[1]))))


def test_failures_are_reported_per_op_and_the_batch_goes_on(
    ipvs: IPVSAdapter, ipvsadm: Run
) -> None:
    good = make_vs("10.96.7.1")
    missing = VSKey("10.96.7.2", "TCP", 80)
    bad_sched = make_vs("10.96.7.3", scheduler="nosuch")
    ops: list[Op] = [
        AddVS(good),
        AddDest(missing, Dest("10.244.0.1", 80)),
        AddVS(bad_sched),
        EditDest(good.key, Dest("10.244.0.2", 80)),
        AddDest(good.key, Dest("10.244.0.3", 80)),
    ]
    result = ipvs.apply(ops)
    failed = {type(f.op).__name__: f.errno for f in result.failures}
    assert set(failed) == {"AddDest", "AddVS", "EditDest"}
    assert failed["AddDest"] == errno.ESRCH
    assert failed["EditDest"] == errno.ENOENT
    assert result.done == 2
    assert_kernel_holds(ipvs, ipvsadm, table_of(replace(good, dests=(Dest("10.244.0.3", 80),))))
    with pytest.raises(IPVSOpError) as info:
        ipvs.apply_one(AddDest(missing, Dest("10.244.0.1", 80)))
    assert info.value.errno == errno.ESRCH


def test_batch_2000_services_x_10_real_servers(ipvs: IPVSAdapter, ipvsadm: Run) -> None:
    table = make_table(2000, 10)
    result = ipvs.apply(ops_for(table))
    assert result.ok, result.failures[:3]
    assert result.done == result.messages == 22000
    assert result.sends < 22000 / 100  # batched: far fewer datagrams than requests
    print(f"\n2000x10 via netlink batches: {result.seconds:.2f} s, {result.sends} sends")
    assert_kernel_holds(ipvs, ipvsadm, table)
    # and take it all down again in one batch
    down = ipvs.apply([DelVS(key) for key in table])
    assert down.ok and down.already == 0
    assert ipvs.dump() == {}
    assert parse_list(ipvsadm("-Ln")) == {}


def test_without_cap_net_admin_apply_raises(vm_netns: str) -> None:
    """EPERM is fatal: a process without CAP_NET_ADMIN gets IPVSPermissionError."""
    code = (
        "import sys\n"
        "from kproxy.backends.ipvs_netlink import IPVSAdapter, IPVSPermissionError\n"
        "from kproxy.render.ipvs import VirtualServer, VSKey\n"
        "from kproxy.render.ipvs_diff import AddVS\n"
        "try:\n"
        "    IPVSAdapter().apply([AddVS(VirtualServer(VSKey('10.96.0.1', 'TCP', 80), 'rr'))])\n"
        "except IPVSPermissionError as e:\n"
        "    print('EPERM', e); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    out = sh(
        "setpriv",
        "--inh-caps=-net_admin",
        "--bounding-set=-net_admin",
        sys.executable,
        "-c",
        code,
        netns=vm_netns,
    )
    assert out.startswith("EPERM")


# -- connections and counters -------------------------------------------------------------------
class Topology:
    """client netns -> node netns (IPVS, kube-ipvs0 with the VIP) -> pod netns (a TCP server)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.client = new_netns("kpvc")
        self.pod = new_netns("kpvp")
        script = f"""
        ip link add kpc0 netns {node} type veth peer name eth0 netns {self.client}
        ip link add kpp0 netns {node} type veth peer name eth0 netns {self.pod}
        ip -n {node} addr add 192.168.77.1/24 dev kpc0
        ip -n {node} addr add 10.250.0.1/24 dev kpp0
        ip -n {node} link set kpc0 up
        ip -n {node} link set kpp0 up
        ip -n {self.client} addr add 192.168.77.2/24 dev eth0
        ip -n {self.client} link set eth0 up
        ip -n {self.client} route add default via 192.168.77.1
        ip -n {self.pod} addr add 10.250.0.2/24 dev eth0
        ip -n {self.pod} link set eth0 up
        ip -n {self.pod} route add default via 10.250.0.1
        ip netns exec {node} sysctl -qw net.ipv4.ip_forward=1
        """
        sh("sh", "-ec", script)
        self.listener = netns_socket(self.pod, socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("10.250.0.2", 8080))
        self.listener.listen(16)
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.sendall(b"hello\n")
            self.accepted.append(conn)

    def connect(self, address: str, port: int) -> socket.socket:
        s = netns_socket(self.client, socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect((address, port))
        assert s.recv(16) == b"hello\n"
        return s

    def close(self) -> None:
        self.listener.close()
        for c in self.accepted:
            c.close()
        del_netns(self.client)
        del_netns(self.pod)


@pytest.fixture
def topology(vm_netns: str) -> Iterator[Topology]:
    topo = Topology(vm_netns)
    try:
        yield topo
    finally:
        topo.close()


def test_connection_counts_and_stats(
    vm_netns: str, ipvs: IPVSAdapter, ipvsadm: Run, topology: Topology
) -> None:
    vip = "10.96.5.5"
    sh("ip", "link", "add", "kube-ipvs0", "type", "dummy", netns=vm_netns)
    sh("ip", "address", "add", f"{vip}/32", "dev", "kube-ipvs0", netns=vm_netns)
    vs = make_vs(vip, 80, dests=[Dest("10.250.0.2", 8080)])
    ipvs.apply([AddVS(vs)])
    open_conns = [topology.connect(vip, 80) for _ in range(3)]
    open_conns.pop().close()  # one closed by the client: no longer active
    deadline = time.monotonic() + 10
    while True:
        dest = dest_of(ipvs.dump()[vs.key], "10.250.0.2", 8080)
        if dest.active == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert dest.active == 2
    assert dest.connections == 3  # the closed one lingers as inactive until it expires
    listed = parse_list(ipvsadm("-Ln"))[(vip, "TCP", 80)].dests[("10.250.0.2", 8080)]
    assert (listed.active, listed.inactive) == (dest.active, dest.inactive)
    # the kernel folds its per-CPU counters into the totals every 2 s (the rate estimator)
    deadline = time.monotonic() + 10
    while True:
        observed = ipvs.dump()[vs.key]
        assert observed.stats is not None
        if observed.stats.conns == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert observed.stats.conns == 3
    stats = parse_stats(ipvsadm("-Ln", "--stats", "--exact"))[(vip, "TCP", 80)]
    assert stats[0].conns == observed.stats.conns
    assert stats[0].inpkts >= observed.stats.inpkts > 0
    dest_stats = dest_of(observed, "10.250.0.2", 8080).stats
    assert dest_stats is not None
    assert stats[1][("10.250.0.2", 8080)].outbytes >= dest_stats.outbytes > 0
    # draining: weight 0 keeps the established connections, takes no new ones
    ipvs.apply_one(EditDest(vs.key, Dest("10.250.0.2", 8080, weight=0)))
    for c in open_conns:
        c.sendall(b"x")
    dest = dest_of(ipvs.dump()[vs.key], "10.250.0.2", 8080)
    assert dest.weight == 0 and dest.active == 2
    with pytest.raises(OSError):
        topology.connect(vip, 80)
    for c in open_conns:
        c.close()


# -- kube-ipvs0 --------------------------------------------------------------------------------
def _ip_addrs(netns: str, dev: str) -> set[str]:
    out = sh("ip", "-o", "addr", "show", "dev", dev, netns=netns)
    found = set()
    for line in out.splitlines():
        words = line.split()
        addr = words[words.index("inet" if "inet" in words else "inet6") + 1]
        if not addr.startswith("fe80:"):
            found.add(addr)
    return found


def test_kube_ipvs0_device_addresses(vm_netns: str) -> None:
    """kproxy.backends.ipvs_device.KubeIPVS0, run inside the namespace: create, bind, unbind and
    remove, checked against `ip` and the local routing table."""
    code = (
        "import json\n"
        "from kproxy.backends.ipvs_device import KubeIPVS0\n"
        "d = KubeIPVS0()\n"
        "steps = {'before': sorted(d.addresses(4) | d.addresses(6))}\n"
        "d.ensure(); d.ensure()\n"
        "d.bind(['10.96.0.1', 'fd00:96::1', '10.96.0.2'])\n"
        "steps['bound'] = sorted(d.addresses(4) | d.addresses(6))\n"
        "d.unbind(['10.96.0.2'])\n"
        "steps['unbound'] = sorted(d.addresses(4) | d.addresses(6))\n"
        "print(json.dumps(steps))\n"
    )
    steps = json.loads(sh(sys.executable, "-c", code, netns=vm_netns))
    assert steps == {
        "before": [],
        "bound": ["10.96.0.1", "10.96.0.2", "fd00:96::1"],
        "unbound": ["10.96.0.1", "fd00:96::1"],
    }
    assert _ip_addrs(vm_netns, "kube-ipvs0") == {"10.96.0.1/32", "fd00:96::1/128"}
    # the IPv4 VIP is local although the interface is down
    local = sh("ip", "route", "show", "table", "local", netns=vm_netns)
    assert "local 10.96.0.1 dev kube-ipvs0" in local
    gone = sh(
        sys.executable,
        "-c",
        "from kproxy.backends.ipvs_device import KubeIPVS0\nprint(KubeIPVS0().remove())",
        netns=vm_netns,
    )
    assert gone.strip() == "True"
    links = subprocess.run(
        ["ip", "-n", vm_netns, "link", "show", "kube-ipvs0"], capture_output=True, check=False
    )
    assert links.returncode != 0
