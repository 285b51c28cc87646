"""`kproxy run` with one Service whose rules iptables-restore refuses (test-only).

Validation keeps such objects out of both sources (the API watch and the manifests), so the
only way to reach the dataplane with one is below them: this program runs the real Daemon and
puts a model Service with a 2,000-character name (rendered into rule comments longer than
iptables-restore's 1,024-character parameter limit) straight into its store, and back again
whenever a manifest reload replaces the services. Usage: the arguments of `kproxy run`, plus
--inject-ip IP (the refused service's cluster IP) and --inject-endpoint IP.
"""

from __future__ import annotations

import sys
import threading

from kproxy.cli import _parser, _settings, _setup_logging
from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice, Ref, Service, ServicePort
from kproxy.runtime.daemon import Daemon

BAD_NAME = "refused-" + "r" * 1992


def main(argv: list[str]) -> int:
    inject_ip = argv[argv.index("--inject-ip") + 1]
    endpoint = argv[argv.index("--inject-endpoint") + 1]
    for flag in ("--inject-ip", "--inject-endpoint"):
        i = argv.index(flag)
        del argv[i : i + 2]
    args = _parser().parse_args(argv)
    settings = _settings(args)
    _setup_logging(settings)
    daemon = Daemon(settings)
    bad = Service(
        namespace="default",
        name=BAD_NAME,
        cluster_ips=(inject_ip,),
        ports=(ServicePort(name="http", protocol="TCP", port=80, target_port=80),),
    )
    bad_slice = EndpointSlice(
        namespace="default",
        name="refused-abcde",
        service_name=BAD_NAME,
        endpoints=(Endpoint(address=endpoint),),
        ports=(EndpointPort("http", "TCP", 80),),
    )

    def keep_injected() -> None:
        while not daemon.stop_event.wait(0.1):
            snapshot = daemon.store.peek()
            if Ref("default", BAD_NAME) not in snapshot.services:
                daemon.store.set_service(bad)
            if not snapshot.slices_for(Ref("default", BAD_NAME)):
                daemon.store.set_slice(bad_slice)

    threading.Thread(target=keep_injected, daemon=True).start()
    return daemon.run()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
