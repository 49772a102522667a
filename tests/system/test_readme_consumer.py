"""The consumer example in README, run as written against RabbitMQ: it prints each event once,
however often RabbitMQ delivers it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.brokers import (
    AMQP_HOST,
    AMQP_PORT,
    SETTLE,
    BridgeRun,
    RabbitAdmin,
    unique,
)

from bridge.core.model import Event, Quality, isoformat, new_event_id

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]


def readme_consumer() -> str:
    """The Python block of README's "Subscribing" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Subscribing"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README's Subscribing section has no Python example"
    return match.group(1)


async def test_readme_consumer_prints_every_event_once(tmp_path: Path,
                                                        rabbit: RabbitAdmin) -> None:
    exchange, queue = unique("fbtest.readme."), unique("fbtest.readme.")
    rabbit.exchanges.append(exchange)
    rabbit.queues.append(queue)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"enabled": False},
        "sinks": [{"id": "rabbit", "protocol": "amqp", "host": AMQP_HOST, "port": AMQP_PORT,
                   "exchange": {"name": exchange}, "topology": {"queues": [{"name": queue}]}}],
    }), encoding="utf-8")
    now = time.time()
    events = [Event(id=new_event_id(), source="plant", point=f"boiler.t{index}",
                    value=20.0 + index, unit="degC", quality=Quality.GOOD, ts=now,
                    received_at=now, protocol="modbus", bridge="edge") for index in range(4)]
    async with BridgeRun(config) as bridge:
        # The third event twice, as after a lost confirmation: the consumer prints it once.
        await bridge.runtime.router.submit([*events[:3], events[2], events[3]])
        await bridge.delivered("rabbit", 5)

    script = tmp_path / "consumer.py"
    script.write_text(readme_consumer(), encoding="utf-8")
    consumer = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "QUEUE": queue,
             "AMQP_URL": f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/%2F"})
    assert consumer.stdout is not None
    try:
        lines = []
        async with asyncio.timeout(SETTLE):
            # The duplicate comes before the last event: once that is printed, it was seen.
            while len(lines) < len(events):
                lines.append((await consumer.stdout.readline()).decode().split())
    finally:
        consumer.send_signal(signal.SIGINT)
        rest, errors = await consumer.communicate()
    assert consumer.returncode == 0, errors.decode()
    assert rest == b""
    assert lines == [[event.point, json.dumps(event.value), "degC", "good", isoformat(event.ts)]
                     for event in events]
