"""Fixtures of the MQTT and Sparkplug B tests: a test's own Sparkplug group, a Modbus device
behind a proxy, the edge node's broker link and a subscriber decoding what it publishes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from helpers.brokers import (
    MQTT_HOST,
    MQTT_PORT,
    TcpProxy,
    require_broker,
    unique,
)
from helpers.modbus_servers import ModbusTestServer, device
from helpers.sparkplug import (
    Subscriber,
)


@pytest.fixture
def group() -> str:
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    return unique("fbtest-")


@pytest.fixture
async def plc() -> AsyncIterator[ModbusTestServer]:
    # Input register 0: temperature in tenths of a degree; holding register 0: the setpoint.
    async with ModbusTestServer([device(1, input=[215], holding=[40])]) as server:
        yield server


@pytest.fixture
async def plc_link(plc: ModbusTestServer) -> AsyncIterator[TcpProxy]:
    """The Modbus device's connection: ``pause()`` takes the device away."""
    async with TcpProxy("127.0.0.1", plc.port) as proxy:
        yield proxy


@pytest.fixture
async def broker_link(group: str) -> AsyncIterator[TcpProxy]:
    """The edge node's connection to Mosquitto: ``cut()`` kills it as a network failure
    would."""
    async with TcpProxy(MQTT_HOST, MQTT_PORT) as proxy:
        yield proxy


@pytest.fixture
async def subscriber(group: str) -> AsyncIterator[Subscriber]:
    async with Subscriber(group) as running:
        yield running
