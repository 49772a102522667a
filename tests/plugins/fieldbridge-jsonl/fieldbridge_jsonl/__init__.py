"""A sink that appends every event to a file, one JSON object a line."""

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TextIO

from pydantic import Field

from bridge.config.models import SinkBase
from bridge.core.sink import OutboxRow, Sink, SinkContext
from bridge.core.source import BuildContext
from bridge.registry import ProtocolSpec


class JsonLinesConfig(SinkBase):
    """Append every event to a file, one JSON object a line."""

    protocol: Literal["jsonl"]
    path: Path = Field(description="The file; relative to the configuration file.")


class JsonLinesSink(Sink):
    """Writes the rows it is handed to the file, and confirms them once flushed."""

    def __init__(self, config: JsonLinesConfig, context: BuildContext) -> None:
        self.path = context.resolve(config.path)
        super().__init__(config, endpoint=str(self.path))
        self.file: TextIO | None = None
        self.context: SinkContext | None = None

    async def connect(self, context: SinkContext) -> None:
        """Open the file for appending."""
        self.context = context
        self.file = await asyncio.to_thread(self.path.open, "a", encoding="utf-8")

    def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Write the rows, flush, and confirm them."""
        assert self.file is not None
        assert self.context is not None
        self.file.writelines(f"{row.body}\n" for row in rows)
        self.file.flush()
        self.context.confirmed([row.seq for row in rows])

    async def close(self) -> None:
        """Close the file."""
        if self.file is not None:
            self.file.close()
            self.file = None


def build(config: SinkBase, context: BuildContext) -> Sink:
    """The sink of one configured ``jsonl`` sink."""
    assert isinstance(config, JsonLinesConfig)
    return JsonLinesSink(config, context)


SPEC = ProtocolSpec(name="jsonl", sink_model=JsonLinesConfig, build_sink=build)
