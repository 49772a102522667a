"""The MQTT source: one aiomqtt client per connection, subscriptions restored on every connect.

QoS 1 and 2 messages are acknowledged by hand, after the router has stored their events:
aiomqtt 2.5 has no manual-ack API yet (empicano/aiomqtt#345), so the source switches the
underlying paho client to ``manual_ack`` before connecting and acks through it
(``protocols/mqtt/paho_adapter.py``). The broker
re-delivers what was not acknowledged when the bridge reconnects with a persistent session
(``clean_session: false``, the default).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from bridge.core.batching import ReadingBatcher
from bridge.core.model import Reading
from bridge.core.source import Source, SourceContext
from bridge.errors import ConnectorError, ErrorCategory
from protocols.mqtt import paho_adapter
from protocols.mqtt.config import MqttSourceConfig
from protocols.mqtt.connection import (
    ClientFactory,
    client_arguments,
    connector_error,
    subscribe,
)

logger = logging.getLogger(__name__)

PROTOCOL = "mqtt"


@dataclass(frozen=True, slots=True)
class MqttAcknowledger:
    """Sends PUBACK (QoS 1) or PUBCOMP (QoS 2) for one message once its events are stored."""

    client: paho.Client
    mid: int
    qos: int

    async def accept(self) -> None:
        """Acknowledge the message; after a disconnect the broker re-delivers it instead."""
        if self.client.is_connected():
            self.client.ack(self.mid, self.qos)

    async def reject(self, reason: str) -> None:
        """MQTT has no negative acknowledgement: acknowledge, or it returns on every connect.

        The runtime has counted the message as rejected, with ``reason``.
        """
        await self.accept()


class MqttSource(Source):
    """Subscribes to the topic filters of its points and hands each message on as a reading."""

    def __init__(
        self,
        config: MqttSourceConfig,
        *,
        client_id: str | None,
        share_group: str | None = None,
        client_factory: ClientFactory = aiomqtt.Client,
    ) -> None:
        super().__init__(source_id=config.id, protocol=PROTOCOL, endpoint=config.endpoint())
        self.config = config
        self.client_id = client_id
        self.subscriptions = config.subscriptions(share_group)
        """Topic filter to QoS, subscribed on every connect (as ``$share/<group>/<filter>``
        in a shared-subscription group: messages still carry their own topic, which the
        mapping matches as usual)."""
        self._client_factory = client_factory
        self._manual_ack = max(self.subscriptions.values()) > 0

    async def run(self, context: SourceContext) -> None:
        """Connect, subscribe, and hand messages on until cancelled or disconnected."""
        client = self._client_factory(**await self._client_arguments())
        if self._manual_ack:
            # Before connecting: a persistent session's queued messages arrive right after
            # CONNACK and must not be acknowledged automatically.
            paho_adapter.enable_manual_ack(client)
        try:
            async with client:
                await self._subscribe(client)
                context.status.up()
                await self._receive(client, context)
        except aiomqtt.MqttError as exc:
            raise connector_error(self.endpoint, exc) from exc
        raise ConnectorError(self.endpoint, "the broker ended the subscription",
                             ErrorCategory.TRANSIENT)

    async def _client_arguments(self) -> dict[str, Any]:
        config = self.config
        return await client_arguments(
            config, client_id=self.client_id, clean_session=config.clean_session,
            session_expiry=config.session_expiry, keepalive=config.keepalive, logger=logger)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        await subscribe(client, list(self.subscriptions.items()), self.config)

    async def _receive(self, client: aiomqtt.Client, context: SourceContext) -> None:
        messages = client.messages
        paho_client = paho_adapter.paho_client(client)
        batcher = ReadingBatcher(context)
        async for message in messages:
            ack = (MqttAcknowledger(paho_client, message.mid, message.qos)
                   if message.qos > 0 and self._manual_ack else None)
            await batcher.add(Reading(
                source=self.id,
                address=message.topic.value,
                value=message.payload,
                received_at=time.time(),
                ack=ack,
                meta={"qos": message.qos, "retain": message.retain},
            ), more_waiting=len(messages) > 0)
