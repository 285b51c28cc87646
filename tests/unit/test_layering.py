"""The import contract of kproxy's packages, checked on the source (every import statement,
including those inside functions):

    cli > runtime > inspect > (backends | kube | dns | lab) > (render | lb) > model

A package may import itself and anything to its right, and every package may import `errors`
(the root of kproxy's exceptions); `config`, `logs` and `metrics` are
support modules for the layers that wire things together (cli, runtime, inspect) and for
`lab` (the demo runs the agent). `model` and `render` are pure: standard library only, and no
module that does I/O, so every decision and every rendered rule can be unit-tested and traced.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "kproxy"

# package -> the kproxy packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "model": set(),
    "render": {"model"},
    "lb": {"model"},
    "config": {"model", "lb"},
    "logs": set(),
    "metrics": set(),
    "memtrim": set(),
    "deferinit": set(),
    "backends": {"render", "lb", "model"},
    "kube": {"render", "lb", "model"},
    "dns": {"model", "__init__", "memtrim", "backends"},  # placement: backends.rtnetlink
    "lab": {"config", "logs", "metrics", "model"},
    "inspect": {
        "backends",
        "kube",
        "dns",
        "lab",
        "lb",
        "render",
        "model",
        "config",
        "logs",
        "metrics",
    },
    "runtime": {
        "__init__",
        "memtrim",
        "inspect",
        "lb",
        "backends",
        "kube",
        "dns",
        "render",
        "model",
        "config",
        "logs",
        "metrics",
    },
    "cli": {
        "lb",
        "runtime",
        "inspect",
        "backends",
        "kube",
        "dns",
        "lab",
        "render",
        "model",
        "config",
        "logs",
        "metrics",
        "__init__",
    },
    "__main__": {"cli"},
    "errors": set(),
    "__init__": {"deferinit"},
}
PURE = {"model", "render"}
IO_MODULES = {
    "socket",
    "subprocess",
    "os",
    "select",
    "selectors",
    "shutil",
    "urllib",
    "http",
    "pathlib",
    "ctypes",
    "asyncio",
}


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`."""
    parts = ("kproxy", *path.relative_to(ROOT).with_suffix("").parts)
    return _imports_in(path.read_text(encoding="utf-8"), parts)


def _violations(pkg: str, imports: list[tuple[int, str]]) -> list[str]:
    bad = []
    for line, name in imports:
        if not name.startswith("kproxy"):
            continue
        parts = name.split(".")
        target = parts[1] if len(parts) > 1 else "__init__"
        if target != pkg and target not in ALLOWED[pkg] and target != "errors":
            bad.append(f"line {line}: {pkg} imports {name}")
    return bad


def _imports_in(text: str, pkg_parts: tuple[str, ...]) -> list[tuple[int, str]]:
    tree = ast.parse(text)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level]
                name = ".".join((*base, node.module or ""))
            else:
                name = node.module or ""
            if name == "kproxy":  # `from kproxy import x`: a module, or a name of __init__
                out.extend(
                    (node.lineno, f"kproxy.{a.name}" if _is_module(a.name) else "kproxy")
                    for a in node.names
                )
            else:
                out.append((node.lineno, name))
    return out


def _is_module(name: str) -> bool:
    return (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file()


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_package_has_a_place_in_the_contract() -> None:
    assert {_package(p) for p in SOURCES} <= set(ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path: Path) -> None:
    bad = _violations(_package(path), _imports(path))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if _package(p) in PURE],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_model_and_render_are_pure(path: Path) -> None:
    bad = []
    for line, name in _imports(path):
        top = name.split(".")[0]
        if top in ("kproxy", "__future__"):
            continue
        if top not in sys.stdlib_module_names:
            bad.append(f"line {line}: third-party import {name}")
        elif top in IO_MODULES:
            bad.append(f"line {line}: I/O module {name}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_violations() -> None:
    """The contract can fail: upward and relative imports are resolved and caught."""
    text = (
        "from kproxy.runtime.daemon import Daemon\n\ndef f():\n    from ..inspect import status\n"
    )
    found = _imports_in(text, ("kproxy", "render", "probe"))
    assert [n for _, n in found] == ["kproxy.runtime.daemon", "kproxy.inspect"]
    assert len(_violations("render", found)) == 2
    assert _violations("cli", found) == []
