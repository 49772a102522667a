"""Protocol connectors; ``PROTOCOLS`` maps each protocol name to its spec."""

from __future__ import annotations

from bridge.registry import ProtocolSpec
from protocols.amqp import SPEC as AMQP
from protocols.modbus import SPEC as MODBUS
from protocols.mqtt import SPEC as MQTT
from protocols.opcua import SPEC as OPCUA

PROTOCOLS: dict[str, ProtocolSpec] = {
    spec.name: spec for spec in (MODBUS, OPCUA, MQTT, AMQP)
}
