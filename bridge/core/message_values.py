"""Value conversion for message payloads: declared types and payload timestamps.

A JSON or text message point may declare what its value must be (``number``, ``integer``,
``bool``, ``string``); ``convert`` turns a payload value into it or says why it cannot. A
payload timestamp (ISO 8601 text, epoch seconds or milliseconds) becomes POSIX seconds with
``payload_timestamp``.

May import: ``bridge.core.model``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from bridge.core.model import parse_timestamp

_LATEST_TIMESTAMP = 253402300799.0
"""9999-12-31T23:59:59Z: later payload timestamps are taken as garbage."""


_TRUE = frozenset({"true", "on", "yes", "1"})
_FALSE = frozenset({"false", "off", "no", "0"})


def convert(value: Any, declared: str) -> Any:
    """``value`` as the ``declared`` type; ``ValueError`` saying why when it is not one."""
    if declared == "string":
        if isinstance(value, bool):
            return "true" if value else "false"
        return value if isinstance(value, str) else json.dumps(value)
    if declared == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"expected a bool, got {quoted(repr(value))}")
    number: int | float
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a{'n integer' if declared == 'integer' else ' number'}, "
                         f"got {quoted(repr(value))}")
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"expected a{'n integer' if declared == 'integer' else ' number'}"
                                 f", got {quoted(repr(value))}") from None
    else:
        number = value
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {quoted(repr(value))}")
    if declared == "integer":
        if isinstance(number, float):
            if not number.is_integer():
                raise ValueError(f"expected an integer, got {quoted(repr(value))}")
            return int(number)
        return number
    return number


def quoted(text: str, limit: int = 40) -> str:
    """``text`` in quotes, cut at ``limit`` characters: a payload excerpt for a reason."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def payload_timestamp(value: Any, form: str) -> float:
    """A payload timestamp to POSIX seconds; ``ValueError`` when it is not one."""
    if form == "iso8601":
        if not isinstance(value, str):
            raise ValueError(f"expected ISO 8601 text, got {quoted(repr(value))}")
        seconds = parse_timestamp(value)
    else:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected a number, got {quoted(repr(value))}")
        number = float(value)
        seconds = number / 1000.0 if form == "epoch_ms" else number
    if not math.isfinite(seconds) or not 0 <= seconds <= _LATEST_TIMESTAMP:
        raise ValueError(f"{quoted(repr(value))} is out of range")
    return seconds

