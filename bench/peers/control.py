"""The peer side of the harness protocol: say ready, answer JSON commands from stdin.

A peer prints ``{"ready": {...}}`` once it serves, then answers each JSON line on stdin with one
JSON line on stdout. End of stdin ends the peer.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]


def say(message: dict[str, Any]) -> None:
    """Write one JSON line to the harness."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve_commands(handler: Handler) -> None:
    """Answer commands until stdin closes."""
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        request = json.loads(line)
        answer = handler(request)
        if asyncio.iscoroutine(answer):
            answer = await answer
        say(answer)  # type: ignore[arg-type]
