"""One MQTT client candidate subscribed to ``sensors/+/telemetry``: it decodes each payload
with ``json.loads`` and counts, and reports the CPU it used.

``--client aiomqtt|gmqtt``, ``--loop asyncio|uvloop``, ``--qos 0|1``; MQTT 3.1.1 for both
clients (the MQTT source's default), so the broker treats both alike.

At QoS 1 each message is acknowledged only after a simulated commit, as the daemon
acknowledges after its store commit: messages are gathered into batches (a batch ends when
the client has no further message at hand, or at 500), each batch is handed to a committer
that runs ``--commit-ms`` of sleep on the default executor's thread
(``loop.run_in_executor``), one batch after another, and only then are its PUBACKs sent.

- aiomqtt 2.5 has no manual-acknowledgement API of its own, so this does what the MQTT
  source does: paho's ``manual_ack_set(True)`` before connecting, then paho's
  ``ack(mid, qos)`` per message after the commit.
- gmqtt: ``optimistic_acknowledgement=False`` and an ``async`` ``on_message``; gmqtt runs
  each call as a task and sends the PUBACK with the reason code the coroutine returns, so the
  coroutine returns 0 (success) once its batch is committed. That is gmqtt's only public way
  to acknowledge late: a synchronous ``on_message`` is never acknowledged, and it is not
  given the packet id.
- ``gmqtt-direct`` (QoS 1 only): what gmqtt would cost without a task per message. Its
  handler's private ``_handle_qos_1_publish_packet`` is replaced on the instance by a
  synchronous function that decodes and counts, keeps the packet id, and sends the PUBACKs
  of a committed batch through the handler's private ``_send_puback``, as the MQTT source
  does with paho's ``ack``.

Prints ``{"ready": {}}`` once subscribed, then, after ``--expect`` messages or ``--idle``
seconds without one, ``{"received", "seconds", "cpu_seconds"}``: the messages read, the
seconds from the first to the last, and the CPU (user + system, every thread, from
``resource.getrusage``) from subscribed to done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import time
import uuid
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from bench.peers.control import say

TOPIC = "sensors/+/telemetry"
MAX_BATCH = 500
"""As the MQTT source: at most this many messages are handed on together."""


class Tally:
    """What the candidate has read so far."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    def note(self) -> None:
        """One more message read."""
        self.last = time.monotonic()
        if not self.count:
            self.first = self.last
        self.count += 1


class Committer:
    """Commits batches one after another on the default executor's thread, then calls each
    batch's acknowledgement: the daemon's order (store commit, then upstream acks)."""

    def __init__(self, commit_seconds: float) -> None:
        self.commit_seconds = commit_seconds
        self.queue: asyncio.Queue[Callable[[], None]] = asyncio.Queue()
        self.pending = 0
        """Batches submitted and not yet acknowledged."""

    def submit(self, acknowledge: Callable[[], None]) -> None:
        """Queue a batch: ``acknowledge`` runs once it is committed."""
        self.pending += 1
        self.queue.put_nowait(acknowledge)

    def _commit(self) -> None:
        if self.commit_seconds:
            time.sleep(self.commit_seconds)

    async def run(self) -> None:
        """Commit and acknowledge batches until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            acknowledge = await self.queue.get()
            await loop.run_in_executor(None, self._commit)
            acknowledge()
            self.pending -= 1


def acknowledge(ack: Callable[[int, int], Any], mids: list[int]) -> None:
    """Send the PUBACK of each QoS 1 message of a committed batch (paho's ``ack``)."""
    for mid in mids:
        ack(mid, 1)


async def until_done(reader: asyncio.Future[Any], tally: Tally, expect: int,
                     idle: float) -> None:
    """Wait until ``expect`` messages were read or none came for ``idle`` seconds (60 s
    before the first)."""
    started = time.monotonic()
    while not reader.done() and tally.count < expect:
        await asyncio.wait({reader}, timeout=0.25)
        quiet_since = tally.last if tally.count else started
        if time.monotonic() - quiet_since > (idle if tally.count else 60):
            break


async def run_aiomqtt(options: argparse.Namespace, tally: Tally,
                      committer: Committer | None) -> None:
    """aiomqtt's message iterator; at QoS 1, paho's manual acknowledgement."""
    import aiomqtt

    from protocols.mqtt import paho_adapter

    client = aiomqtt.Client(options.host, options.port, identifier=f"bench-{uuid.uuid4().hex}",
                            protocol=aiomqtt.ProtocolVersion.V311, clean_session=True)
    paho_client = paho_adapter.paho_client(client)
    if committer is not None:
        paho_client.manual_ack_set(True)

    async def read() -> None:
        messages = client.messages
        loads = json.loads
        note = tally.note
        if committer is None:
            async for message in messages:
                loads(message.payload)
                note()
            return
        ack = paho_client.ack
        batch: list[int] = []
        async for message in messages:
            loads(message.payload)
            note()
            batch.append(message.mid)
            if len(messages) == 0 or len(batch) >= MAX_BATCH:
                committer.submit(partial(acknowledge, ack, batch))
                batch = []

    async with client:
        await client.subscribe(TOPIC, qos=options.qos)
        await measure(read(), tally, committer, options)


async def run_gmqtt(options: argparse.Namespace, tally: Tally,
                    committer: Committer | None) -> None:
    """gmqtt's ``on_message`` callback; at QoS 1 an ``async`` one that returns the PUBACK's
    reason code after the commit."""
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv311

    loop = asyncio.get_running_loop()
    client = gmqtt.Client(f"bench-{uuid.uuid4().hex}", clean_session=True,
                          optimistic_acknowledgement=committer is None)
    subscribed = loop.create_future()
    loads = json.loads
    note = tally.note

    def on_subscribe(client: Any, mid: int, qos: Any, properties: Any) -> None:
        if not subscribed.done():
            subscribed.set_result(qos)

    def on_message(client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        loads(payload)
        note()
        return 0

    batch: asyncio.Future[None] | None = None
    size = 0

    def flush(future: asyncio.Future[None]) -> None:
        nonlocal batch
        if batch is not future:
            return  # already handed on, full
        batch = None
        assert committer is not None
        committer.submit(lambda: future.set_result(None))

    async def on_message_committed(client: Any, topic: str, payload: bytes, qos: int,
                                   properties: Any) -> int:
        # gmqtt starts one task per message; the tasks started from one read of the socket
        # all run before the flush scheduled by the first of them, so a batch is what the
        # client had at hand, as with aiomqtt's queue.
        nonlocal batch, size
        loads(payload)
        note()
        if batch is None or size >= MAX_BATCH:
            if batch is not None:
                flush(batch)
            batch, size = loop.create_future(), 0
            loop.call_soon(flush, batch)
        size += 1
        await batch
        return 0

    client.on_subscribe = on_subscribe
    client.on_message = on_message if committer is None else on_message_committed
    await client.connect(options.host, options.port, version=MQTTv311)
    try:
        client.subscribe(TOPIC, qos=options.qos)
        await asyncio.wait_for(subscribed, timeout=10)
        await measure(asyncio.Event().wait(), tally, committer, options)
    finally:
        await client.disconnect()


async def run_gmqtt_direct(options: argparse.Namespace, tally: Tally,
                           committer: Committer | None) -> None:
    """gmqtt with its QoS 1 handling replaced by a synchronous one (see the module's
    docstring): no task per message, PUBACKs sent after the commit by packet id."""
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv311

    if committer is None:
        raise SystemExit("gmqtt-direct is a QoS 1 variant")
    loop = asyncio.get_running_loop()
    client = gmqtt.Client(f"bench-{uuid.uuid4().hex}", clean_session=True,
                          optimistic_acknowledgement=False)
    handler = client._package_handler
    subscribed = loop.create_future()
    loads = json.loads
    note = tally.note
    batch: list[int] = []

    def on_subscribe(client: Any, mid: int, qos: Any, properties: Any) -> None:
        if not subscribed.done():
            subscribed.set_result(qos)

    def flush() -> None:
        nonlocal batch
        if batch:
            committer.submit(partial(acknowledge, puback, batch))
            batch = []

    def puback(mid: int, qos: int) -> None:
        handler._send_puback(mid)

    def on_qos1(mid: int, packet: bytes, topic: str, properties: Any) -> None:
        loads(packet)
        note()
        if not batch:
            loop.call_soon(flush)
        batch.append(mid)
        if len(batch) >= MAX_BATCH:
            flush()

    handler._handle_qos_1_publish_packet = on_qos1
    client.on_subscribe = on_subscribe
    await client.connect(options.host, options.port, version=MQTTv311)
    try:
        client.subscribe(TOPIC, qos=options.qos)
        await asyncio.wait_for(subscribed, timeout=10)
        await measure(asyncio.Event().wait(), tally, committer, options)
    finally:
        await client.disconnect()


async def measure(read: Coroutine[Any, Any, object], tally: Tally, committer: Committer | None,
                  options: argparse.Namespace) -> None:
    """Say ready, read until done, then report the count, the seconds and the CPU."""
    committing = (asyncio.create_task(committer.run(), name="commit")
                  if committer is not None else None)
    before = resource.getrusage(resource.RUSAGE_SELF)
    say({"ready": {}})
    reader = asyncio.create_task(read, name="read")
    await until_done(reader, tally, options.expect, options.idle)
    if committer is not None:
        # Every batch read is committed and acknowledged before the CPU is read.
        while committer.pending:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    after = resource.getrusage(resource.RUSAGE_SELF)
    for task in (reader, committing):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    say({"received": tally.count, "seconds": tally.last - tally.first, "cpu_seconds": cpu})


RUNNERS = {"aiomqtt": run_aiomqtt, "gmqtt": run_gmqtt, "gmqtt-direct": run_gmqtt_direct}


def main() -> None:
    """Run one candidate on the chosen event loop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--client", choices=tuple(RUNNERS), required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    parser.add_argument("--commit-ms", type=float, default=0.0,
                        help="QoS 1: how long each simulated commit sleeps on its thread")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--expect", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=2.0)
    options = parser.parse_args()
    tally = Tally()

    async def candidate() -> None:
        committer = Committer(options.commit_ms / 1000) if options.qos else None
        await RUNNERS[options.client](options, tally, committer)

    if options.loop == "uvloop":
        import uvloop

        uvloop.run(candidate())
    else:
        asyncio.run(candidate())


if __name__ == "__main__":
    main()
