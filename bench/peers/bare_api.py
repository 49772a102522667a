"""Baseline for S5: the web stack alone (FastAPI on uvicorn, as the daemon configures it)
serving 10,000 small JSON objects from a dict, with nothing of Fieldbridge in the way.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any

import pydantic_core
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

from bench.peers.control import say, serve_commands


class JsonBody(Response):
    """Compact JSON serialized in Rust, as the daemon's API does."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """The body."""
        return pydantic_core.to_json(content)


def app(points: int) -> FastAPI:
    """An app serving ``points`` values by id."""
    api = FastAPI()
    values = {f"dev.p{index:05d}": {"id": f"dev.p{index:05d}", "value": index, "unit": None,
                                    "quality": "good", "ts": "2026-01-01T00:00:00.000Z"}
              for index in range(points)}

    @api.get("/v1/points/{point_id}")
    async def point(point_id: str) -> JsonBody:
        value = values.get(point_id)
        if value is None:
            raise HTTPException(404)
        return JsonBody(value)

    return api


async def main() -> None:
    """Serve on a free port until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=10_000)
    options = parser.parse_args()
    # IPPROTO_TCP, as the daemon binds: asyncio sets TCP_NODELAY only then (else small
    # responses wait for a delayed ACK and the baseline would measure 40 ms stalls).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app(options.points), log_config=None, lifespan="off",
                            server_header=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.05)
    say({"ready": {"port": sock.getsockname()[1]}})
    await serve_commands(lambda request: {"ok": True})
    server.should_exit = True
    await task


if __name__ == "__main__":
    asyncio.run(main())
