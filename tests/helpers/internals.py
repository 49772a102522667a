"""Checks that a third-party internal the code relies on is still there, failing with the
library's installed version so an upgrade that removed it is named at once."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import pytest


def require(library: str, present: bool, what: str) -> None:
    """Fail naming ``library`` and its installed version unless ``present``."""
    if not present:
        pytest.fail(f"{library} {version(library)}: {what} is gone or changed; the adapter "
                    "that relies on it needs updating (and the version pin in pyproject.toml)",
                    pytrace=False)


def require_attribute(library: str, owner: object, name: str) -> Any:
    """``owner.name``, failing naming ``library`` when it is missing."""
    require(library, hasattr(owner, name), f"{_name(owner)}.{name}")
    return getattr(owner, name)


def require_callable(library: str, owner: object, name: str, *arguments: Any,
                     **keywords: Any) -> Callable[..., Any]:
    """``owner.name``, failing naming ``library`` unless it is callable with ``arguments``
    (checked against its signature, not called)."""
    function = require_attribute(library, owner, name)
    require(library, callable(function), f"{_name(owner)}.{name} (not callable)")
    try:
        inspect.signature(function).bind(*arguments, **keywords)
    except TypeError as exc:
        require(library, False, f"{_name(owner)}.{name}{inspect.signature(function)} ({exc})")
    return function  # type: ignore[no-any-return]


def _name(owner: object) -> str:
    return getattr(owner, "__qualname__", type(owner).__qualname__)
