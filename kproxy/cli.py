"""The `kproxy` command: run the agent, clean up, and look at what it does.

Subcommands: run, cleanup, render, status, explain, demo, config-reference, version.
`kproxy` with flags and no subcommand behaves like `kproxy run` (as kube-proxy does), so a
kube-proxy command line can be reused.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from kproxy import __version__
from kproxy.config import MODES, ConfigError, Settings, build_parser, resolve

log = logging.getLogger("kproxy")

DEMO_MODES = tuple(m for m in MODES if m != "ipvs")  # the demo's namespaces have no IPVS

SUBCOMMANDS = (
    "run",
    "cleanup",
    "render",
    "status",
    "explain",
    "demo",
    "config-reference",
    "version",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kproxy",
        description="A userspace Kubernetes node agent: kube-proxy (iptables/IPVS) + node DNS.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the agent (the default)")
    build_parser(run)
    cleanup = sub.add_parser("cleanup", help="remove every rule, chain, VIP kproxy created")
    build_parser(cleanup)
    render = sub.add_parser("render", help="print the rules that would be applied (no root)")
    build_parser(render)
    render.add_argument("--family", type=int, choices=(4, 6), default=4)
    status = sub.add_parser(
        "status",
        help="services -> programmed backends, read back (wanted state: the running agent's, "
        "or the source the flags name)",
    )
    build_parser(status)
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    explain = sub.add_parser("explain", help="trace a packet through kproxy's live rules")
    build_parser(explain)
    explain.add_argument("target", help="IP:PORT[/PROTO], e.g. 10.96.100.50:3306/tcp")
    explain.add_argument("--from", dest="source", default="", help="source IP of the packet")
    explain.add_argument("-o", "--output", choices=("text", "json"), default="text")
    demo = sub.add_parser("demo", help="a throwaway namespace lab with kproxy in it (root)")
    demo.add_argument("--keep", action="store_true", help="leave the lab up (Ctrl-C to end)")
    demo.add_argument("--proxy-mode", default="iptables", choices=DEMO_MODES)
    sub.add_parser("config-reference", help="print the configuration reference (Markdown)")
    sub.add_parser("version", help="print the version")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return resolve(args)
    except ConfigError as err:
        print(f"kproxy: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _setup_logging(settings: Settings) -> None:
    from kproxy.logs import setup_logging

    setup_logging(
        verbosity=settings.verbosity, fmt="json" if settings.log_format == "json" else "text"
    )


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings)
    for ignored in settings.ignored:
        log.info("config field %s is accepted for compatibility and ignored", ignored)
    if settings.cleanup:
        return cmd_cleanup(args)
    from kproxy.errors import KubeConfigError
    from kproxy.runtime.daemon import Daemon

    try:
        daemon = Daemon(settings)
    except KubeConfigError as err:
        log.error("cannot reach the Kubernetes API: %s", err)
        return 2
    _exit_now(daemon.run())


def _exit_now(code: int) -> NoReturn:
    """End the process once the daemon has stopped (its threads, sockets and child processes
    are closed): flush the logs and exit without tearing down the interpreter, whose ~1,200
    modules and ~100,000 objects (most of them the Kubernetes client's) take up to a second."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_cleanup(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings)
    from kproxy.runtime.cleanup import cleanup_everything

    cleanup_everything(settings)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from kproxy.inspect.render import render_command

    return render_command(_settings(args), family=args.family)


def cmd_status(args: argparse.Namespace) -> int:
    from kproxy.inspect.status import status_command
    from kproxy.inspect.wanted import for_command

    wanted = for_command(args, "status", required=True)
    assert wanted is not None
    return int(status_command(wanted, output=args.output))


def cmd_explain(args: argparse.Namespace) -> int:
    from kproxy.inspect.explain import explain_command
    from kproxy.inspect.wanted import for_command

    # without an agent or source flags, explain still traces the kernel's rules
    wanted = for_command(args, "explain", required=False)
    settings = wanted.settings if wanted is not None else _settings(args)
    return int(
        explain_command(
            settings, target=args.target, source=args.source, output=args.output, wanted=wanted
        )
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from kproxy.lab.demo import run_demo

    return run_demo(keep=args.keep, proxy_mode=args.proxy_mode)


def cmd_reference(args: argparse.Namespace) -> int:
    from kproxy.config import reference_markdown

    sys.stdout.write(reference_markdown())
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"kproxy {__version__}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    handlers = {
        "run": cmd_run,
        "cleanup": cmd_cleanup,
        "render": cmd_render,
        "status": cmd_status,
        "explain": cmd_explain,
        "demo": cmd_demo,
        "config-reference": cmd_reference,
        "version": cmd_version,
    }
    try:
        return int(handlers[args.command](args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
