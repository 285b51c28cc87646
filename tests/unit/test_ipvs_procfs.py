"""/proc/net/ip_vs text -> the kernel's IPVS table (kproxy.backends.ipvs_procfs, pure)."""

from __future__ import annotations

from kproxy.backends import ipvs_procfs as procfs
from kproxy.render import ipvs as R

# ip_vs_info_seq_show's format (net/netfilter/ipvs/ip_vs_ctl.c), as Debian's 6.1 kernel prints it
TEXT = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600050:0050 rr
  -> 0AF4010D:0050      Masq    1      2          3
  -> 0AF4010C:0050      Masq    0      1          0
UDP  0A600050:0035 sh persistent 60 FFFFFFFF
  -> 0AF4010D:14E9      Masq    1      0          4
TCP  [fd00:0096:0000:0000:0000:0000:0000:0041]:01BB wrr
  -> [fd00:0244:0001:0000:0000:0000:0000:000d]:01BB      Masq    2      0          0
FWM  00000001 rr
  -> 0AF4010D:0000      Masq    1      0          0
TCP  C0A8320B:7594 rr
"""


def test_every_virtual_server_with_its_real_servers() -> None:
    table = procfs.parse(TEXT)
    assert set(table) == {
        R.VSKey("10.96.0.80", "TCP", 80),
        R.VSKey("10.96.0.80", "UDP", 53),
        R.VSKey("fd00:96::41", "TCP", 443),
        R.VSKey("192.168.50.11", "TCP", 30100),  # no real servers yet
    }  # the fwmark service is left out, as the netlink adapter leaves it out
    tcp = {(d.address, d.port): d for d in table[R.VSKey("10.96.0.80", "TCP", 80)]}
    assert set(tcp) == {("10.244.1.13", 80), ("10.244.1.12", 80)}
    draining = tcp[("10.244.1.12", 80)]
    assert (draining.weight, draining.active, draining.inactive) == (0, 1, 0)
    (dns,) = table[R.VSKey("10.96.0.80", "UDP", 53)]
    assert (dns.address, dns.port, dns.inactive, dns.forward) == ("10.244.1.13", 5353, 4, "masq")
    (v6,) = table[R.VSKey("fd00:96::41", "TCP", 443)]
    assert (v6.address, v6.port, v6.weight) == ("fd00:244:1::d", 443, 2)
    assert table[R.VSKey("192.168.50.11", "TCP", 30100)] == []
