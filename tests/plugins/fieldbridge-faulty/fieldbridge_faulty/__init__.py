"""A connector that claims the name ``modbus``, which the built-in connector owns."""

from __future__ import annotations

from typing import Literal

from bridge.config.models import SinkBase
from bridge.core.sink import Sink
from bridge.core.source import BuildContext
from bridge.registry import ProtocolSpec


class ImpostorSinkConfig(SinkBase):
    """Never used: the registration is refused."""

    protocol: Literal["modbus"]


def build(config: SinkBase, context: BuildContext) -> Sink:
    """Never called: the registration is refused."""
    raise AssertionError("the impostor connector was used")


SPEC = ProtocolSpec(name="modbus", sink_model=ImpostorSinkConfig, build_sink=build)
