"""The worker process's main: serve the daemon on the socket it was started with.

``fieldbridge worker --fd N`` reads the ``Start`` frame, runs the source or the sink it names
(``serve_source``, ``serve_sink``) and exits when the daemon closes the socket or sends
SIGTERM (or SIGINT).

This module may import the core and the worker's frames and both of its sides.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import socket

from bridge.core import aio
from bridge.core.aio import primary_failure
from bridge.pipeline.worker.frames import STARTS, SinkWorkerSpec, WorkerSpec, read_frame
from bridge.pipeline.worker.sink_worker import serve_sink
from bridge.pipeline.worker.source_worker import serve_source

logger = logging.getLogger(__name__)


async def _serve_spec(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Take the ``Start`` frame and run what it says until the daemon closes the socket."""
    start = await read_frame(reader, STARTS, "daemon")
    if start is None:
        logger.info("the daemon closed the socket before saying what to run")
        return
    spec = pickle.loads(start.spec)
    match spec:
        case SinkWorkerSpec():
            await serve_sink(spec, reader, writer)
        case WorkerSpec():
            await serve_source(spec, reader, writer)
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
