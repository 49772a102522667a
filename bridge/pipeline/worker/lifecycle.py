"""A worker process's life as both ends see it: started, reporting its status, stopped.

The daemon starts ``fieldbridge worker`` with one end of a private socket pair (``spawn``) and
stops it with SIGTERM, then SIGKILL (``stop_process``). The worker reports its status a few
times a second when it changed (``report_status``); the daemon adds the counters it reports to
its own (``add_counters``).

This module may import the core, the errors and the worker's frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping

from bridge.core.counters import declared
from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory
from bridge.pipeline.worker.frames import Status, encode

logger = logging.getLogger(__name__)

STATUS_EVERY = 0.25
"""Seconds between a worker's status reports (sent only when something changed)."""
STOP_GRACE = 2.0
"""Seconds a worker process has to exit after SIGTERM before it is killed (less than the
runtime's own patience with a stopping task)."""

_CHILD_ENVIRONMENT_DROPS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                            "LISTEN_PID", "LISTEN_FDNAMES")
"""systemd's hand-offs to the daemon itself, which a child must not answer."""


async def spawn(endpoint: str, what: str) -> tuple[
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
        await stop_process(process)
        raise
    return process, reader, writer


async def stop_process(process: asyncio.subprocess.Process) -> None:
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


async def report_status(writer: asyncio.StreamWriter, current: Callable[[], Status]) -> None:
    """Send the ``current()`` status whenever it changed, a few times a second."""
    last: Status | None = None
    while True:
        status = current()
        if status != last and not writer.is_closing():
            writer.write(encode(status))
            last = status
        await asyncio.sleep(STATUS_EVERY)


def add_counters(status: EndpointStatus, counted: Mapping[str, int],
                 counters: Mapping[str, int]) -> dict[str, int]:
    """Add to ``status`` what a worker counted since ``counted``; returns the new mark.

    The names are checked against the declarations: ``UndeclaredCounterError`` for any other."""
    for name, value in counters.items():
        status.counters.add(declared(name), value - counted.get(name, 0))
    return dict(counters)
