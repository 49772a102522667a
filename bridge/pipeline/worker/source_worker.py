"""Sources in worker processes: the daemon's stand-in for the source, and the worker's end.

A source configured with ``workers: N`` runs in N child processes, each started by the daemon
(``WorkerSource``) with one end of a private socket pair. The daemon sends the worker what to
run (the source's configuration and resolved points); the worker connects, maps its readings
into events exactly as the daemon would, and sends the events in batches, already serialized.
The daemon hands them to its router, which stores them (history, last values, outbox) as it
stores any source's; once a batch is stored the daemon tells the worker, which only then
settles the batch's upstream messages (MQTT QoS 1/2, AMQP). The delivery promise is the one
of a single process: no message is acknowledged upstream before its events are committed.

The worker supervises its own connection (reconnects with backoff) and reports its status
(state, counters, devices); the daemon combines the workers' into the source's, with one entry
per worker under ``details.workers``. Live reads and writes through the API are relayed to the
first worker.

This module may import the config models, the core, the registry, the errors, the supervisor
and the worker's frames and lifecycle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from bridge.config.models import ResolvedPoint, SourceBase
from bridge.core.aio import primary_failure
from bridge.core.counters import EVENTS, READINGS, SETTLE_ERRORS
from bridge.core.model import Reading, Settlement, Value
from bridge.core.source import BuildContext, Source, SourceContext, SourceUnit, map_readings
from bridge.core.status import ConnectionState, EndpointStatus, StatusSnapshot
from bridge.errors import ConnectorError, DeviceError, ErrorCategory, ReadError, WriteError
from bridge.pipeline.supervisor import Backoff, source_status, supervise
from bridge.pipeline.worker.frames import (
    SOURCE_ORDERS,
    SOURCE_REPORTS,
    CallFailed,
    Events,
    ReadDone,
    ReadPoint,
    Status,
    Stored,
    WorkerFrame,
    WorkerSpec,
    WriteDone,
    WritePoint,
    answer_call,
    encode,
    read_frames,
    start,
)
from bridge.pipeline.worker.lifecycle import add_counters, report_status, spawn, stop_process
from bridge.registry import protocols

logger = logging.getLogger(__name__)

MAX_UNSETTLED = 64
"""Batches with upstream messages a worker may have waiting to be stored before it waits."""
CALL_TIMEOUT = 30.0
"""Seconds a relayed live read or write may take."""


# --- in the daemon ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stored:
    """Tells a worker that one of its batches is stored (the router settles it in order)."""

    writer: asyncio.StreamWriter
    batch: int

    async def accept(self) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(Stored(self.batch)))

    async def reject(self, reason: str) -> None:
        # The worker knows, per message, which to accept and which to dead-letter.
        await self.accept()


@dataclass
class _Process:
    """One running worker process, as the daemon sees it."""

    index: int
    pid: int
    writer: asyncio.StreamWriter
    counted: dict[str, int]
    """Its counters as last added to the source's."""
    snapshot: StatusSnapshot | None = None


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
        process, reader, writer = await spawn(self.endpoint, f"worker process {index}")
        running = _Process(index, process.pid, writer, {})
        self.processes[index] = running
        try:
            writer.write(start(dataclasses.replace(self.spec, index=index)))
            async for frame in read_frames(reader, SOURCE_REPORTS, self.endpoint):
                match frame:
                    case Events(batch=batch, events=events):
                        settlements: list[Settlement] = (
                            [(_Stored(writer, batch), None)] if batch else [])
                        await submit(events, settlements)
                    case Status(status=snapshot):
                        self._mirror(running, snapshot, context.status)
                    case ReadDone(call=call) | WriteDone(call=call) | CallFailed(call=call):
                        answer_call(self._replies.pop(call, None), frame)
            code = await process.wait()
            raise ConnectorError(self.endpoint, f"worker process {index} (pid {process.pid}) "
                                 f"exited with status {code}", ErrorCategory.PROTOCOL)
        finally:
            del self.processes[index]
            writer.close()
            await stop_process(process)
            _forget(running, context.status)

    def _mirror(self, running: _Process, snapshot: StatusSnapshot,
                status: EndpointStatus) -> None:
        """Fold one worker's status into the source's: counters added, state combined."""
        running.snapshot = snapshot
        running.counted = add_counters(status, running.counted, snapshot.counters)
        snapshots = [(process.index, process.snapshot) for process in self.processes.values()
                     if process.snapshot is not None]
        status.mirror(_combine([each for _, each in snapshots], self.workers), counters=False)
        status.details["workers"] = [
            {"worker": index, "pid": self.processes[index].pid, "state": each.state.value,
             "last_error": each.last_error,
             READINGS.name: each.counters.get(READINGS.name, 0),
             EVENTS.name: each.counters.get(EVENTS.name, 0)}
            for index, each in sorted(snapshots, key=lambda item: item[0])]

    async def read(self, point_id: str) -> list[Reading]:
        """Read one point now, through the first worker."""
        match await self._call(point_id, lambda call: ReadPoint(call, point_id), ReadError):
            case ReadDone(readings=readings):
                result: list[Reading] = pickle.loads(readings)
                return result
            case answer:
                raise _unexpected(point_id, answer, ReadError)

    async def write(self, point_id: str, value: Value) -> None:
        """Write a value, through the first worker."""
        match await self._call(point_id, lambda call: WritePoint(call, point_id, value),
                              WriteError):
            case WriteDone():
                return
            case answer:
                raise _unexpected(point_id, answer, WriteError)

    async def _call(self, point_id: str, request: Callable[[int], WorkerFrame],
                    error: type[DeviceError]) -> _Answer:
        """Send the first worker ``request(call)`` and wait for its answer; a ``CallFailed``
        (or no answer) is raised as ``error`` (a ``ReadError`` or a ``WriteError``)."""
        running = self.processes.get(0)
        if running is None or running.writer.is_closing():
            raise error(point_id, "the source's worker process is not running",
                             ErrorCategory.TRANSIENT)
        call = next(self._calls)
        reply: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self._replies[call] = reply
        running.writer.write(encode(request(call)))
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                answer = await reply
        except TimeoutError:
            raise error(point_id, f"the worker process did not answer within "
                             f"{CALL_TIMEOUT:g}s", ErrorCategory.TRANSIENT) from None
        finally:
            self._replies.pop(call, None)
        if isinstance(answer, CallFailed):
            raise error(answer.point, answer.reason, answer.category)
        return answer


def _unexpected(point_id: str, answer: _Answer, error: type[DeviceError]) -> DeviceError:
    return error(point_id, f"the worker process answered with {type(answer).__name__}",
                 ErrorCategory.PROTOCOL)


def _combine(snapshots: Sequence[StatusSnapshot], workers: int) -> StatusSnapshot:
    """One status of several workers': up when all are up, degraded when some are not, down
    when none is up and one is down; the most recent error of any."""
    states = [each.state for each in snapshots]
    up = [state for state in states if state in (ConnectionState.UP, ConnectionState.DEGRADED)]
    errors = sorted(((each.last_error_at, each) for each in snapshots
                     if each.last_error_at is not None), key=lambda item: item[0])
    latest_error = errors[-1][1] if errors else None
    if len(up) == workers and all(state is ConnectionState.UP for state in up):
        state = ConnectionState.UP
    elif up:
        state = ConnectionState.DEGRADED
    elif ConnectionState.DOWN in states:
        state = ConnectionState.DOWN
    else:
        state = ConnectionState.CONNECTING
    children: dict[str, StatusSnapshot] = {}
    details: dict[str, object] = {}
    for each in snapshots:
        children.update(each.children)
        details.update({key: value for key, value in each.details.items()
                        if key != "retry_in"})
    successes = [each.last_success for each in snapshots if each.last_success is not None]
    return StatusSnapshot(
        state=state,
        since=max(each.since for each in snapshots) if snapshots else time.time(),
        last_success=max(successes) if successes else None,
        last_error=latest_error.last_error if latest_error else None,
        error_category=latest_error.error_category if latest_error else None,
        last_error_at=latest_error.last_error_at if latest_error else None,
        details=details,
        children=children)


def _forget(running: _Process, status: EndpointStatus) -> None:
    workers = status.details.get("workers")
    if isinstance(workers, list):
        status.details["workers"] = [entry for entry in workers
                                     if entry.get("worker") != running.index]



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
        self.writer.write(encode(Events(batch, serialized)))
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
                self.status.counters.add(SETTLE_ERRORS)
                logger.exception("cannot settle an upstream message")
        async with self.room:
            self.room.notify_all()

    async def read(self, call: int, point_id: str) -> None:
        """Read a point now for the daemon and answer with the readings."""
        reply: WorkerFrame
        try:
            readings = await self.unit.source.read(point_id)
            reply = ReadDone(call, pickle.dumps(readings, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:
            reply = _call_failed(call, point_id, exc)
        self._send(reply)

    async def write(self, call: int, point_id: str, value: Value) -> None:
        """Write a value for the daemon and answer."""
        reply: WorkerFrame
        try:
            await self.unit.source.write(point_id, value)
            reply = WriteDone(call)
        except Exception as exc:
            reply = _call_failed(call, point_id, exc)
        self._send(reply)

    def _send(self, frame: WorkerFrame) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(frame))

    async def listen(self, reader: asyncio.StreamReader, group: asyncio.TaskGroup) -> None:
        """Take the daemon's orders until it closes the socket."""
        async for frame in read_frames(reader, SOURCE_ORDERS, "daemon"):
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
    as a ``ReadError`` or ``WriteError``, which the API reports."""
    if isinstance(exc, DeviceError):
        return CallFailed(call, exc.point, exc.reason, exc.category)
    return CallFailed(call, point_id, f"{type(exc).__name__}: {exc}", ErrorCategory.PROTOCOL)


async def serve_source(spec: WorkerSpec, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
    """Run a source, sending its events to the daemon, until the daemon closes the socket."""
    worker = _Worker(spec, writer)
    source = worker.unit.source
    logger.info("worker %d of source %s started (pid %d)", spec.index, source.id, os.getpid())
    context = SourceContext(status=worker.status, publish=worker.publish)
    async with asyncio.TaskGroup() as group:
        connection = group.create_task(supervise(source, context, Backoff()), name=worker.name)
        reporter = group.create_task(
            report_status(writer, lambda: Status(worker.status.snapshot())),
            name=f"{worker.name}.status")
        await worker.listen(reader, group)
        connection.cancel()
        reporter.cancel()


