"""The wire format between the daemon and its worker processes: what runs, and every frame.

Frames are a 4-byte big-endian length and a MessagePack body: one of the typed frames below
(msgspec structs, tagged with their class name), decoded against the union of what may come
in that direction and dispatched with ``match``. Events travel as the ``Event`` struct itself,
a status as a ``StatusSnapshot``. Both ends are this program, on one machine, over a socket
pair nothing else can reach.

This module may import the config models, the core, the errors and the delivery engine's
figures.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from bridge.config.models import ResolvedPoint, SinkBase, SourceBase
from bridge.core.model import Event, Value
from bridge.core.sink import OutboxRow
from bridge.core.status import StatusSnapshot
from bridge.errors import ConnectorError, ErrorCategory
from bridge.pipeline.delivery import DeliveryFigures

_HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class WorkerSpec:
    """What a source's worker process runs: one source, its points, and where it runs."""

    source: SourceBase
    points: Sequence[ResolvedPoint]
    bridge_id: str
    state_dir: Path
    config_dir: Path | None
    index: int


@dataclass(frozen=True)
class SinkWorkerSpec:
    """What a sink's worker process runs: one sink, and where it runs."""

    sink: SinkBase
    bridge_id: str
    state_dir: Path
    config_dir: Path | None


class WorkerFrame(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """One message between the daemon and a worker process (tagged with its class name)."""


class Start(WorkerFrame, frozen=True):
    """Daemon → worker, first and once: what to run."""

    spec: bytes
    """A pickled ``WorkerSpec`` or ``SinkWorkerSpec``. Pickled, unlike every other frame:
    it holds the source's or sink's configuration, a pydantic model each connector defines
    (the resolved points hold more of them), and only pickle rebuilds those exact classes."""


class Events(WorkerFrame, frozen=True):
    """Source worker → daemon: mapped events, each carrying its published JSON (``body``)."""

    batch: int
    """Numbers a batch with upstream messages to settle once it is stored; 0: none."""
    events: list[Event]


class Status(WorkerFrame, frozen=True):
    """Worker → daemon: the status of its source or sink and, from a sink worker, the
    delivery engine's figures and what the sink shows of itself."""

    status: StatusSnapshot
    delivery: DeliveryFigures | None = None
    """The engine's figures of a sink worker's delivery; ``None`` from a source worker."""
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    """The sink's own inventory details (``Sink.details``: its window, its client id)."""


class ReadDone(WorkerFrame, frozen=True):
    """Source worker → daemon: the readings of a live read."""

    call: int
    readings: bytes
    """The pickled ``list[Reading]``: a reading's address and raw value are the connector's
    own types (a Modbus block address, an OPC-UA variant's value), which the daemon's mapper
    needs back exactly as they were, and only pickle gives them back so."""


class WriteDone(WorkerFrame, frozen=True):
    """Source worker → daemon: a live write was carried out."""

    call: int


class CallFailed(WorkerFrame, frozen=True):
    """Source worker → daemon: a live read or write failed (a ``ReadError`` or ``WriteError``)."""

    call: int
    point: str
    reason: str
    category: ErrorCategory


class Stored(WorkerFrame, frozen=True):
    """Daemon → source worker: a batch is stored; settle its upstream messages."""

    batch: int


class ReadPoint(WorkerFrame, frozen=True):
    """Daemon → source worker: read one point now (answered by ``ReadDone``)."""

    call: int
    point: str


class WritePoint(WorkerFrame, frozen=True):
    """Daemon → source worker: write a value to a point (answered by ``WriteDone``)."""

    call: int
    point: str
    value: Value


class ReadRows(WorkerFrame, frozen=True):
    """Sink worker → daemon: the oldest ``limit`` outbox rows after ``after``."""

    call: int
    after: int
    limit: int


class ConfirmRows(WorkerFrame, frozen=True):
    """Sink worker → daemon: delete outbox rows the broker confirmed."""

    call: int
    seqs: list[int]


class Rows(WorkerFrame, frozen=True):
    """Daemon → sink worker: the rows a ``ReadRows`` asked for."""

    call: int
    rows: list[OutboxRow]


class Confirmed(WorkerFrame, frozen=True):
    """Daemon → sink worker: how many rows a ``ConfirmRows`` deleted."""

    call: int
    deleted: int


class Arrivals(WorkerFrame, frozen=True):
    """Daemon → sink worker: rows were stored for the sink (``SinkOutbox.arrivals`` now)."""

    count: int


SourceReport = Events | Status | ReadDone | WriteDone | CallFailed
"""What a source worker sends the daemon."""
SourceOrder = Stored | ReadPoint | WritePoint
"""What the daemon sends a source worker, after ``Start``."""
SinkRequest = ReadRows | ConfirmRows | Status
"""What a sink worker sends the daemon."""
SinkAnswer = Rows | Confirmed | Arrivals
"""What the daemon sends a sink worker, after ``Start``."""

FrameT = TypeVar("FrameT")
ResultT = TypeVar("ResultT")

_ENCODER = msgspec.msgpack.Encoder()
STARTS: msgspec.msgpack.Decoder[Start] = msgspec.msgpack.Decoder(Start)
"""Decodes the first frame a worker reads."""
SOURCE_REPORTS: msgspec.msgpack.Decoder[SourceReport] = msgspec.msgpack.Decoder(SourceReport)
"""Decodes what the daemon reads from a source worker."""
SOURCE_ORDERS: msgspec.msgpack.Decoder[SourceOrder] = msgspec.msgpack.Decoder(SourceOrder)
"""Decodes what a source worker reads from the daemon."""
SINK_REQUESTS: msgspec.msgpack.Decoder[SinkRequest] = msgspec.msgpack.Decoder(SinkRequest)
"""Decodes what the daemon reads from a sink worker."""
SINK_ANSWERS: msgspec.msgpack.Decoder[SinkAnswer] = msgspec.msgpack.Decoder(SinkAnswer)
"""Decodes what a sink worker reads from the daemon."""


def encode(frame: WorkerFrame) -> bytearray:
    """``frame`` encoded behind its length."""
    data = bytearray(_HEADER.size)
    _ENCODER.encode_into(frame, data, _HEADER.size)
    _HEADER.pack_into(data, 0, len(data) - _HEADER.size)
    return data


def start(spec: WorkerSpec | SinkWorkerSpec) -> bytearray:
    """The encoded ``Start`` frame of ``spec``."""
    return encode(Start(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)))


async def read_frame(reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder[FrameT],
                     peer: str) -> FrameT | None:
    """The next frame; ``None`` once the other end closed the socket. Raises
    ``ConnectorError`` for a frame that does not decode as one ``decoder`` expects."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        data = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ConnectorError(peer, f"malformed frame: {exc}", ErrorCategory.PROTOCOL) from exc


async def read_frames(reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder[FrameT],
                      peer: str) -> AsyncIterator[FrameT]:
    """Every frame until the other end closes the socket."""
    while (frame := await read_frame(reader, decoder, peer)) is not None:
        yield frame


def answer_call(reply: asyncio.Future[ResultT] | None, result: ResultT) -> None:
    """Give a waiting call its answer (a call given up on has no future left)."""
    if reply is not None and not reply.done():
        reply.set_result(result)
