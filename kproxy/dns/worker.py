"""A DNS serving process: `python -m kproxy.dns.worker --protocol N --udp FD,.. --tcp FD,..`.

The daemon (`DNSService`) opens the sockets and starts one or more of these processes, so that
DNS answers never wait for the daemon's GIL while it renders and applies proxy rules. Protocol:

- parent -> worker, on stdin: frames of a 4-byte big-endian length and a pickle:
  ("init", DNSOptions, upstreams[, seq, full ModelDelta]), then ("delta", seq, ModelDelta)...,
  then ("stop",). A restarted worker gets the whole model in its init frame and builds its
  index before it starts reading its sockets.
- worker -> parent, on stdout: one JSON object per line: {"event": "started"},
  {"event": "applied", "seq": n, "generation": g, "synced": b}, {"event": "stats", ...}.

End of stdin (the daemon died) stops the worker. `--protocol` is the daemon's
`frames.PROTOCOL`: on a mismatch the worker reads nothing, writes one line to stderr and
{"event": "protocol_mismatch", "daemon": .., "worker": ..} to stdout, and exits with
`EXIT_PROTOCOL`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from kproxy import memtrim
from kproxy.dns.frames import EXIT_PROTOCOL, PROTOCOL, read_frame


def _fds(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    from kproxy.dns.engine import Engine

    memtrim.limit_arenas()  # before any thread starts: as in the daemon
    parser = argparse.ArgumentParser(prog="kproxy-dns-worker")
    parser.add_argument("--udp", default="")
    parser.add_argument("--tcp", default="")
    parser.add_argument("--protocol", default="")
    # known args only: the version check must come first, whatever else a daemon passes
    args, _ = parser.parse_known_args(argv)
    if args.protocol != str(PROTOCOL):
        theirs = args.protocol or "1 (unversioned)"
        sys.stderr.write(
            f"kproxy dns-worker[{os.getpid()}] ERROR: the daemon speaks DNS worker protocol "
            f"{theirs}, this worker {PROTOCOL}: kproxy was upgraded while the daemon ran; "
            "restart kproxy\n"
        )
        sys.stdout.write(
            json.dumps({"event": "protocol_mismatch", "daemon": theirs, "worker": PROTOCOL}) + "\n"
        )
        sys.stdout.flush()
        return EXIT_PROTOCOL
    logging.basicConfig(
        level=logging.INFO, format=f"kproxy dns-worker[{os.getpid()}] %(levelname)s %(message)s"
    )
    # The daemon decides when a worker stops (a "stop" frame, or the pipe closing when the
    # daemon dies). systemd's SIGTERM to the whole unit must not kill workers first: the
    # daemon would see them die and restart them during its own shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    out_lock = threading.Lock()

    def emit(obj: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    init = read_frame(stdin)
    if not init or init[0] != "init":
        return 2
    options, upstreams = init[1], init[2]
    udp = [socket.socket(fileno=fd) for fd in _fds(args.udp)]
    tcp = [socket.socket(fileno=fd) for fd in _fds(args.tcp)]
    engine = Engine(options, udp=udp, tcp=tcp, upstreams=upstreams)

    def apply(seq: int, delta: Any) -> None:
        # The index is hundreds of thousands of small acyclic objects: a cyclic GC pass over
        # them mid-build doubles the build time and stalls answers, so build without it and
        # move the survivors out of the collector's sight.
        gc.disable()
        try:
            index = engine.apply(delta, consume=True)
        finally:
            gc.freeze()
            gc.enable()
        emit(
            {"event": "applied", "seq": seq, "generation": index.generation, "synced": index.synced}
        )

    if len(init) > 3:  # a restarted worker: serve only once the index is complete
        apply(init[3], init[4])
    del init
    memtrim.trim()
    engine.start()
    emit({"event": "started", "pid": os.getpid()})

    done = threading.Event()

    def report() -> None:
        last: dict[str, int] = {}
        while not done.wait(1.0):
            stats = engine.stats()
            if stats != last:
                emit({"event": "stats", "stats": stats})
                last = stats

    threading.Thread(target=report, name="dns-stats", daemon=True).start()
    try:
        while True:
            msg = read_frame(stdin)
            if msg is None or msg[0] == "stop":
                break
            if msg[0] == "delta":
                apply(msg[1], msg[2])
            del msg  # the delta's slices are garbage once applied: not kept until the next frame
            memtrim.trim()  # the previous index's and the delta's pages go back to the kernel
    finally:
        done.set()
        engine.stop()
        emit({"event": "stats", "stats": engine.stats()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
