"""The JSON Schema of the normalized event, shipped as ``bridge/core/event.schema.json``."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def event_schema() -> dict[str, Any]:
    """The published JSON Schema of one normalized event."""
    text = resources.files("bridge.core").joinpath("event.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
