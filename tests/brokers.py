"""Helpers for tests against the local Mosquitto and RabbitMQ.

A broker that cannot be reached skips the test on a developer's machine and fails it under
CI (``CI=true``), where the brokers are part of the test environment. ``TcpProxy`` sits
between a source and a broker so a test can cut the connection without touching the shared
broker. ``SourceRun`` runs one configured source under the real supervisor, mapping its
readings exactly as the runtime does, into a router stand-in that records events and can
hold acknowledgements back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import yaml

from bridge.config import load_config
from bridge.model import Event
from bridge.router import Settlement
from bridge.runtime import Runtime
from bridge.source import SourceContext
from bridge.status import ConnectionState, EndpointStatus
from bridge.supervisor import Backoff, supervise

MQTT_HOST = os.environ.get("FIELDBRIDGE_TEST_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("FIELDBRIDGE_TEST_MQTT_PORT", "1883"))
AMQP_HOST = os.environ.get("FIELDBRIDGE_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("FIELDBRIDGE_TEST_AMQP_PORT", "5672"))
SETTLE = 10.0
"""Seconds any awaited condition may take before the test fails."""


def reachable(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` opens within a second."""
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True


def require_broker(name: str, host: str, port: int) -> None:
    """Skip the test when the broker is down; under CI, fail it instead."""
    if reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: brokers are required)")
    pytest.skip(message)


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


async def wait_until(predicate: Callable[[], bool], within: float = SETTLE,
                     what: str = "condition") -> None:
    """Wait until ``predicate()`` holds, checking every 10 ms; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def assert_no_tasks_left() -> None:
    """Fail if tasks other than the test's own are still running.

    aiomqtt cancels its housekeeping task with ``call_soon`` when it disconnects, so a
    few loop iterations are granted for such cancellations to complete.
    """
    current = asyncio.current_task()
    for _ in range(10):
        others = [task for task in asyncio.all_tasks() if task is not current]
        if not others:
            return
        await asyncio.sleep(0)
    pytest.fail(f"tasks left running: {[task.get_coro() for task in others]}")


class TcpProxy:
    """Forwards local TCP connections to a broker; ``cut()`` drops the current ones."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.connections = 0
        """Connections accepted so far."""
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    def cut(self) -> None:
        """Abort every open connection, both sides, as a network failure would."""
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()
                return
            self._transports.update((writer.transport, upstream_writer.transport))
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(reader, upstream_writer, writer))
                group.create_task(self._pipe(upstream_reader, writer, upstream_writer))
        finally:
            self._handlers.discard(task)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter,
                    other: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                target.write(data)
                await target.drain()
        except ConnectionError:
            pass
        finally:
            target.transport.abort()
            other.transport.abort()


class RecordingRouter:
    """Stands in for the router: records events and settles (or holds) acknowledgements."""

    def __init__(self, *, hold_acks: bool = False) -> None:
        self.events: list[Event] = []
        self.hold_acks = hold_acks
        self.held: list[Settlement] = []
        self.accepted = 0
        self.rejected: list[str] = []
        self._changed = asyncio.Event()

    async def submit(self, events: Sequence[Event], settlements: Sequence[Settlement] = ()) -> None:
        """Record ``events``; settle upstream messages now unless they are held."""
        self.events.extend(events)
        if self.hold_acks:
            self.held.extend(settlements)
        else:
            await self._settle(settlements)
        self._changed.set()

    async def _settle(self, settlements: Sequence[Settlement]) -> None:
        for ack, reason in settlements:
            if reason is None:
                await ack.accept()
                self.accepted += 1
            else:
                await ack.reject(reason)
                self.rejected.append(reason)

    async def release(self) -> None:
        """Settle the held messages, as the router does once events are stored."""
        held, self.held = self.held, []
        await self._settle(held)

    async def wait_for(self, predicate: Callable[[], bool], within: float = SETTLE,
                       what: str = "events") -> None:
        """Wait until ``predicate()`` holds after some publish; fail after ``within`` s."""
        try:
            async with asyncio.timeout(within):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"timed out after {within:g}s waiting for {what}; got "
                        f"{[(event.point, event.value) for event in self.events]}")

    async def wait_events(self, count: int, within: float = SETTLE) -> list[Event]:
        """The first ``count`` events, once they are there."""
        await self.wait_for(lambda: len(self.events) >= count, within, f"{count} events")
        return self.events[:count]


def write_config(path: Path, source: dict[str, Any], bridge_id: str = "test") -> Path:
    """Write a one-source configuration file and return its path."""
    path.write_text(yaml.safe_dump({"bridge": {"id": bridge_id}, "sources": [source]},
                                   sort_keys=False), encoding="utf-8")
    return path


class SourceRun:
    """One configured source under the supervisor, mapped as the runtime maps it."""

    def __init__(self, config_path: Path, *, hold_acks: bool = False) -> None:
        config = load_config(config_path)
        self.runtime = Runtime(config)
        self.router = RecordingRouter(hold_acks=hold_acks)
        self.runtime.router = self.router  # type: ignore[assignment]
        (self.running,) = self.runtime.sources.values()
        self._task: asyncio.Task[None] | None = None

    @property
    def status(self) -> EndpointStatus:
        """The source's live status."""
        return self.running.status

    @property
    def events(self) -> list[Event]:
        """Events recorded so far."""
        return self.router.events

    async def __aenter__(self) -> SourceRun:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def start(self) -> None:
        """Start the supervised source."""
        context = SourceContext(status=self.status, publish=self.runtime.publisher(self.running))
        self._task = asyncio.create_task(
            supervise(self.running.unit.source, context, Backoff(initial=0.05, maximum=0.5)),
            name=f"test[{self.running.unit.source.id}]")

    async def stop(self) -> None:
        """Cancel the source and wait until it has closed its connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def up(self, within: float = SETTLE) -> None:
        """Wait until the source is connected (and subscribed or consuming)."""
        await wait_until(lambda: self.status.state is ConnectionState.UP, within,
                         f"source up (last error: {self.status.last_error})")
