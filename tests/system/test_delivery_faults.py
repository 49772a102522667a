"""Delivery faults against the real RabbitMQ: the broker's app stopped and started while events
flow, and the daemon killed with SIGKILL mid-stream and started again.

Both check the promise from the consumer's side: every accepted event arrives at least once,
the first copies in order per point; duplicates are counted (and reported), not failures.
The outage test stops the shared broker for a few seconds and always starts it again; it holds
the broker lock (``conftest.py``) exclusively, so broker tests of another run wait meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml
from helpers.brokers import (
    AMQP_HOST,
    AMQP_PORT,
    SETTLE,
    BridgeRun,
    Delivery,
    RabbitAdmin,
    reachable,
    require_broker,
    unique,
    wait_until,
)

from bridge.core.model import Event, Quality, message_event_id, new_event_id
from bridge.core.status import ConnectionState

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
SINK = "rabbit"
RECOVERY = 60.0
"""Seconds RabbitMQ may take to accept connections again after ``start_app``."""


def sink_section(exchange: str, queue: str, **options: Any) -> dict[str, Any]:
    """A sink on ``exchange`` declaring one quorum queue that takes every event."""
    return {"id": SINK, "protocol": "amqp", "host": AMQP_HOST, "port": AMQP_PORT, "timeout": 5,
            "exchange": {"name": exchange}, "topology": {"queues": [{"name": queue}]},
            **options}


def check_delivery(deliveries: Sequence[Delivery], expected: Sequence[str],
                   points: dict[str, str]) -> int:
    """Every expected event id was delivered, the first copies in order per point; returns
    the number of duplicates."""
    first_seen = list(dict.fromkeys(delivery.message_id for delivery in deliveries))
    missing = set(expected) - set(first_seen)
    assert not missing, f"{len(missing)} events never arrived"
    assert len(first_seen) == len(expected), "events arrived that were never produced"
    order: dict[str, list[str]] = defaultdict(list)
    for event_id in first_seen:
        order[points[event_id]].append(event_id)
    wanted: dict[str, list[str]] = defaultdict(list)
    for event_id in expected:
        wanted[points[event_id]].append(event_id)
    assert order == wanted, "events of a point arrived out of order"
    return len(deliveries) - len(first_seen)


def report(record_property: Any, name: str, produced: int, duplicates: int) -> None:
    """Show the counts in the test's output (``-rA``) and its report."""
    record_property("produced", produced)
    record_property("duplicates", duplicates)
    print(f"{name}: {produced} events, every one delivered, {duplicates} duplicates")


# --- broker outage -------------------------------------------------------------------------


def rabbitmqctl() -> str:
    """The rabbitmqctl of the local broker; skips (fails under CI) without one."""
    require_broker("RabbitMQ", AMQP_HOST, AMQP_PORT)
    path = shutil.which("rabbitmqctl")
    if path is None or AMQP_HOST not in ("127.0.0.1", "localhost"):
        message = "stopping the broker needs a local RabbitMQ and its rabbitmqctl"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


async def run_command(*command: str) -> None:
    """Run a command without blocking the loop; fail with its output if it fails."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    assert process.returncode == 0, f"{' '.join(command)}: {output.decode(errors='replace')}"


async def broker_back(control: str) -> None:
    """Start the broker's app and wait until it accepts connections again."""
    await run_command(control, "-q", "start_app")
    deadline = time.monotonic() + RECOVERY
    while not reachable(AMQP_HOST, AMQP_PORT):
        if time.monotonic() > deadline:
            pytest.fail(f"RabbitMQ did not come back within {RECOVERY:g}s after start_app")
        await asyncio.sleep(0.2)


def make_event(index: int) -> Event:
    """Event ``index`` of ten points."""
    now = time.time()
    return Event(id=new_event_id(), source="plant", point=f"p{index % 10}", value=index,
                 unit=None, quality=Quality.GOOD, ts=now, received_at=now, protocol="modbus",
                 bridge="edge", tags={})


async def produce(bridge: BridgeRun, produced: list[Event], stop: asyncio.Event) -> None:
    """A steady flow of about 5000 events a second until ``stop``."""
    while not stop.is_set():
        batch = [make_event(len(produced) + offset) for offset in range(50)]
        await bridge.runtime.router.submit(batch)
        produced.extend(batch)
        await asyncio.sleep(0.01)


@pytest.mark.stops_broker
@pytest.mark.parametrize("sink_workers", [0, 1], ids=["in-process", "sink-worker"])
async def test_broker_outage_loses_nothing(tmp_path: Path, record_property: Any,
                                           sink_workers: int) -> None:
    control = rabbitmqctl()
    exchange, queue = unique("fbtest.outage."), unique("fbtest.outage.")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"enabled": False},
        "sinks": [{**sink_section(exchange, queue), "workers": sink_workers}],
    }), encoding="utf-8")
    produced: list[Event] = []
    stop = asyncio.Event()
    try:
        async with BridgeRun(config) as bridge:
            status = bridge.sink(SINK).status
            producer = asyncio.create_task(produce(bridge, produced, stop), name="test.produce")
            try:
                await wait_until(lambda: status.counters["confirmed"] >= 1000,
                                 what="events flowing")
                try:
                    await run_command(control, "-q", "stop_app")
                    await wait_until(lambda: status.state is ConnectionState.DOWN,
                                     what="the sink to notice the outage")
                    during = len(produced)
                    await wait_until(lambda: len(produced) >= during + 2000,
                                     what="events produced during the outage")
                finally:
                    await broker_back(control)
                await wait_until(lambda: status.state is ConnectionState.UP, within=SETTLE + 30,
                                 what="the sink back up")
                reached = len(produced)
                await wait_until(lambda: len(produced) >= reached + 1000,
                                 what="events produced after the outage")
            finally:
                stop.set()
                await producer
            await bridge.delivered(SINK, len(produced), within=SETTLE + 20)
            republished = status.counters["republished"]
        admin = RabbitAdmin()
        try:
            waiting = admin.ready(queue)
            # The test's own consumer takes a few thousand messages a second on a busy machine.
            deliveries = admin.drain(queue, waiting, within=SETTLE + waiting / 1000)
        finally:
            admin.queues.append(queue)
            admin.exchanges.append(exchange)
            admin.close()
    finally:
        if not reachable(AMQP_HOST, AMQP_PORT):
            await broker_back(control)
    duplicates = check_delivery(deliveries, [event.id for event in produced],
                                {event.id: event.point for event in produced})
    assert duplicates <= republished
    report(record_property, f"broker outage ({'sink worker' if sink_workers else 'in-process'})",
           len(produced), duplicates)


# --- daemon killed -------------------------------------------------------------------------


class Daemon:
    """``python -m bridge run`` in its own process, its output kept in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the daemon."""
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bridge", "--log-level", "warning", "run", "-c",
                 str(self.config)], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no last flush."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(SETTLE)

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(SETTLE)

    def check_running(self) -> None:
        """Fail (with its output) if the daemon exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"the daemon exited with {self.process.returncode}:\n"
                        f"{self.log.read_text(errors='replace')}")

    def ensure_stopped(self) -> None:
        """Kill the process if it still runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(SETTLE)


class Publisher(threading.Thread):
    """Publishes numbered messages with publisher confirms: each one the broker confirmed
    was accepted, and stays in the source queue until the bridge acknowledges it."""

    def __init__(self, routing_key: str, count: int) -> None:
        super().__init__(name="test.publisher")
        self.routing_key = routing_key
        self.count = count
        self.confirmed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            connection = pika.BlockingConnection(pika.ConnectionParameters(AMQP_HOST, AMQP_PORT))
            try:
                channel = connection.channel()
                channel.confirm_delivery()
                for number in range(self.count):
                    channel.basic_publish(
                        "amq.topic", f"{self.routing_key}.p{number % 10}",
                        json.dumps({"n": number}).encode(),
                        pika.BasicProperties(message_id=f"m{number}", delivery_mode=2))
                    self.confirmed += 1
            finally:
                connection.close()
        except BaseException as exc:  # reported by the test, which joins the thread
            self.error = exc


def wait_for(condition: Any, what: str, daemon: Daemon, within: float = SETTLE) -> None:
    """Poll ``condition`` every 20 ms while the daemon runs; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while not condition():
        daemon.check_running()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def admin() -> Iterator[RabbitAdmin]:
    """An admin connection; what the test registers is deleted afterwards."""
    require_broker("RabbitMQ", AMQP_HOST, AMQP_PORT)
    connection = RabbitAdmin()
    try:
        yield connection
    finally:
        connection.close()


def test_daemon_killed_mid_stream_delivers_every_accepted_event(
    tmp_path: Path, admin: RabbitAdmin, record_property: Any
) -> None:
    count = 6000
    topic = unique("fbtest.kill.")
    source_queue, exchange, queue = unique("fbtest-src-"), unique("fbtest.kill."), unique(
        "fbtest.kill.")
    admin.queues += [source_queue, queue]
    admin.exchanges.append(exchange)
    admin.channel.queue_declare(source_queue, durable=True)
    admin.channel.queue_bind(source_queue, "amq.topic", routing_key=f"{topic}.#")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"enabled": False},
        "sources": [{"id": "plant", "protocol": "amqp", "host": AMQP_HOST, "port": AMQP_PORT,
                     "queue": {"name": source_queue},
                     "points": [{"name": "{point}", "routing_key": f"{topic}.{{point}}",
                                 "path": "n"}]}],
        "sinks": [sink_section(exchange, queue)],
    }), encoding="utf-8")
    daemon = Daemon(config, tmp_path / "daemon.log")
    publisher = Publisher(topic, count)
    try:
        daemon.start()
        wait_for(lambda: admin.consumers(source_queue) == 1, "the daemon consuming", daemon)
        publisher.start()
        wait_for(lambda: admin.ready(queue) >= count // 5, "events delivered", daemon)
        daemon.kill()
        killed_at = publisher.confirmed
        daemon.start()
        publisher.join(SETTLE * 3)
        assert publisher.error is None, publisher.error
        assert publisher.confirmed == count
        wait_for(lambda: admin.ready(queue) >= count and admin.ready(source_queue) == 0,
                 "every event delivered", daemon, within=SETTLE * 3)
        assert daemon.stop() == 0
    finally:
        if publisher.ident is not None:
            publisher.join(SETTLE)
        daemon.ensure_stopped()
    assert 0 < killed_at < count, "the daemon was not killed mid-stream"
    deliveries = admin.drain(queue, admin.ready(queue))
    # Event ids derive from the message ids: the test knows each one in advance.
    expected = [message_event_id("plant", f"m{number}", f"p{number % 10}")
                for number in range(count)]
    points = {event_id: f"p{number % 10}" for number, event_id in enumerate(expected)}
    duplicates = check_delivery(deliveries, expected, points)
    assert [json.loads(delivery.body)["value"] for delivery in deliveries[:3]] == [0, 1, 2]
    report(record_property, "daemon killed", count, duplicates)
    assert "Traceback" not in daemon.log.read_text(errors="replace")
