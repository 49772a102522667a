"""Builders for message-payload tests: a mapper compiled from point definitions, the
configuration error a definition is refused with, a reading as a message source makes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.core.message_mapper import MessageMapper
from bridge.core.model import Reading
from bridge.core.source import BuildContext
from bridge.errors import ConfigError
from bridge.registry import load_config
from helpers.brokers import write_config
from protocols.mqtt import SPEC

RECEIVED = 1_700_000_000.0


def mapper_for(tmp_path: Path, points: list[dict[str, Any]], **source: Any) -> MessageMapper:
    """The compiled mapping of one MQTT source with ``points``."""
    path = write_config(tmp_path / "config.yaml", {
        "id": "m", "protocol": "mqtt", "host": "127.0.0.1", "points": points, **source})
    config = load_config(path)
    unit = SPEC.source_unit(config.sources[0], config.points["m"], BuildContext("test", tmp_path))
    assert isinstance(unit.mapper, MessageMapper)
    return unit.mapper


def config_error(tmp_path: Path, points: list[dict[str, Any]], **source: Any) -> str:
    """The text of the config error ``points`` cause."""
    path = write_config(tmp_path / "config.yaml", {
        "id": "m", "protocol": "mqtt", "host": "127.0.0.1", "points": points, **source})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def reading(topic: str, payload: bytes | str, **fields: Any) -> Reading:
    """A reading as the MQTT source makes it."""
    body = payload.encode() if isinstance(payload, str) else payload
    return Reading(source="m", address=topic, value=body, received_at=RECEIVED, **fields)
