"""Helpers for the discovery tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

CONSOLE_BODIES: dict[str, dict[str, Any]] = {
    "opcua": {"url": "opc.tcp://127.0.0.1:4840/", "depth": 3},
    "modbus": {"host": "127.0.0.1", "port": 502, "units": "1,2",
               "tables": "holding,input,coil,discrete", "range": "0-99"},
    "mqtt": {"host": "127.0.0.1", "port": 1883, "filter": "#", "seconds": 10},
}
"""The bodies the console's discovery form sends, by protocol: its default values, with
the URL or the host filled in (and the unit ids "1, 2"). ``tests/system/test_console.py`` checks
that the console sends exactly these; ``tests/api/test_discover_api.py`` that the route takes
their shape."""


async def in_thread(function: Callable[..., T], *arguments: Any) -> T:
    """Run a blocking function (the command, which runs its own event loop) in a thread that
    is gone afterwards."""
    with ThreadPoolExecutor(1) as executor:
        return await asyncio.get_running_loop().run_in_executor(executor, function, *arguments)
