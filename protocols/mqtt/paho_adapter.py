"""The one place that reaches under aiomqtt into its paho client.

aiomqtt 2.5 wraps a ``paho.mqtt.client.Client`` in the private attribute ``Client._client``
and offers no public way to do four things this connector needs:

- acknowledge a message by hand, after its events are stored (no manual-ack API yet,
  empicano/aiomqtt#345): paho's ``manual_ack_set`` before connecting and ``ack`` afterwards;
- publish without awaiting each message (``aiomqtt.Client.publish`` waits for the PUBACK, one
  message at a time): paho's ``publish``, which returns its packet id at once;
- learn when each of those messages is acknowledged, and the broker's ``Receive Maximum``:
  aiomqtt installs its own ``on_publish`` and ``on_connect`` callbacks on the paho client in
  its constructor (paho's version 2 callback signatures); the hooks here wrap them, call them
  first, then ours;
- ask whether the connection is still up before a goodbye message: paho's ``is_connected``.

Everything else goes through aiomqtt's public API. ``tests/mqtt/test_paho_adapter.py`` fails,
naming the installed versions, when one of these internals changes; aiomqtt and paho-mqtt are
pinned to their minor version in pyproject.toml for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

PublishHook = Callable[[int, ReasonCode], None]
"""Called with the packet id and reason code of each message paho reports published."""
ConnectHook = Callable[[Properties | None], None]
"""Called with the CONNACK's properties (``None`` before MQTT 5) when a connection opens."""


def paho_client(client: aiomqtt.Client) -> paho.Client:
    """The paho client under ``client`` (aiomqtt's private ``_client``)."""
    return client._client


def enable_manual_ack(client: aiomqtt.Client) -> None:
    """Leave PUBACK and PUBCOMP to the caller (``paho_client(client).ack``); call before
    connecting, so a persistent session's queued messages are not acknowledged either."""
    paho_client(client).manual_ack_set(True)


def publish_now(client: aiomqtt.Client, topic: str, payload: bytes, qos: int, retain: bool,
                properties: Properties | None) -> paho.MQTTMessageInfo:
    """Hand a message to paho without waiting for its acknowledgement; the returned info
    carries its packet id (``mid``), reported later to the ``install_hooks`` publish hook."""
    return paho_client(client).publish(topic, payload, qos, retain, properties)


def install_hooks(client: aiomqtt.Client, published: PublishHook,
                  connected: ConnectHook) -> None:
    """Call ``published`` for each acknowledged message and ``connected`` on each CONNACK,
    after aiomqtt's own callbacks; install before connecting."""
    inner = paho_client(client)
    forward_publish = cast(Callable[..., None], inner.on_publish)  # aiomqtt's own
    forward_connect = cast(Callable[..., None], inner.on_connect)

    def on_publish(paho_client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                   properties: Properties) -> None:
        forward_publish(paho_client, userdata, mid, reason, properties)
        published(mid, reason)

    def on_connect(paho_client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                   properties: Properties | None = None) -> None:
        forward_connect(paho_client, userdata, flags, reason, properties)
        connected(properties)

    inner.on_publish = on_publish
    inner.on_connect = on_connect


def is_connected(client: aiomqtt.Client) -> bool:
    """Whether ``client``'s connection is up (aiomqtt keeps this to itself)."""
    return paho_client(client).is_connected()
