"""The one place that reaches into the asyncua server's internals (the OPC-UA plant's only).

A stopped asyncua server keeps every session that has a subscription, for a reconnecting
client to take over, until the session times out; asyncua 2.1 has no public way to list or end
them. ``end_sessions`` walks the private ``InternalServer._external_sessions`` (auth token →
``InternalSession``) and closes each, deleting its subscriptions, so a stopped simulator leaves
nothing running.

The client's internals live in ``protocols/opcua/asyncua_adapter.py``: ``bridge`` never
imports a connector, so the server side has a door of its own. ``tests/opcua/
test_asyncua_adapter.py`` fails, naming the installed version, when this internal changes;
asyncua is pinned to its minor version in pyproject.toml.

May import asyncua only.
"""

from __future__ import annotations

from asyncua.server.server import Server


async def end_sessions(server: Server) -> None:
    """Close every session ``server`` still keeps, deleting their subscriptions."""
    for session in list(server.iserver._external_sessions.values()):
        await session.close_session(True)
