"""The aiomqtt and paho internals ``protocols/mqtt/paho_adapter.py`` relies on still exist
with the shape it expects; a failure names the installed version. One round trip through a
real broker shows the hooks and the raw publish working together."""

from __future__ import annotations

import asyncio

import aiomqtt
import paho.mqtt.client as paho
import pytest
from helpers.brokers import MQTT_HOST, MQTT_PORT, require_broker, unique, wait_until
from helpers.internals import require, require_attribute, require_callable
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocols.mqtt import paho_adapter

WAIT = 10.0


async def test_aiomqtt_keeps_its_paho_client_with_version_2_callbacks() -> None:
    client = aiomqtt.Client(MQTT_HOST, MQTT_PORT, protocol=aiomqtt.ProtocolVersion.V5)
    inner = require_attribute("aiomqtt", client, "_client")
    require("aiomqtt", isinstance(inner, paho.Client), "Client._client (a paho Client)")
    # aiomqtt's own callbacks, which install_hooks wraps and forwards to, with paho's
    # version 2 signatures.
    require_callable("aiomqtt", inner, "on_publish", inner, None, 1, ReasonCode(4), Properties(4))
    require_callable("aiomqtt", inner, "on_connect", inner, None, {}, ReasonCode(2), None)


async def test_paho_client_offers_what_the_adapter_calls() -> None:
    client = aiomqtt.Client(MQTT_HOST, MQTT_PORT)
    inner = paho_adapter.paho_client(client)
    require_callable("paho-mqtt", inner, "manual_ack_set", True)
    require_callable("paho-mqtt", inner, "ack", 1, 1)
    require_callable("paho-mqtt", inner, "is_connected")
    require_callable("paho-mqtt", inner, "publish", "t", b"p", 1, False, None)
    info = paho.MQTTMessageInfo(7)
    require("paho-mqtt", info.mid == 7 and info.rc == paho.MQTT_ERR_SUCCESS,
            "MQTTMessageInfo.mid and .rc")
    require_callable("paho-mqtt", info, "is_published")


async def test_hooks_report_the_connack_and_each_raw_publish_acknowledgement() -> None:
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    client = aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-adapter-"),
                            protocol=aiomqtt.ProtocolVersion.V5)
    acknowledged: list[tuple[int, ReasonCode]] = []
    connacks: list[Properties | None] = []
    paho_adapter.install_hooks(client, lambda mid, reason: acknowledged.append((mid, reason)),
                               connacks.append)
    async with client:
        assert paho_adapter.is_connected(client)
        assert len(connacks) == 1
        assert connacks[0] is not None
        info = paho_adapter.publish_now(client, unique("fbtest/adapter/"), b"x", 1, False, None)
        assert info.rc == paho.MQTT_ERR_SUCCESS
        await wait_until(lambda: len(acknowledged) == 1)
        ((mid, reason),) = acknowledged
        assert mid == info.mid
        assert not reason.is_failure
        # aiomqtt's own publish still completes: its on_publish is forwarded to.
        await asyncio.wait_for(client.publish(unique("fbtest/adapter/"), b"y", qos=1), WAIT)
        assert len(acknowledged) == 2
    assert not paho_adapter.is_connected(client)


pytestmark = pytest.mark.broker
