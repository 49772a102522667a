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

Frames are a 4-byte big-endian length and a pickle: both ends are this program, on one
machine, over a socket pair nothing else can reach.
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
from typing import Any

from bridge.config.models import ResolvedPoint, SinkBase, SourceBase
from bridge.core.model import Event, Reading, Settlement, Value
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory, WriteError
from bridge.pipeline.outbox import OutboxRoute, OutboxRow
from bridge.pipeline.sink import Sink, SinkContext, SinkOutbox
from bridge.pipeline.source import BuildContext, Source, SourceContext, SourceUnit, map_readings
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


def _frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message; ``EOFError`` once the other end closed."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        return pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise EOFError from exc


async def _frames(reader: asyncio.StreamReader) -> AsyncIterator[Any]:
    """Every message until the other end closes the socket."""
    while True:
        try:
            yield await _read_frame(reader)
        except EOFError:
            return


def _event_row(event: Event) -> tuple[object, ...]:
    return (event.id, event.source, event.point, event.value, event.unit, event.quality,
            event.ts, event.received_at, event.protocol, event.bridge, event.tags,
            event.reason, event.to_json())


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
            self.writer.write(_frame(("stored", self.batch)))

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
        self._replies: dict[int, asyncio.Future[tuple[bool, Any]]] = {}

    def device_endpoints(self) -> dict[str, str]:
        """The devices of the source the workers run."""
        return self.inner.device_endpoints()

    async def run(self, context: SourceContext) -> None:
        """Start the worker processes and store what they send until cancelled; raises
        ``ConnectorError`` when one of them exits (the others are stopped too)."""
        if context.submit is None:
            raise ConnectorError(self.endpoint, "worker processes need a router to submit to",
                                 ErrorCategory.CONFIG)
        tasks = [asyncio.create_task(self._run_worker(index, context),
                                     name=f"worker[{self.id}.{index}]")
                 for index in range(self.workers)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
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
            writer.write(_frame(("source", dataclasses.replace(self.spec, index=index))))
            async for message in _frames(reader):
                kind = message[0]
                if kind == "events":
                    _, batch, rows = message
                    events = [Event(*row) for row in rows]
                    settlements: list[Settlement] = (
                        [(_Stored(writer, batch), None)] if batch else [])
                    await submit(events, settlements)
                elif kind == "status":
                    self._mirror(running, message[1], context.status)
                elif kind == "reply":
                    _, call, ok, payload = message
                    reply = self._replies.pop(call, None)
                    if reply is not None and not reply.done():
                        reply.set_result((ok, payload))
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
        result: list[Reading] = await self._call("read", point_id, None)
        return result

    async def write(self, point_id: str, value: Value) -> None:
        """Write a value, through the first worker."""
        await self._call("write", point_id, value)

    async def _call(self, operation: str, point_id: str, value: Value) -> Any:
        running = self.processes.get(0)
        if running is None or running.writer.is_closing():
            raise WriteError(point_id, "the source's worker process is not running",
                             ErrorCategory.TRANSIENT)
        call = next(self._calls)
        reply: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._replies[call] = reply
        running.writer.write(_frame(("call", call, operation, point_id, value)))
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                ok, payload = await reply
        except TimeoutError:
            raise WriteError(point_id, f"the worker process did not answer within "
                             f"{CALL_TIMEOUT:g}s", ErrorCategory.TRANSIENT) from None
        finally:
            self._replies.pop(call, None)
        if not ok:
            point, reason, category = payload
            raise WriteError(point, reason, ErrorCategory(category))
        return payload


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


@dataclass(frozen=True)
class SinkWorkerSpec:
    """What a sink's worker process runs: one sink, and where it runs."""

    sink: SinkBase
    bridge_id: str
    state_dir: Path
    config_dir: Path | None


def _row_tuple(row: OutboxRow) -> tuple[object, ...]:
    return (row.seq, row.id, row.source, row.point, row.quality, row.ts, row.created,
            row.address, row.size, row.body)


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
        calls: set[asyncio.Task[None]] = set()
        announcing = asyncio.create_task(self._announce(outbox, writer),
                                         name=f"sink-worker[{self.id}].announce")
        try:
            writer.write(_frame(("sink", self.spec)))
            async for message in _frames(reader):
                kind = message[0]
                if kind == "status":
                    _, snapshot, details = message
                    counted = _add_counters(context.status, counted, snapshot["counters"])
                    context.status.mirror(snapshot, counters=False)
                    self._details = details
                else:
                    task = asyncio.create_task(self._answer(outbox, writer, message))
                    calls.add(task)
                    task.add_done_callback(calls.discard)
            code = await process.wait()
            raise ConnectorError(self.endpoint, f"sink worker process (pid {process.pid}) "
                                 f"exited with status {code}", ErrorCategory.PROTOCOL)
        finally:
            self.pid = None
            self._details = {}
            for task in (announcing, *calls):
                task.cancel()
            await asyncio.gather(announcing, *calls, return_exceptions=True)
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
                writer.write(_frame(("arrivals", outbox.arrivals)))

    @staticmethod
    async def _answer(outbox: SinkOutbox, writer: asyncio.StreamWriter,
                      message: tuple[Any, ...]) -> None:
        """Carry out one outbox read or deletion for the worker and answer it."""
        kind, call = message[0], message[1]
        payload: object
        if kind == "read":
            after, limit = message[2], message[3]
            rows = outbox.take(after, limit)
            if rows is None:
                rows = await outbox.read(after, limit)
            payload = [_row_tuple(row) for row in rows]
        elif kind == "confirm":
            payload = await outbox.confirm(message[2])
        else:
            return
        if not writer.is_closing():
            writer.write(_frame(("reply", call, payload)))


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
        self.unit = protocols()[spec.source.protocol].build(spec.source, spec.points, context)
        self.status = source_status(self.unit)
        self.writer = writer
        self.pending: dict[int, list[Settlement]] = {}
        self.batches = itertools.count(1)
        self.room = asyncio.Condition()

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
        self.writer.write(_frame(("events", batch, [_event_row(event) for event in events])))
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

    async def call(self, call: int, operation: str, point_id: str, value: Value) -> None:
        """Carry out a live read or write for the daemon and answer."""
        source = self.unit.source
        try:
            payload: Any = None
            if operation == "read":
                payload = await source.read(point_id)
            else:
                await source.write(point_id, value)
            answer: tuple[object, ...] = ("reply", call, True, payload)
        except WriteError as exc:
            answer = ("reply", call, False, (exc.point, exc.reason, exc.category.value))
        except Exception as exc:
            answer = ("reply", call, False, (point_id, f"{type(exc).__name__}: {exc}",
                                             ErrorCategory.PROTOCOL.value))
        if not self.writer.is_closing():
            self.writer.write(_frame(answer))

    async def listen(self, reader: asyncio.StreamReader, group: asyncio.TaskGroup) -> None:
        """Take the daemon's messages until it closes the socket."""
        async for message in _frames(reader):
            if message[0] == "stored":
                await self.stored(message[1])
            elif message[0] == "call":
                _, call, operation, point_id, value = message
                group.create_task(self.call(call, operation, point_id, value))


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
        self._replies: dict[int, tuple[asyncio.Future[Any], bool]] = {}

    def _call(self, message: tuple[Any, ...], rows: bool) -> asyncio.Future[Any]:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.writer.is_closing():
            reply.set_exception(ConnectorError("daemon", "the daemon is gone",
                                               ErrorCategory.TRANSIENT))
            return reply
        call = next(self._calls)
        self._replies[call] = (reply, rows)
        self.writer.write(_frame((message[0], call, *message[1:])))
        return reply

    def read(self, after: int, limit: int) -> asyncio.Future[list[OutboxRow]]:
        """The oldest ``limit`` rows after ``after``, read by the daemon."""
        return self._call(("read", after, limit), rows=True)

    def take(self, after: int, limit: int) -> list[OutboxRow] | None:
        """Always ``None``: the daemon serves every read from its own feed or the table."""
        return None

    def confirm(self, seqs: Sequence[int]) -> asyncio.Future[int]:
        """Have the daemon delete rows the broker confirmed."""
        return self._call(("confirm", list(seqs)), rows=False)

    def answered(self, call: int, payload: Any) -> None:
        """The daemon's answer to one call."""
        reply, rows = self._replies.pop(call, (None, False))
        if reply is not None and not reply.done():
            reply.set_result([OutboxRow(*row) for row in payload] if rows else payload)

    def announced(self, arrivals: int) -> None:
        """The daemon stored rows for the sink."""
        self.arrivals = arrivals
        self.signal.set()

    def close(self) -> None:
        """The daemon is gone: fail what waits for it (the rows stay in its outbox)."""
        for reply, _ in self._replies.values():
            if not reply.done():
                reply.set_exception(ConnectorError("daemon", "the daemon is gone",
                                                   ErrorCategory.TRANSIENT))
        self._replies.clear()


async def _serve_sink(spec: SinkWorkerSpec, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    """Run a sink against the daemon's outbox until the daemon closes the socket."""
    context = BuildContext(bridge_id=spec.bridge_id, state_dir=spec.state_dir,
                           config_dir=spec.config_dir)
    build_sink = protocols()[spec.sink.protocol].build_sink
    assert build_sink is not None  # the config model exists only with a builder
    sink = build_sink(spec.sink, context)
    status = EndpointStatus(name=sink.id, kind="sink", protocol=sink.protocol,
                            endpoint=sink.endpoint)
    outbox = _RemoteOutbox(writer)
    logger.info("sink %s publishes from worker process %d", sink.id, os.getpid())
    try:
        async with asyncio.TaskGroup() as group:
            publishing = group.create_task(
                supervise(sink, SinkContext(status=status, outbox=outbox), Backoff()),
                name=f"{sink.protocol}[{sink.id}].sink")
            reporting = group.create_task(
                _report(writer, status, sink.details), name="status")
            async for message in _frames(reader):
                if message[0] == "reply":
                    outbox.answered(message[1], message[2])
                elif message[0] == "arrivals":
                    outbox.announced(message[1])
            outbox.close()
            publishing.cancel()
            reporting.cancel()
    finally:
        outbox.close()


async def _report(writer: asyncio.StreamWriter, status: EndpointStatus,
                  details: Callable[[], dict[str, Any]] | None = None) -> None:
    """Send the status (and ``details()``) whenever it changed, a few times a second."""
    last: tuple[dict[str, Any], dict[str, Any]] | None = None
    while True:
        current = (status.snapshot(), details() if details is not None else {})
        if current != last and not writer.is_closing():
            writer.write(_frame(("status", *current)))
            last = current
        await asyncio.sleep(STATUS_EVERY)


async def _serve(fd: int) -> None:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    loop.add_signal_handler(signal.SIGINT, main.cancel)
    try:
        kind, spec = await _read_frame(reader)
        if kind == "sink":
            await _serve_sink(spec, reader, writer)
        else:
            await _serve_source(spec, reader, writer)
    except (asyncio.CancelledError, EOFError):
        pass
    finally:
        writer.close()


async def _serve_source(spec: WorkerSpec, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    """Run a source, sending its events to the daemon, until the daemon closes the socket."""
    worker = _Worker(spec, writer)
    source = worker.unit.source
    logger.info("worker %d of source %s started (pid %d)", spec.index, source.id, os.getpid())
    context = SourceContext(status=worker.status, publish=worker.publish)
    async with asyncio.TaskGroup() as group:
        connection = group.create_task(supervise(source, context, Backoff()),
                                       name=f"{source.protocol}[{source.id}]")
        reporter = group.create_task(_report(writer, worker.status), name="status")
        await worker.listen(reader, group)
        connection.cancel()
        reporter.cancel()


def run_worker(fd: int) -> int:
    """Entry point of ``fieldbridge worker``: serve the daemon on socket ``fd`` until it closes
    the socket or sends SIGTERM."""
    asyncio.run(_serve(fd))
    return 0

