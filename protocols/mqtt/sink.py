"""The MQTT sink: publishes the outbox to a broker, one JSON event per message, pipelined.

The delivery engine (``bridge.pipeline.delivery``) hands the sink rows in ``seq`` order with
at most ``window`` of them unconfirmed. The sink publishes them through the paho client under
aiomqtt without waiting (``paho_adapter.publish_now``), remembers the packet id of each, and turns
paho's ``on_publish`` back into rows for the engine: for QoS 1 that is the broker's PUBACK, for
QoS 2 its PUBCOMP, for QoS 0 the moment the message was written to the connection. An MQTT 5
PUBACK with a failure reason code (not authorized, quota exceeded) is a refusal: the engine
publishes the message again, in order, after ``retry``. A lost connection ends the connection
(``SinkContext.failed``); the engine publishes what was in flight again on the next one.

Every connection starts a clean session with a stable client id: the outbox, not the broker,
keeps what is not yet acknowledged, and a new paho client numbers its packets from 1 again, so
a persistent session could hold a QoS 2 packet id from the previous connection and take a new
message for the old one.

Sparkplug B (``protocols/mqtt/sparkplug*.py``) is a subclass. What it overrides is marked
"Override point" below; the rest of the connection (TLS, credentials, the paho callbacks, the
window) stays here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.core.model import Event
from bridge.core.sink import OutboxRow, Sink, SinkContext, compile_address
from bridge.errors import ConnectorError, ErrorCategory
from protocols.mqtt import paho_adapter
from protocols.mqtt.connection import (
    ClientFactory,
    client_arguments,
    connector_error,
    subscribe,
)
from protocols.mqtt.sink_config import MqttSinkConfig
from protocols.mqtt.source import PROTOCOL

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"

_LEVEL_ESCAPES = str.maketrans({"%": "%25", "/": "%2F", "+": "%2B", "#": "%23", "\0": "%00"})


def escape_level(value: str) -> str:
    """``value`` as exactly one topic level: ``%``, ``/``, ``+`` and ``#`` percent-encoded
    (``%25``, ``%2F``, ``%2B``, ``%23``; and NUL, which no topic may hold, ``%00``), so it can
    be read back unambiguously."""
    return value.translate(_LEVEL_ESCAPES)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One MQTT message to publish, and the outbox rows it carries."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    seqs: tuple[int, ...] = ()
    """Outbox rows confirmed (``SinkContext.confirmed``) once the broker took this message, or
    refused when it refused it; empty for a message of the sink's own (a birth, say)."""
    properties: Properties | None = None
    """MQTT 5 publish properties."""


class _Connection:
    """One connection's state: the client, and the rows of each publish awaiting its ack."""

    def __init__(self, context: SinkContext) -> None:
        self.context = context
        self.exits = contextlib.AsyncExitStack()
        self.client: aiomqtt.Client | None = None
        self.receiver: asyncio.Task[None] | None = None
        self.receive_maximum: int | None = None
        """The broker's Receive Maximum (MQTT 5 CONNACK), if it sent one."""
        self.pending: dict[int, tuple[int, ...]] = {}
        """Packet id → the outbox rows its message carries, until paho reports it published."""

    def published(self, mid: int, reason: ReasonCode) -> None:
        """paho's ``on_publish``: acknowledged (QoS 1, 2) or written (QoS 0)."""
        seqs = self.pending.pop(mid, None)
        if seqs is None:
            return  # a message of the sink's own, or one aiomqtt's publish() awaits
        if reason.is_failure:
            self.context.refused(seqs)
        else:
            self.context.confirmed(seqs)

    def connected(self, properties: Properties | None) -> None:
        """paho's ``on_connect``: remember the broker's Receive Maximum."""
        self.receive_maximum = getattr(properties, "ReceiveMaximum", None)


class MqttSink(Sink):
    """Publishes every event of its outbox to an MQTT broker, one JSON message per event."""

    refusal = "PUBACK with a failure reason code; may the bridge publish to that topic?"

    def __init__(
        self,
        config: MqttSinkConfig,
        *,
        bridge_id: str,
        client_factory: ClientFactory = aiomqtt.Client,
    ) -> None:
        super().__init__(config, endpoint=config.endpoint())
        self.config = config
        self.bridge_id = bridge_id
        self.client_id = config.client_id or f"fieldbridge-{bridge_id}-sink-{config.id}"
        """Stable across restarts, so the broker's ACLs and logs can name the bridge."""
        self.window = config.pipeline()
        self.retry = config.retry
        self.topic = compile_address(config.topic, escape_level)
        self._client_factory = client_factory
        self._properties: Properties | None = None
        if config.mqtt_version == "5":
            self._properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            self._properties.ContentType = CONTENT_TYPE
            self._properties.PayloadFormatIndicator = 1  # UTF-8
        self._connection: _Connection | None = None

    def address(self, event: Event) -> str:
        """The event's topic, from the ``topic`` template (each placeholder one level).

        Override point: computed once, when the event is stored, and kept in the outbox row as
        ``OutboxRow.address`` for ``messages``.
        """
        return self.topic(event)

    def details(self) -> dict[str, Any]:
        """The window and the client id."""
        return {"window": self.window, "client_id": self.client_id}

    # --- override points -----------------------------------------------------------------

    def will(self) -> aiomqtt.Will | None:
        """Override point: the last will the broker publishes when the connection is lost
        without a DISCONNECT; asked again before every connect. The JSON sink has none."""
        return None

    def subscriptions(self) -> Sequence[tuple[str, int]]:
        """Override point: topic filters (with their QoS) subscribed to on every connect,
        before ``on_connected``; each message on them goes to ``on_command``. The JSON sink
        subscribes to nothing."""
        return ()

    async def on_connected(self) -> None:
        """Override point: runs once the broker accepted the connection and the subscriptions,
        before the outbox is delivered (publish birth messages here, with ``send`` or an
        awaited ``self.client.publish``). Raise ``ConnectorError`` to fail the connection."""

    def messages(self, rows: Sequence[OutboxRow]) -> Iterable[OutgoingMessage]:
        """Override point: the messages that deliver ``rows`` (given in ``seq`` order, each row's
        ``body`` the event's JSON and ``address`` its topic from ``address``), in the order they
        are to be published. Every row's ``seq`` must be in exactly one message's ``seqs`` (or
        be ``settle``d): the row leaves the outbox when that message is acknowledged. JSON: one
        message per row."""
        qos, retain, properties = self.config.qos, self.config.retain, self._properties
        return [OutgoingMessage(row.address, row.body.encode(), qos, retain, (row.seq,),
                                properties) for row in rows]

    async def on_command(self, message: aiomqtt.Message) -> None:
        """Override point: a message arrived on one of ``subscriptions``. Runs in the
        connection's receiving task, one message at a time; raise ``ConnectorError`` to fail
        the connection. The JSON sink subscribes to nothing, so this is never called."""

    async def on_closing(self) -> None:
        """Override point: the connection is still up and about to be closed with a DISCONNECT
        (which suppresses the will): publish what the will would have said (a death message)
        with an awaited ``self.client.publish``."""

    # --- the publishing primitives -------------------------------------------------------

    @property
    def client(self) -> aiomqtt.Client:
        """The connected client (from ``connect`` until ``close``), for awaited publishes and
        subscriptions; ``ConnectorError`` when there is no connection."""
        connection = self._connection
        if connection is None or connection.client is None:
            raise ConnectorError(self.endpoint, "not connected", ErrorCategory.TRANSIENT)
        return connection.client

    def send(self, message: OutgoingMessage) -> None:
        """Publish ``message`` without waiting: its ``seqs`` are confirmed or refused through
        the context when paho reports it published. Messages go out in the order they are sent.
        Raises ``ConnectorError`` when the connection cannot take it."""
        connection = self._connection
        client = self.client
        assert connection is not None
        info = paho_adapter.publish_now(client, message.topic, message.payload, message.qos,
                                        message.retain, message.properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectorError(self.endpoint, f"cannot publish: {paho.error_string(info.rc)}",
                                 ErrorCategory.TRANSIENT)
        if not message.seqs:
            return
        if info.is_published():
            # Written at once, before it could be registered (paho without an event loop).
            connection.context.confirmed(message.seqs)
        else:
            connection.pending[info.mid] = message.seqs

    def settle(self, seqs: Sequence[int]) -> None:
        """Confirm outbox rows that no message carries (Sparkplug B: events of a device that
        is not born, whose next birth carries their values); from ``messages`` too. Raises
        ``ConnectorError`` when there is no connection."""
        connection = self._connection
        if connection is None:
            raise ConnectorError(self.endpoint, "not connected", ErrorCategory.TRANSIENT)
        connection.context.confirmed(seqs)

    # --- Sink ----------------------------------------------------------------------------

    async def connect(self, context: SinkContext) -> None:
        """Connect with a clean session, subscribe, run ``on_connected``; from then on report
        acknowledgements and a lost connection through ``context``."""
        config = self.config
        connection = self._connection = _Connection(context)
        arguments = await client_arguments(config, client_id=self.client_id,
                                           keepalive=config.keepalive, logger=logger)
        arguments["will"] = self.will()
        # The engine's window is the in-flight bound. paho's own (0: none) would scan every
        # unacknowledged message on each acknowledgement, O(window) per event; its queue has
        # room for the window and as much again for a subclass's own messages, so a full one
        # is a bug reported, not memory growing.
        arguments["max_inflight_messages"] = 0
        arguments["max_queued_outgoing_messages"] = 2 * config.pipeline()
        client = self._client_factory(**arguments)
        paho_adapter.install_hooks(client, connection.published, connection.connected)
        try:
            await connection.exits.enter_async_context(client)
            connection.client = client
            # The engine reads the window once connected: no more than the broker takes.
            self.window = config.pipeline(connection.receive_maximum)
            filters = self.subscriptions()
            if filters:
                await subscribe(client, filters, config)
            receiver = connection.receiver = asyncio.create_task(
                self._receive(client, context), name=f"{PROTOCOL}[{self.id}].receive")
            receiver.add_done_callback(lambda _: self._receiver_ended(receiver, context))
            await self.on_connected()
        except aiomqtt.MqttError as exc:
            raise connector_error(self.endpoint, exc) from exc

    def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Publish ``rows`` in order, as ``messages`` makes them."""
        for message in self.messages(rows):
            self.send(message)

    async def close(self) -> None:
        """Stop receiving, run ``on_closing`` while still connected, and disconnect."""
        connection = self._connection
        if connection is None:
            return
        try:
            try:
                receiver = connection.receiver
                if receiver is not None:
                    receiver.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await receiver  # raises what broke on_command, for the supervisor
                client = connection.client
                if client is not None and paho_adapter.is_connected(client):
                    await self.on_closing()
            finally:
                await connection.exits.aclose()
        except (aiomqtt.MqttError, ConnectorError) as exc:
            logger.debug("sink %s: the connection ended uncleanly: %s", self.id, exc)
        finally:
            self._connection = None

    async def _receive(self, client: aiomqtt.Client, context: SinkContext) -> None:
        """Hand incoming messages to ``on_command`` until the connection is lost, then tell the
        engine (aiomqtt ends the iteration with the reason)."""
        try:
            async for message in client.messages:
                await self.on_command(message)
        except aiomqtt.MqttError as exc:
            context.failed(connector_error(self.endpoint, exc))
        except ConnectorError as exc:
            context.failed(exc)

    def _receiver_ended(self, receiver: asyncio.Task[None], context: SinkContext) -> None:
        # A bug in on_command: end the connection now; close() raises it for the supervisor.
        if not receiver.cancelled() and receiver.exception() is not None:
            context.failed(ConnectorError(self.endpoint, "handling an incoming message failed",
                                       ErrorCategory.PROTOCOL))
