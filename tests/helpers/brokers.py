"""Helpers for tests against the local Mosquitto and RabbitMQ.

A broker that cannot be reached skips the test on a developer's machine and fails it under
CI (``CI=true``), where the brokers are part of the test environment. ``TcpProxy`` sits
between a connector and a broker so a test can cut the connection, or refuse new ones, without
touching the shared broker. ``SourceRun`` runs one configured source under the real supervisor,
mapping its readings exactly as the runtime does, into a router stand-in that records events
and can hold acknowledgements back. ``BridgeRun`` runs a whole runtime (without its API);
``RabbitAdmin`` arranges and inspects a test's queues over a blocking connection.
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

import pika
import pika.exceptions
import pytest
import yaml

from bridge.api.server import ApiServer
from bridge.core.model import Event, Settlement
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.inventory import RunningSink
from bridge.pipeline.supervisor import Backoff, supervise
from bridge.registry import load_config
from bridge.runtime import Runtime, ServiceFactory

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


async def wait_on(changed: asyncio.Event, predicate: Callable[[], bool], within: float,
                  what: Callable[[], str]) -> None:
    """Wait until ``predicate()`` holds, checked whenever ``changed`` is set; fail after
    ``within`` s, saying what was awaited (and what there is) with ``what()``."""
    try:
        async with asyncio.timeout(within):
            while not predicate():
                changed.clear()
                await changed.wait()
    except TimeoutError:
        pytest.fail(f"timed out after {within:g}s waiting for {what()}")


def write_sink_config(tmp_path: Path, sink: dict[str, Any], **top: Any) -> Path:
    """Write a configuration with one sink (bridge ``edge``, its state under ``tmp_path``, no
    API) and return its path; ``top`` adds top-level sections (``sources``, ``outbox``)."""
    document = {"bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
                "api": {"enabled": False}, "sinks": [sink], **top}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


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
        self.paused = False
        """Refuse new connections (close them at once), as a broker that is down would."""
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

    def pause(self) -> None:
        """Cut the open connections and refuse new ones until ``resume()``."""
        self.paused = True
        self.cut()

    def resume(self) -> None:
        """Forward new connections again."""
        self.paused = False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            if self.paused:
                writer.transport.abort()
                return
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


class RabbitAdmin:
    """A blocking pika connection for arranging and inspecting a test's queues."""

    def __init__(self) -> None:
        self.connection = pika.BlockingConnection(
            pika.ConnectionParameters(AMQP_HOST, AMQP_PORT))
        self.channel = self.connection.channel()
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def publish(self, routing_key: str, body: bytes | str, *, headers: dict[str, Any] | None = None,
                timestamp: int | None = None) -> None:
        """Publish to ``amq.topic``."""
        self.channel.basic_publish(
            "amq.topic", routing_key, body.encode() if isinstance(body, str) else body,
            pika.BasicProperties(headers=headers, timestamp=timestamp))

    def ready(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting delivered, unacknowledged ones); 0 while
        nobody has declared it yet."""
        frame = self._inspect(queue)
        return int(frame.method.message_count) if frame is not None else 0

    def _inspect(self, queue: str) -> Any:
        """The passive declare of ``queue``; ``None`` when it does not exist (yet)."""
        channel = self.connection.channel()
        try:
            return channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            return None
        finally:
            if channel.is_open:
                channel.close()

    def consumers(self, queue: str) -> int:
        """Consumers of ``queue``; 0 while nobody has declared it yet."""
        frame = self._inspect(queue)
        return int(frame.method.consumer_count) if frame is not None else 0

    def get(self, queue: str) -> tuple[Any, bytes] | None:
        """Take one message from ``queue``."""
        method, properties, body = self.channel.basic_get(queue, auto_ack=True)
        return None if method is None else (properties, body)

    def close(self) -> None:
        """Delete what the test declared, then disconnect; after the broker dropped the
        connection (an outage, say) on a new one."""
        try:
            self._delete_declared()
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError):
            if self.connection.is_open:
                self.connection.close()
            self.connection = pika.BlockingConnection(
                pika.ConnectionParameters(AMQP_HOST, AMQP_PORT))
            self.channel = self.connection.channel()
            self._delete_declared()
        self.connection.close()

    def _delete_declared(self) -> None:
        if not self.channel.is_open:
            self.channel = self.connection.channel()
        for queue in self.queues:
            self.channel.queue_delete(queue)
        for exchange in self.exchanges:
            self.channel.exchange_delete(exchange)

    def drain(self, queue: str, count: int, *, within: float = SETTLE,
              arguments: dict[str, Any] | None = None) -> list[Delivery]:
        """Consume (and acknowledge) ``count`` messages from ``queue``; fail after ``within`` s.

        Blocks: call it once the messages are published, or from a test whose bridge runs in
        another process.
        """
        channel = self.connection.channel()
        channel.basic_qos(prefetch_count=500)
        deliveries: list[Delivery] = []
        deadline = time.monotonic() + within
        try:
            for method, properties, body in channel.consume(queue, arguments=arguments,
                                                            inactivity_timeout=0.2):
                if method is not None:
                    deliveries.append(Delivery(method.routing_key, properties, body))
                    channel.basic_ack(method.delivery_tag)
                if len(deliveries) >= count:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"timed out after {within:g}s: {len(deliveries)} of {count} "
                                f"messages from {queue}")
        finally:
            channel.cancel()
            channel.close()
        return deliveries

    def declared_as(self, queue: str, arguments: dict[str, Any]) -> bool:
        """Whether ``queue`` exists with exactly these declare arguments (re-declaring it
        with them is accepted; the broker refuses one that differs with 406)."""
        channel = self.connection.channel()
        try:
            channel.queue_declare(queue, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 406:
                return False
            raise
        channel.close()
        return True


class Delivery:
    """A consumed message."""

    def __init__(self, routing_key: str, properties: Any, body: bytes) -> None:
        self.routing_key = routing_key
        self.properties = properties
        self.body = body

    @property
    def message_id(self) -> str:
        """The ``message_id`` property: the event id."""
        return str(self.properties.message_id)


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
        await wait_on(self._changed, predicate, within, lambda: (
            f"{what}; got {[(event.point, event.value) for event in self.events]}"))

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
        context = self.runtime.source_context(self.running)
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


class BridgeRun:
    """A whole runtime (sources, router, store, sinks; the API if asked) running as a task."""

    def __init__(self, config_path: Path, *, serve_api: bool = False) -> None:
        self.runtime = Runtime(load_config(config_path))
        self.services: list[ServiceFactory] = [ApiServer] if serve_api else []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BridgeRun:
        self._task = asyncio.create_task(self.runtime.run(services=self.services),
                                         name="test.bridge")
        ready = asyncio.create_task(self.runtime.ready.wait(), name="test.ready")
        done, _ = await asyncio.wait({ready, self._task}, timeout=SETTLE,
                                     return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._task in done:
            self._task.result()
        assert ready in done, "the runtime did not get ready"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop the runtime and wait until it has closed its store."""
        if self._task is not None:
            self.runtime.stop()
            async with asyncio.timeout(SETTLE):
                await self._task
            self._task = None

    def sink(self, sink_id: str) -> RunningSink:
        """A configured sink."""
        return self.runtime.sinks[sink_id]

    def depth(self, sink_id: str) -> int:
        """Events waiting in the sink's outbox."""
        return self.runtime.outbox.depths[sink_id].events

    async def delivered(self, sink_id: str, count: int, within: float = SETTLE) -> None:
        """Wait until the broker confirmed ``count`` events and the outbox is empty."""
        status = self.sink(sink_id).status
        await wait_until(lambda: status.counters["confirmed"] >= count
                         and self.depth(sink_id) == 0, within,
                         f"{count} confirmed events (state {status.state}, last error "
                         f"{status.last_error}, counters {status.counters.to_dict()})")
