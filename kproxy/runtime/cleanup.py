"""`kproxy cleanup`: remove everything kproxy created (rules, chains, IPVS state, DNS addresses)."""

from __future__ import annotations

import logging

from kproxy.config import Settings
from kproxy.runtime.dataplane import cleanup_all

log = logging.getLogger("kproxy")


def cleanup_everything(settings: Settings) -> None:
    cleanup_all(settings)
    try:
        from kproxy.dns.placement import remove_listen_addresses

        remove_listen_addresses(settings.dns_listen)
    except ImportError:
        pass
    except Exception as err:
        log.warning("could not remove DNS listen addresses: %s", err)
    log.info("cleanup done")
