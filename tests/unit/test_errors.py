"""Every exception kproxy defines for others to catch derives from kproxy.errors.KproxyError,
through one of its families, and keeps the builtin base its callers already catch."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import kproxy
from kproxy.errors import (
    ConfigError,
    DataplaneError,
    InputError,
    KproxyError,
    SourceError,
)


def _public_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(kproxy.__path__, "kproxy."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[f"{obj.__module__}.{name}"] = obj
    return [found[k] for k in sorted(found)]


# flow control inside one module, not errors: the probe's "told to stop", and the lab's
# subprocess error (a CalledProcessError, so callers keep its returncode/stderr)
NOT_ERRORS = {"kproxy.lab.probe.Stopped", "kproxy.lab.netlab.LabCommandError"}
EXCEPTIONS = [e for e in _public_exceptions() if f"{e.__module__}.{e.__name__}" not in NOT_ERRORS]


def test_there_are_exceptions_to_check() -> None:
    assert len(EXCEPTIONS) > 20


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=lambda e: f"{e.__module__}.{e.__name__}")
def test_every_public_exception_has_the_kproxy_root(exc: type[BaseException]) -> None:
    assert issubclass(exc, KproxyError)


@pytest.mark.parametrize(
    ("family", "builtin"),
    [(ConfigError, ValueError), (InputError, ValueError), (DataplaneError, RuntimeError)],
)
def test_families_keep_their_builtin_bases(
    family: type[KproxyError], builtin: type[Exception]
) -> None:
    assert issubclass(family, builtin)


def test_each_area_uses_its_family() -> None:
    from kproxy.backends.base import SyncError
    from kproxy.dns.wire import WireError
    from kproxy.kube.convert import InvalidObject
    from kproxy.kube.watch import KubeConfigError

    assert issubclass(SyncError, DataplaneError)
    assert issubclass(WireError, InputError)
    assert issubclass(InvalidObject, InputError)
    assert issubclass(KubeConfigError, SourceError)
