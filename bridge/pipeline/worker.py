"""Worker processes: a source's connection and mapping on a core of their own.

A source configured with ``workers: N`` runs in N child processes (``fieldbridge worker``),
each started by the daemon with one end of a private socket pair. The daemon sends the worker
what to run (the source's configuration and resolved points); the worker connects, maps its
readings into events exactly as the daemon would, and sends the events in batches, already
serialized. The daemon hands them to its router, which stores them (history, last values,
outbox) as it stores any source's; once a batch is stored the daemon tells the worker, which
only then settles the batch's upstream messages (MQTT QoS 1/2, AMQP). The delivery promise is
the one of a single process: no message is acknowledged upstream before its events are
committed, and the daemon stays the one owner of the store and the outbox.

The worker supervises its own connection (reconnects with backoff) and reports its status
(state, counters, devices) a few times a second; the daemon shows it in the inventory, with
one entry per worker under ``details.workers``. A worker process that exits is started again
by the daemon's supervisor, with backoff; a worker whose daemon is gone (its socket closes)
exits. Live reads and writes through the API are relayed to the first worker.

Frames are a 4-byte big-endian length and a MessagePack body: one of the typed frames below
(msgspec structs, tagged with their class name), decoded against the union of what may come
in that direction and dispatched with ``match``. Events travel as the ``Event`` struct itself.
Both ends are this program, on one machine, over a socket pair nothing else can reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from bridge.config.models import ResolvedPoint, SinkBase, SourceBase
from bridge.core import aio
from bridge.core.aio import primary_failure
from bridge.core.model import Event, Reading, Settlement, Value
from bridge.core.sink import OutboxRoute, OutboxRow, Sink, SinkContext
from bridge.core.source import BuildContext, Source, SourceContext, SourceUnit, map_readings
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory, WriteError
from bridge.pipeline.delivery import SinkOutbox, deliver
from bridge.pipeline.supervisor import Backoff, source_status, supervise
from bridge.registry import protocols

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
STATUS_EVERY = 0.25
"""Seconds between a worker's status reports (sent only when something changed)."""
MAX_UNSETTLED = 64
"""Batches with upstream messages a worker may have waiting to be stored before it waits."""
STOP_GRACE = 2.0
"""Seconds a worker process has to exit after SIGTERM before it is killed (less than the
runtime's own patience with a stopping task)."""
CALL_TIMEOUT = 30.0
"""Seconds a relayed live read or write may take."""

_CHILD_ENVIRONMENT_DROPS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                            "LISTEN_PID", "LISTEN_FDNAMES")
"""systemd's hand-offs to the daemon itself, which a child must not answer."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process runs: one source, its points, and where it runs."""

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


# --- frames ----------------------------------------------------------------------------------


class Frame(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """One message between the daemon and a worker process (tagged with its class name)."""


class Start(Frame, frozen=True):
    """Daemon → worker, first and once: what to run."""

    spec: bytes
    """A pickled ``WorkerSpec`` or ``SinkWorkerSpec``. Pickled, unlike every other frame:
    it holds the source's or sink's configuration, a pydantic model each connector defines
    (the resolved points hold more of them), and only pickle rebuilds those exact classes."""


class Events(Frame, frozen=True):
    """Source worker → daemon: mapped events, each carrying its published JSON (``body``)."""

    batch: int
    """Numbers a batch with upstream messages to settle once it is stored; 0: none."""
    events: list[Event]


class Status(Frame, frozen=True):
    """Worker → daemon: the status (``EndpointStatus.snapshot``) and, from a sink worker, its
    publishing figures (``Sink.details``)."""

    snapshot: dict[str, Any]
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class ReadDone(Frame, frozen=True):
    """Source worker → daemon: the readings of a live read."""

    call: int
    readings: bytes
    """The pickled ``list[Reading]``: a reading's address and raw value are the connector's
    own types (a Modbus block address, an OPC-UA variant's value), which the daemon's mapper
    needs back exactly as they were, and only pickle gives them back so."""


class WriteDone(Frame, frozen=True):
    """Source worker → daemon: a live write was carried out."""

    call: int


class CallFailed(Frame, frozen=True):
    """Source worker → daemon: a live read or write failed (a ``WriteError``)."""

    call: int
    point: str
    reason: str
    category: ErrorCategory


class Stored(Frame, frozen=True):
    """Daemon → source worker: a batch is stored; settle its upstream messages."""

    batch: int


class ReadPoint(Frame, frozen=True):
    """Daemon → source worker: read one point now (answered by ``ReadDone``)."""

    call: int
    point: str


class WritePoint(Frame, frozen=True):
    """Daemon → source worker: write a value to a point (answered by ``WriteDone``)."""

    call: int
    point: str
    value: Value


class ReadRows(Frame, frozen=True):
    """Sink worker → daemon: the oldest ``limit`` outbox rows after ``after``."""

    call: int
    after: int
    limit: int


class ConfirmRows(Frame, frozen=True):
    """Sink worker → daemon: delete outbox rows the broker confirmed."""

    call: int
    seqs: list[int]


class Rows(Frame, frozen=True):
    """Daemon → sink worker: the rows a ``ReadRows`` asked for."""

    call: int
    rows: list[OutboxRow]


class Confirmed(Frame, frozen=True):
    """Daemon → sink worker: how many rows a ``ConfirmRows`` deleted."""

    call: int
    deleted: int


class Arrivals(Frame, frozen=True):
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

_FrameT = TypeVar("_FrameT")
_ResultT = TypeVar("_ResultT")

_ENCODER = msgspec.msgpack.Encoder()
_STARTS: msgspec.msgpack.Decoder[Start] = msgspec.msgpack.Decoder(Start)
_SOURCE_REPORTS: msgspec.msgpack.Decoder[SourceReport] = msgspec.msgpack.Decoder(SourceReport)
_SOURCE_ORDERS: msgspec.msgpack.Decoder[SourceOrder] = msgspec.msgpack.Decoder(SourceOrder)
_SINK_REQUESTS: msgspec.msgpack.Decoder[SinkRequest] = msgspec.msgpack.Decoder(SinkRequest)
_SINK_ANSWERS: msgspec.msgpack.Decoder[SinkAnswer] = msgspec.msgpack.Decoder(SinkAnswer)


def _frame(frame: Frame) -> bytearray:
    """``frame`` encoded behind its length."""
    data = bytearray(_HEADER.size)
    _ENCODER.encode_into(frame, data, _HEADER.size)
    _HEADER.pack_into(data, 0, len(data) - _HEADER.size)
    return data


async def _read_frame(reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder[_FrameT],
                      peer: str) -> _FrameT | None:
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


async def _frames(reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder[_FrameT],
                  peer: str) -> AsyncIterator[_FrameT]:
    """Every frame until the other end closes the socket."""
    while (frame := await _read_frame(reader, decoder, peer)) is not None:
        yield frame


def _start(spec: WorkerSpec | SinkWorkerSpec) -> bytearray:
    return _frame(Start(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)))


def _settle(reply: asyncio.Future[_ResultT] | None, result: _ResultT) -> None:
    """Give a waiting call its answer (a call given up on has no future left)."""
    if reply is not None and not reply.done():
        reply.set_result(result)


async def _spawn(endpoint: str, what: str) -> tuple[
        asyncio.subprocess.Process, asyncio.StreamReader, asyncio.StreamWriter]:
    """Start ``fieldbridge worker`` with one end of a new socket pair; the other end's streams.
    """
    ours, theirs = socket.socketpair()
    try:
        environment = {key: value for key, value in os.environ.items()
                       if key not in _CHILD_ENVIRONMENT_DROPS}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "--log-level",
            logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
            "worker", "--fd", str(theirs.fileno()),
            pass_fds=(theirs.fileno(),), env=environment, stdin=asyncio.subprocess.DEVNULL,
            # Out of the terminal's process group: Ctrl-C reaches the daemon, which stops its
            # workers after their sources.
            start_new_session=True)
    except OSError as exc:
        ours.close()
        raise ConnectorError(endpoint, f"cannot start {what}: {exc}",
                             ErrorCategory.CONFIG) from exc
    finally:
        theirs.close()
    try:
        reader, writer = await asyncio.open_connection(sock=ours)
    except BaseException:
        await _stop_process(process)
        raise
    return process, reader, writer


def _add_counters(status: EndpointStatus, counted: Counter[str],
                  counters: dict[str, int]) -> Counter[str]:
    """Add to ``status`` what a worker counted since ``counted``; returns the new mark."""
    for key, value in counters.items():
        status.counters[key] += value - counted.get(key, 0)
    return Counter(counters)


# --- in the daemon ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stored:
    """Tells a worker that one of its batches is stored (the router settles it in order)."""

    writer: asyncio.StreamWriter
    batch: int

    async def accept(self) -> None:
        if not self.writer.is_closing():
            self.writer.write(_frame(Stored(self.batch)))

    async def reject(self, reason: str) -> None:
        # The worker knows, per message, which to accept and which to dead-letter.
        await self.accept()


@dataclass
class _Process:
    """One running worker process, as the daemon sees it."""

    index: int
    pid: int
    writer: asyncio.StreamWriter
    counted: Counter[str]
    """Its counters as last added to the source's."""
    snapshot: dict[str, Any] | None = None


_Answer = ReadDone | WriteDone | CallFailed


class WorkerSource(Source):
    """A source run in worker processes; stands in for it in the daemon.

    ``inner`` is the same source built in the daemon: it is never run here, it names the
    devices for the inventory.
    """

    def __init__(self, inner: Source, spec: WorkerSpec, workers: int) -> None:
        super().__init__(source_id=inner.id, protocol=inner.protocol, endpoint=inner.endpoint)
        self.inner = inner
        self.spec = spec
        self.workers = workers
        self.processes: dict[int, _Process] = {}
        """The worker processes running now, by index."""
        self._calls = itertools.count(1)
        self._replies: dict[int, asyncio.Future[_Answer]] = {}

    def device_endpoints(self) -> dict[str, str]:
        """The devices of the source the workers run."""
        return self.inner.device_endpoints()

    async def run(self, context: SourceContext) -> None:
        """Start the worker processes and store what they send until cancelled; raises
        ``ConnectorError`` when one of them exits (the others are stopped too)."""
        if context.submit is None:
            raise ConnectorError(self.endpoint, "worker processes need a router to submit to",
                                 ErrorCategory.CONFIG)
        try:
            async with asyncio.TaskGroup() as group:
                workers = [group.create_task(self._run_worker(index, context),
                                             name=f"worker[{self.id}.{index}]")
                           for index in range(self.workers)]
                # Awaited in the group's body, which so stays busy until a worker fails:
                # Python 3.11's TaskGroup leaves its parent marked as cancelling when a task
                # fails after the body has returned.
                await asyncio.wait(workers)
        except BaseExceptionGroup as failures:
            raise primary_failure(failures) from None
        finally:
            for reply in self._replies.values():
                if not reply.done():
                    reply.cancel()
            self._replies.clear()

    async def _run_worker(self, index: int, context: SourceContext) -> None:
        submit = context.submit
        assert submit is not None
        process, reader, writer = await _spawn(self.endpoint, f"worker process {index}")
        running = _Process(index, process.pid, writer, Counter())
        self.processes[index] = running
        try:
            writer.write(_start(dataclasses.replace(self.spec, index=index)))
            async for frame in _frames(reader, _SOURCE_REPORTS, self.endpoint):
                match frame:
                    case Events(batch=batch, events=events):
                        settlements: list[Settlement] = (
                            [(_Stored(writer, batch), None)] if batch else [])
                        await submit(events, settlements)
                    case Status(snapshot=snapshot):
                        self._mirror(running, snapshot, context.status)
                    case ReadDone(call=call) | WriteDone(call=call) | CallFailed(call=call):
                        _settle(self._replies.pop(call, None), frame)
            code = await process.wait()
            raise ConnectorError(self.endpoint, f"worker process {index} (pid {process.pid}) "
                                 f"exited with status {code}", ErrorCategory.PROTOCOL)
        finally:
            del self.processes[index]
            writer.close()
            await _stop_process(process)
            _forget(running, context.status)

    def _mirror(self, running: _Process, snapshot: dict[str, Any],
                status: EndpointStatus) -> None:
        """Fold one worker's status into the source's: counters added, state combined."""
        running.snapshot = snapshot
        running.counted = _add_counters(status, running.counted, snapshot["counters"])
        snapshots = [(process.index, process.snapshot) for process in self.processes.values()
                     if process.snapshot is not None]
        combined = _combine(snapshots, self.workers)
        status.mirror(combined, counters=False)
        status.details["workers"] = [
            {"worker": index, "pid": self.processes[index].pid, "state": each["state"],
             "last_error": each["last_error"],
             "readings": each["counters"].get("readings", 0),
             "events": each["counters"].get("events", 0)}
            for index, each in sorted(snapshots, key=lambda item: item[0])]

    async def read(self, point_id: str) -> list[Reading]:
        """Read one point now, through the first worker."""
        match await self._call(point_id, lambda call: ReadPoint(call, point_id)):
            case ReadDone(readings=readings):
                result: list[Reading] = pickle.loads(readings)
                return result
            case answer:
                raise _unexpected(point_id, answer)

    async def write(self, point_id: str, value: Value) -> None:
        """Write a value, through the first worker."""
        match await self._call(point_id, lambda call: WritePoint(call, point_id, value)):
            case WriteDone():
                return
            case answer:
                raise _unexpected(point_id, answer)

    async def _call(self, point_id: str, request: Callable[[int], Frame]) -> _Answer:
        """Send the first worker ``request(call)`` and wait for its answer; a ``CallFailed``
        is raised as the ``WriteError`` it reports."""
        running = self.processes.get(0)
        if running is None or running.writer.is_closing():
            raise WriteError(point_id, "the source's worker process is not running",
                             ErrorCategory.TRANSIENT)
        call = next(self._calls)
        reply: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self._replies[call] = reply
        running.writer.write(_frame(request(call)))
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                answer = await reply
        except TimeoutError:
            raise WriteError(point_id, f"the worker process did not answer within "
                             f"{CALL_TIMEOUT:g}s", ErrorCategory.TRANSIENT) from None
        finally:
            self._replies.pop(call, None)
        if isinstance(answer, CallFailed):
            raise WriteError(answer.point, answer.reason, answer.category)
        return answer


def _unexpected(point_id: str, answer: _Answer) -> WriteError:
    return WriteError(point_id, f"the worker process answered with {type(answer).__name__}",
                      ErrorCategory.PROTOCOL)


def _combine(snapshots: list[tuple[int, dict[str, Any]]], workers: int) -> dict[str, Any]:
    """One status of several workers': up when all are up, degraded when some are not, down
    when none is up and one is down; the most recent error of any."""
    states = [ConnectionState(each["state"]) for _, each in snapshots]
    up = [state for state in states if state in (ConnectionState.UP, ConnectionState.DEGRADED)]
    errors = sorted((each for _, each in snapshots if each["last_error_at"] is not None),
                    key=lambda each: each["last_error_at"])
    latest_error = errors[-1] if errors else None
    if len(up) == workers and all(state is ConnectionState.UP for state in up):
        state = ConnectionState.UP
    elif up:
        state = ConnectionState.DEGRADED
    elif ConnectionState.DOWN in states:
        state = ConnectionState.DOWN
    else:
        state = ConnectionState.CONNECTING
    children: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for _, each in snapshots:
        children.update(each["children"])
        details.update({key: value for key, value in each["details"].items()
                        if key != "retry_in"})
    successes = [each["last_success"] for _, each in snapshots
                 if each["last_success"] is not None]
    return {
        "state": state.value,
        "since": max(each["since"] for _, each in snapshots) if snapshots else time.time(),
        "last_success": max(successes) if successes else None,
        "last_error": latest_error["last_error"] if latest_error else None,
        "error_category": latest_error["error_category"] if latest_error else None,
        "last_error_at": latest_error["last_error_at"] if latest_error else None,
        "details": details,
        "children": children,
    }


def _forget(running: _Process, status: EndpointStatus) -> None:
    workers = status.details.get("workers")
    if isinstance(workers, list):
        status.details["workers"] = [entry for entry in workers
                                     if entry.get("worker") != running.index]


async def _stop_process(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after ``STOP_GRACE``; waits until the process is gone. Cancelled
    meanwhile (a shutdown that ran out of patience), it kills the process at once."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(STOP_GRACE):
                await process.wait()
        except TimeoutError:
            logger.warning("worker process %d did not stop on SIGTERM; killing it", process.pid)
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await process.wait()



class SinkWorker(Sink):
    """A sink that publishes from a worker process; stands in for it in the daemon.

    The daemon keeps the outbox: rows are still routed, addressed (with ``inner``, the same
    sink built here and never run) and stored by it. The worker process runs the sink itself
    (connection, publishing, confirms) against a view of the outbox whose reads and deletions
    the daemon carries out, so publishing takes no time from the daemon's core.
    """

    def __init__(self, inner: Sink, spec: SinkWorkerSpec) -> None:
        super().__init__(sink_id=inner.id, protocol=inner.protocol, endpoint=inner.endpoint,
                         selector=inner.selector)
        self.inner = inner
        self.spec = spec
        self.pid: int | None = None
        """The worker process, while it runs."""
        self._details: dict[str, Any] = {}

    def route(self) -> OutboxRoute:
        """The inner sink's route: the daemon stores its rows."""
        return self.inner.route()

    def address(self, event: Event) -> str:
        """The inner sink's address of ``event``."""
        return self.inner.address(event)

    def details(self) -> dict[str, Any]:
        """The publishing figures the worker process reported last, and its pid."""
        return {**(self._details or self.inner.details()), "worker_pid": self.pid}

    async def run(self, context: SinkContext) -> None:
        """Start the worker process and serve its outbox reads and deletions until cancelled;
        raises ``ConnectorError`` when the process exits."""
        outbox = context.outbox
        if not isinstance(outbox, SinkOutbox):
            raise ConnectorError(self.endpoint, "a sink worker needs the daemon's outbox",
                                 ErrorCategory.CONFIG)
        process, reader, writer = await _spawn(self.endpoint, "sink worker process")
        self.pid = process.pid
        counted: Counter[str] = Counter()
        answering: set[asyncio.Task[None]] = set()
        try:
            async with asyncio.TaskGroup() as group:
                announcing = group.create_task(self._announce(outbox, writer),
                                               name=f"sink-worker[{self.id}].announce")
                writer.write(_start(self.spec))
                async for frame in _frames(reader, _SINK_REQUESTS, self.endpoint):
                    match frame:
                        case Status(snapshot=snapshot, details=details):
                            counted = _add_counters(context.status, counted,
                                                    snapshot["counters"])
                            context.status.mirror(snapshot, counters=False)
                            self._details = details
                        case ReadRows() | ConfirmRows():
                            task = group.create_task(
                                self._answer(outbox, writer, frame),
                                name=f"sink-worker[{self.id}].call[{frame.call}]")
                            answering.add(task)
                            task.add_done_callback(answering.discard)
                announcing.cancel()
                # Confirmed rows are still deleted; the body waits for it, so that a failure
                # meanwhile is raised here (see WorkerSource.run on Python 3.11's TaskGroup).
                if answering:
                    await asyncio.wait(answering)
            code = await process.wait()
            raise ConnectorError(self.endpoint, f"sink worker process (pid {process.pid}) "
                                 f"exited with status {code}", ErrorCategory.PROTOCOL)
        except BaseExceptionGroup as failures:
            raise primary_failure(failures) from None
        finally:
            self.pid = None
            self._details = {}
            writer.close()
            await _stop_process(process)

    @staticmethod
    async def _announce(outbox: SinkOutbox, writer: asyncio.StreamWriter) -> None:
        """Tell the worker whenever rows were stored for it (it reads them then)."""
        signal = outbox.signal
        while True:
            await signal.wait()
            signal.clear()
            if not writer.is_closing():
                writer.write(_frame(Arrivals(outbox.arrivals)))

    @staticmethod
    async def _answer(outbox: SinkOutbox, writer: asyncio.StreamWriter,
                      request: ReadRows | ConfirmRows) -> None:
        """Carry out one outbox read or deletion for the worker and answer it."""
        answer: Rows | Confirmed
        match request:
            case ReadRows(call=call, after=after, limit=limit):
                rows = outbox.take(after, limit)
                if rows is None:
                    rows = await outbox.read(after, limit)
                answer = Rows(call, rows)
            case ConfirmRows(call=call, seqs=seqs):
                answer = Confirmed(call, await outbox.confirm(seqs))
        if not writer.is_closing():
            writer.write(_frame(answer))


def build_worker_unit(unit: SourceUnit, source: SourceBase, points: Sequence[ResolvedPoint],
                      context: BuildContext) -> SourceUnit:
    """The daemon's stand-in for a source with ``workers`` set: its mapping stays the one
    built here (live reads map with it), its connection moves to the workers."""
    spec = WorkerSpec(source, list(points), context.bridge_id, context.state_dir,
                      context.config_dir, 0)
    return SourceUnit(source=WorkerSource(unit.source, spec, source.workers), mapper=unit.mapper)


# --- in the worker process -------------------------------------------------------------------


class _Worker:
    """The worker's end: runs the source, sends its events and status, settles its acks."""

    def __init__(self, spec: WorkerSpec, writer: asyncio.StreamWriter) -> None:
        context = BuildContext(bridge_id=spec.bridge_id, state_dir=spec.state_dir,
                               config_dir=spec.config_dir, worker=spec.index)
        self.unit = protocols()[spec.source.protocol].source_unit(spec.source, spec.points,
                                                                 context)
        self.status = source_status(self.unit)
        self.writer = writer
        self.pending: dict[int, list[Settlement]] = {}
        self.batches = itertools.count(1)
        self.room = asyncio.Condition()
        source = self.unit.source
        self.name = f"{source.protocol}[{source.id}]"
        """The prefix of the names of its tasks."""

    async def publish(self, readings: Sequence[Reading]) -> None:
        """Map ``readings`` and send their events; waits while the daemon is behind."""
        events, settlements = map_readings(self.unit.mapper, self.status, readings)
        if not events and not settlements:
            return
        batch = 0
        if settlements:
            async with self.room:
                await self.room.wait_for(lambda: len(self.pending) < MAX_UNSETTLED)
            batch = next(self.batches)
            self.pending[batch] = settlements
        # Serialized here, on the worker's core: the daemon stores the bodies as they come.
        serialized = [msgspec.structs.replace(event, body=event.to_json()) for event in events]
        self.writer.write(_frame(Events(batch, serialized)))
        await self.writer.drain()

    async def stored(self, batch: int) -> None:
        """The daemon stored a batch: settle its upstream messages."""
        for ack, reason in self.pending.pop(batch, ()):
            try:
                if reason is None:
                    await ack.accept()
                else:
                    await ack.reject(reason)
            except Exception:
                # The upstream connection may be gone; it will redeliver.
                self.status.counters["settle_errors"] += 1
                logger.exception("cannot settle an upstream message")
        async with self.room:
            self.room.notify_all()

    async def read(self, call: int, point_id: str) -> None:
        """Read a point now for the daemon and answer with the readings."""
        answer: Frame
        try:
            readings = await self.unit.source.read(point_id)
            answer = ReadDone(call, pickle.dumps(readings, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:
            answer = _call_failed(call, point_id, exc)
        self._send(answer)

    async def write(self, call: int, point_id: str, value: Value) -> None:
        """Write a value for the daemon and answer."""
        answer: Frame
        try:
            await self.unit.source.write(point_id, value)
            answer = WriteDone(call)
        except Exception as exc:
            answer = _call_failed(call, point_id, exc)
        self._send(answer)

    def _send(self, frame: Frame) -> None:
        if not self.writer.is_closing():
            self.writer.write(_frame(frame))

    async def listen(self, reader: asyncio.StreamReader, group: asyncio.TaskGroup) -> None:
        """Take the daemon's orders until it closes the socket."""
        async for frame in _frames(reader, _SOURCE_ORDERS, "daemon"):
            match frame:
                case Stored(batch=batch):
                    await self.stored(batch)
                case ReadPoint(call=call, point=point):
                    group.create_task(self.read(call, point), name=f"{self.name}.read[{call}]")
                case WritePoint(call=call, point=point, value=value):
                    group.create_task(self.write(call, point, value),
                                      name=f"{self.name}.write[{call}]")


def _call_failed(call: int, point_id: str, exc: Exception) -> CallFailed:
    """The answer to a live read or write that raised ``exc``: the daemon raises it again as
    a ``WriteError``, which the API reports."""
    if isinstance(exc, WriteError):
        return CallFailed(call, exc.point, exc.reason, exc.category)
    return CallFailed(call, point_id, f"{type(exc).__name__}: {exc}", ErrorCategory.PROTOCOL)


class _RemoteOutbox:
    """The outbox as a sink sees it in a worker process: reads and deletions go to the daemon,
    which announces the rows it stores."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.signal = asyncio.Event()
        """Set when rows were stored for the sink, or by the sink itself to wake its loop."""
        self.arrivals = 0
        """The daemon's count of batches stored with rows for this sink."""
        self._calls = itertools.count(1)
        self._reads: dict[int, asyncio.Future[list[OutboxRow]]] = {}
        self._confirms: dict[int, asyncio.Future[int]] = {}

    def _ask(self, replies: dict[int, asyncio.Future[_ResultT]],
             request: Callable[[int], Frame]) -> asyncio.Future[_ResultT]:
        reply: asyncio.Future[_ResultT] = asyncio.get_running_loop().create_future()
        if self.writer.is_closing():
            reply.set_exception(ConnectorError("daemon", "the daemon is gone",
                                               ErrorCategory.TRANSIENT))
            return reply
        call = next(self._calls)
        replies[call] = reply
        self.writer.write(_frame(request(call)))
        return reply

    def read(self, after: int, limit: int) -> asyncio.Future[list[OutboxRow]]:
        """The oldest ``limit`` rows after ``after``, read by the daemon."""
        return self._ask(self._reads, lambda call: ReadRows(call, after, limit))

    def take(self, after: int, limit: int) -> list[OutboxRow] | None:
        """Always ``None``: the daemon serves every read from its own feed or the table."""
        return None

    def confirm(self, seqs: Sequence[int]) -> asyncio.Future[int]:
        """Have the daemon delete rows the broker confirmed."""
        return self._ask(self._confirms, lambda call: ConfirmRows(call, list(seqs)))

    def answered(self, answer: Rows | Confirmed) -> None:
        """The daemon's answer to one call."""
        match answer:
            case Rows(call=call, rows=rows):
                _settle(self._reads.pop(call, None), rows)
            case Confirmed(call=call, deleted=deleted):
                _settle(self._confirms.pop(call, None), deleted)

    def announced(self, arrivals: int) -> None:
        """The daemon stored rows for the sink."""
        self.arrivals = arrivals
        self.signal.set()

    def close(self) -> None:
        """The daemon is gone: fail what waits for it (the rows stay in its outbox)."""
        waiting: list[asyncio.Future[Any]] = [*self._reads.values(), *self._confirms.values()]
        for reply in waiting:
            if not reply.done():
                reply.set_exception(ConnectorError("daemon", "the daemon is gone",
                                                   ErrorCategory.TRANSIENT))
        self._reads.clear()
        self._confirms.clear()


async def _serve_sink(spec: SinkWorkerSpec, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    """Run a sink against the daemon's outbox until the daemon closes the socket."""
    context = BuildContext(bridge_id=spec.bridge_id, state_dir=spec.state_dir,
                           config_dir=spec.config_dir)
    sink = protocols()[spec.sink.protocol].sink(spec.sink, context)
    status = EndpointStatus(name=sink.id, kind="sink", protocol=sink.protocol,
                            endpoint=sink.endpoint)
    outbox = _RemoteOutbox(writer)
    logger.info("sink %s publishes from worker process %d", sink.id, os.getpid())
    try:
        async with asyncio.TaskGroup() as group:
            publishing = group.create_task(
                supervise(sink, SinkContext(status=status, outbox=outbox, deliver=deliver),
                          Backoff()),
                name=f"{sink.protocol}[{sink.id}].sink")
            reporting = group.create_task(
                _report(writer, status, sink.details), name=f"{sink.protocol}[{sink.id}].status")
            async for frame in _frames(reader, _SINK_ANSWERS, "daemon"):
                match frame:
                    case Rows() | Confirmed():
                        outbox.answered(frame)
                    case Arrivals(count=count):
                        outbox.announced(count)
            outbox.close()
            publishing.cancel()
            reporting.cancel()
    finally:
        outbox.close()


async def _report(writer: asyncio.StreamWriter, status: EndpointStatus,
                  details: Callable[[], dict[str, Any]] | None = None) -> None:
    """Send the status (and ``details()``) whenever it changed, a few times a second."""
    last: Status | None = None
    while True:
        current = Status(status.snapshot(), details() if details is not None else {})
        if current != last and not writer.is_closing():
            writer.write(_frame(current))
            last = current
        await asyncio.sleep(STATUS_EVERY)


async def _serve_source(spec: WorkerSpec, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    """Run a source, sending its events to the daemon, until the daemon closes the socket."""
    worker = _Worker(spec, writer)
    source = worker.unit.source
    logger.info("worker %d of source %s started (pid %d)", spec.index, source.id, os.getpid())
    context = SourceContext(status=worker.status, publish=worker.publish)
    async with asyncio.TaskGroup() as group:
        connection = group.create_task(supervise(source, context, Backoff()), name=worker.name)
        reporter = group.create_task(_report(writer, worker.status),
                                     name=f"{worker.name}.status")
        await worker.listen(reader, group)
        connection.cancel()
        reporter.cancel()


async def _serve_spec(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Take the ``Start`` frame and run what it says until the daemon closes the socket."""
    start = await _read_frame(reader, _STARTS, "daemon")
    if start is None:
        logger.info("the daemon closed the socket before saying what to run")
        return
    spec = pickle.loads(start.spec)
    match spec:
        case SinkWorkerSpec():
            await _serve_sink(spec, reader, writer)
        case WorkerSpec():
            await _serve_source(spec, reader, writer)
        case _:
            raise TypeError(f"a worker cannot run a {type(spec).__name__}")


async def _serve(fd: int) -> None:
    """Serve the daemon on socket ``fd`` until it closes the socket or SIGTERM (or SIGINT)
    arrives: either ends the process normally."""
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stopping.set)
    try:
        async with asyncio.TaskGroup() as group:
            serving = group.create_task(_serve_spec(reader, writer), name="worker")
            serving.add_done_callback(lambda _: stopping.set())
            # A signal stops the serving task, whose stopping the group waits for; the body
            # waits meanwhile so that a failure of that task is raised here.
            await stopping.wait()
            serving.cancel()
    except BaseExceptionGroup as failures:
        raise primary_failure(failures) from None
    finally:
        writer.close()


def run_worker(fd: int) -> int:
    """Entry point of ``fieldbridge worker``: serve the daemon on socket ``fd`` until it closes
    the socket or sends SIGTERM."""
    aio.run(_serve(fd))
    return 0
