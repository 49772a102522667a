"""Builders for the Sparkplug B tests: a subscriber that decodes what an edge node publishes,
commands and rebirth requests, a bridge with one Modbus device and the Sparkplug sink, the
primary host's STATE, and checks of ``seq`` and ``bdSeq``."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from bridge.core.status import EndpointStatus
from helpers.brokers import (
    MQTT_HOST,
    MQTT_PORT,
    SETTLE,
    BridgeRun,
    unique,
    wait_on,
    write_sink_config,
)
from protocols.mqtt.sparkplug import BD_SEQ, REBIRTH
from protocols.mqtt.sparkplug_b_pb2 import DataType, Payload

EDGE = "edge-01"


TEMP = "boiler.temp"


SETPOINT = "boiler.setpoint"


@dataclass(frozen=True)
class Received:
    """One message the edge node published, decoded."""

    type: str
    device: str | None
    payload: Payload

    def metrics(self) -> dict[str, Payload.Metric]:
        return {metric.name: metric for metric in self.payload.metrics}


class Subscriber:
    """Subscribes to everything of one Sparkplug group and decodes every message."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.received: list[Received] = []
        self._arrived = asyncio.Event()
        self._client = aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-spb-"))
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        await self._client.__aenter__()
        await self._client.subscribe(f"spBv1.0/{self.group}/#", qos=1)
        self._task = asyncio.create_task(self._receive(), name="test.sparkplug-subscriber")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # raises what made it fail: a message that did not decode
        finally:
            await self._client.__aexit__(None, None, None)

    async def _receive(self) -> None:
        async for message in self._client.messages:
            levels = str(message.topic).split("/")
            if levels[2] in ("NCMD", "DCMD"):
                continue  # the test's own commands, some malformed on purpose
            assert isinstance(message.payload, bytes)
            # Every message must decode: a Sparkplug host would drop the node otherwise.
            payload = Payload.FromString(message.payload)
            self.received.append(Received(levels[2], levels[4] if len(levels) > 4 else None,
                                          payload))
            self._arrived.set()

    async def next(self, kind: str, device: str | None = None, *, after: int = 0
                   ) -> tuple[int, Received]:
        """The first message of ``kind`` (for ``device``) at or after position ``after``."""
        def find() -> int | None:
            for position in range(after, len(self.received)):
                message = self.received[position]
                if message.type == kind and (device is None or message.device == device):
                    return position
            return None

        await wait_on(self._arrived, lambda: find() is not None, SETTLE,
                      lambda: f"{kind} {device or ''} after {[m.type for m in self.received]}")
        position = find()
        assert position is not None
        return position, self.received[position]

    async def command(self, kind: str, payload: bytes, device: str | None = None) -> None:
        """Publish an NCMD (or, with ``device``, a DCMD) to the edge node."""
        topic = f"spBv1.0/{self.group}/{kind}/{EDGE}" + (f"/{device}" if device else "")
        await self._client.publish(topic, payload, qos=1)


def command(*metrics: Payload.Metric) -> bytes:
    return Payload(timestamp=1, metrics=list(metrics)).SerializeToString()


def rebirth() -> bytes:
    return command(Payload.Metric(name=REBIRTH, datatype=DataType.Boolean, boolean_value=True))


def properties(metric: Payload.Metric) -> dict[str, Any]:
    return {key: getattr(value, str(value.WhichOneof("value")))
            for key, value in zip(metric.properties.keys, metric.properties.values, strict=True)}


def bridge_config(tmp_path: Path, group: str, plc_port: int, broker_port: int,
                  **sink: Any) -> Path:
    """A bridge with one Modbus device, ``boiler``, and the Sparkplug sink ``scada``."""
    plant = {
        "id": "plant", "protocol": "modbus", "host": "127.0.0.1", "port": plc_port,
        "timeout": "300ms", "retries": 0,
        "devices": [{"id": "boiler", "unit": 1, "interval": "50ms", "prefix": "boiler.",
                     "report": {"mode": "change"},
                     "points": [
                         {"name": "temp", "address": 30001, "type": "int16", "scale": 0.1,
                          "unit": "degC"},
                         {"name": "setpoint", "address": 40001, "type": "int16",
                          "unit": "degC", "writable": True},
                     ]}],
    }
    return write_sink_config(tmp_path, {
        "id": "scada", "protocol": "mqtt", "format": "sparkplug_b", "host": "127.0.0.1",
        "port": broker_port, "group_id": group, "edge_node_id": EDGE, **sink},
        sources=[plant])


def sink_status(bridge: BridgeRun) -> EndpointStatus:
    return bridge.sink("scada").status


def assert_seq_runs_on(messages: list[Received]) -> None:
    """From each NBIRTH (``seq`` 0) on, every message's ``seq`` is the last one's plus 1."""
    last: int | None = None
    for message in messages:
        if message.type == "NDEATH":
            assert not message.payload.HasField("seq")
            last = None
        elif message.type == "NBIRTH":
            assert message.payload.seq == 0
            last = 0
        else:
            assert last is not None, f"{message.type} before any NBIRTH"
            assert message.payload.seq == (last + 1) % 256, [m.type for m in messages]
            last = message.payload.seq


def lab_config(tmp_path: Path, group: str, broker_port: int = MQTT_PORT, **sink: Any) -> Path:
    """A bridge whose only source, ``lab``, reads untyped JSON values from Mosquitto (under
    ``<group>/lab/``), and the Sparkplug sink ``scada``."""
    lab = {"id": "lab", "protocol": "mqtt", "host": MQTT_HOST, "port": MQTT_PORT,
           "clean_session": True,
           "points": [{"name": f"lab.{name}", "topic": f"{group}/lab/{name}", "path": "v"}
                      for name in ("level", "total", "offset")]}
    return write_sink_config(tmp_path, {
        "id": "scada", "protocol": "mqtt", "format": "sparkplug_b", "host": MQTT_HOST,
        "port": broker_port, "group_id": group, "edge_node_id": EDGE, **sink},
        sources=[lab])


async def lab_value(group: str, name: str, document: str) -> None:
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-lab-")) as client:
        await client.publish(f"{group}/lab/{name}", document.encode(), qos=1)


def bd_seq_of(message: Any) -> int:
    return int(message.metrics()[BD_SEQ].long_value)


async def publish_state(host: str, online: bool, timestamp: int) -> None:
    """The host application's STATE, retained as Sparkplug 3.0 has it."""
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-host-")) as client:
        payload = json.dumps({"online": online, "timestamp": timestamp}).encode()
        await client.publish(f"spBv1.0/STATE/{host}", payload, qos=1, retain=True)


async def clear_state(host: str) -> None:
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-host-")) as client:
        await client.publish(f"spBv1.0/STATE/{host}", b"", qos=1, retain=True)
