"""Sinks in worker processes: the daemon's side of the delivery, and the worker's end.

A sink configured with ``workers`` publishes from a child process. The daemon keeps the
outbox: rows are still routed, addressed (by the sink built in the daemon, never connected)
and stored by it. The worker process runs the sink and the delivery engine against a view of
the outbox whose reads and deletions the daemon carries out (``RemoteOutbox``), so publishing
takes no time from the daemon's core. The worker reports the sink's status, the engine's
figures and the sink's own details; the daemon shows them in the inventory.

This module may import the core, the registry, the errors, the supervisor, the delivery
engine and the worker's frames and lifecycle.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from bridge.core.aio import primary_failure
from bridge.core.sink import OutboxRow, Sink
from bridge.core.source import BuildContext
from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory
from bridge.pipeline.delivery import (
    DeliveryContext,
    DeliveryFigures,
    SinkDelivery,
    SinkOutbox,
)
from bridge.pipeline.supervisor import Backoff, supervise
from bridge.pipeline.worker.frames import (
    SINK_ANSWERS,
    SINK_REQUESTS,
    Arrivals,
    Confirmed,
    ConfirmRows,
    ReadRows,
    ResultT,
    Rows,
    SinkWorkerSpec,
    Status,
    WorkerFrame,
    answer_call,
    encode,
    read_frames,
    start,
)
from bridge.pipeline.worker.lifecycle import add_counters, report_status, spawn, stop_process
from bridge.registry import protocols

logger = logging.getLogger(__name__)


# --- in the daemon ---------------------------------------------------------------------------


class SinkWorker(SinkDelivery):
    """A sink's delivery carried out in a worker process; stands in for it in the daemon.

    ``sink`` is the sink built here: it is never connected, it routes and addresses the rows
    the daemon stores. The figures are those the worker process reported last.
    """

    def __init__(self, sink: Sink, spec: SinkWorkerSpec) -> None:
        super().__init__(sink)
        self.spec = spec
        self.pid: int | None = None
        """The worker process, while it runs."""
        self._reported: dict[str, Any] = {}

    def details(self) -> dict[str, Any]:
        """The publishing figures the worker process reported last, and its pid."""
        return {**(self._reported or super().details()), "worker_pid": self.pid}

    async def run(self, context: DeliveryContext) -> None:
        """Start the worker process and serve its outbox reads and deletions until cancelled;
        raises ``ConnectorError`` when the process exits."""
        outbox = context.outbox
        if not isinstance(outbox, SinkOutbox):
            raise ConnectorError(self.sink.endpoint, "a sink worker needs the daemon's outbox",
                                 ErrorCategory.CONFIG)
        endpoint = self.sink.endpoint
        process, reader, writer = await spawn(endpoint, "sink worker process")
        self.pid = process.pid
        counted: dict[str, int] = {}
        answering: set[asyncio.Task[None]] = set()
        try:
            async with asyncio.TaskGroup() as group:
                announcing = group.create_task(self._announce(outbox, writer),
                                               name=f"sink-worker[{self.id}].announce")
                writer.write(start(self.spec))
                async for frame in read_frames(reader, SINK_REQUESTS, endpoint):
                    match frame:
                        case Status(status=snapshot, delivery=figures, details=details):
                            counted = add_counters(context.status, counted, snapshot.counters)
                            context.status.mirror(snapshot, counters=False)
                            self._reported_figures(figures, details)
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
            raise ConnectorError(endpoint, f"sink worker process (pid {process.pid}) "
                                 f"exited with status {code}", ErrorCategory.PROTOCOL)
        except BaseExceptionGroup as failures:
            raise primary_failure(failures) from None
        finally:
            self.pid = None
            self._reported = {}
            self.in_flight = 0
            writer.close()
            await stop_process(process)

    def _reported_figures(self, figures: DeliveryFigures | None,
                          details: dict[str, Any]) -> None:
        """Take the figures and details a worker's status report carries."""
        if figures is not None:
            self.in_flight = figures.in_flight
            self.confirm_latency = figures.confirm_latency
            self._reported = {**figures.details(), **details}
        else:
            self._reported = details

    @staticmethod
    async def _announce(outbox: SinkOutbox, writer: asyncio.StreamWriter) -> None:
        """Tell the worker whenever rows were stored for it (it reads them then)."""
        signal = outbox.signal
        while True:
            await signal.wait()
            signal.clear()
            if not writer.is_closing():
                writer.write(encode(Arrivals(outbox.arrivals)))

    @staticmethod
    async def _answer(outbox: SinkOutbox, writer: asyncio.StreamWriter,
                      request: ReadRows | ConfirmRows) -> None:
        """Carry out one outbox read or deletion for the worker and answer it."""
        reply: Rows | Confirmed
        match request:
            case ReadRows(call=call, after=after, limit=limit):
                rows = outbox.take(after, limit)
                if rows is None:
                    rows = await outbox.read(after, limit)
                reply = Rows(call, rows)
            case ConfirmRows(call=call, seqs=seqs):
                reply = Confirmed(call, await outbox.confirm(seqs))
        if not writer.is_closing():
            writer.write(encode(reply))


# --- in the worker process -------------------------------------------------------------------


class RemoteOutbox:
    """The outbox as the delivery engine sees it in a worker process: reads and deletions go
    to the daemon, which announces the rows it stores."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.signal = asyncio.Event()
        """Set when rows were stored for the sink, or by the engine itself to wake its loop."""
        self.arrivals = 0
        """The daemon's count of batches stored with rows for this sink."""
        self._calls = itertools.count(1)
        self._reads: dict[int, asyncio.Future[list[OutboxRow]]] = {}
        self._confirms: dict[int, asyncio.Future[int]] = {}

    def _ask(self, replies: dict[int, asyncio.Future[ResultT]],
             request: Callable[[int], WorkerFrame]) -> asyncio.Future[ResultT]:
        reply: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        if self.writer.is_closing():
            reply.set_exception(ConnectorError("daemon", "the daemon is gone",
                                               ErrorCategory.TRANSIENT))
            return reply
        call = next(self._calls)
        replies[call] = reply
        self.writer.write(encode(request(call)))
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

    def answered(self, reply: Rows | Confirmed) -> None:
        """The daemon's answer to one call."""
        match reply:
            case Rows(call=call, rows=rows):
                answer_call(self._reads.pop(call, None), rows)
            case Confirmed(call=call, deleted=deleted):
                answer_call(self._confirms.pop(call, None), deleted)

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


async def serve_sink(spec: SinkWorkerSpec, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    """Run a sink against the daemon's outbox until the daemon closes the socket."""
    context = BuildContext(bridge_id=spec.bridge_id, state_dir=spec.state_dir,
                           config_dir=spec.config_dir)
    sink = protocols()[spec.sink.protocol].sink(spec.sink, context)
    delivery = SinkDelivery(sink)
    status = EndpointStatus(name=sink.id, kind="sink", protocol=sink.protocol,
                            endpoint=sink.endpoint)
    outbox = RemoteOutbox(writer)
    logger.info("sink %s publishes from worker process %d", sink.id, os.getpid())

    def current() -> Status:
        return Status(status.snapshot(), delivery.figures(), sink.details())

    try:
        async with asyncio.TaskGroup() as group:
            publishing = group.create_task(
                supervise(delivery, DeliveryContext(status=status, outbox=outbox), Backoff()),
                name=f"{sink.protocol}[{sink.id}].sink")
            reporting = group.create_task(report_status(writer, current),
                                          name=f"{sink.protocol}[{sink.id}].status")
            async for frame in read_frames(reader, SINK_ANSWERS, "daemon"):
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
