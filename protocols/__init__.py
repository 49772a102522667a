"""Protocol connectors; ``PROTOCOLS`` maps each protocol name to its spec."""

from __future__ import annotations

from bridge.registry import ProtocolSpec
from protocols.modbus import SPEC as MODBUS

PROTOCOLS: dict[str, ProtocolSpec] = {
    spec.name: spec for spec in (MODBUS,)
}
