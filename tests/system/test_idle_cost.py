"""An idle daemon costs next to nothing: with an MQTT source and a RabbitMQ sink connected and
no traffic, no timer fires for nothing (group commit waits on events, not on a clock).

CPU time is read from ``/proc/<pid>/stat`` of the daemon: what the daemon itself ran, which a
busy machine does not inflate (the bound is generous: the daemon measures under 1 % of a core).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers.brokers import AMQP_HOST, AMQP_PORT, MQTT_HOST, MQTT_PORT, require_broker, unique
from helpers.daemon import Daemon, running_daemon

pytestmark = pytest.mark.broker

WINDOW = 3.0
"""Seconds of idle CPU measured."""
BOUND = 0.10
"""Share of one core, at most: ten times the target, so a loaded machine cannot fail it."""


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` (all its threads), from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def both_up(daemon: Daemon, client: httpx.AsyncClient) -> bool:
    """Whether the daemon's source and sink are both connected."""
    sources = (await client.get("/v1/sources")).json()["items"]
    sinks = (await client.get("/v1/sinks")).json()["items"]
    return [entry["state"] for entry in [*sources, *sinks]] == ["up", "up"]


async def test_an_idle_daemon_with_a_source_and_a_sink_connected_uses_almost_no_cpu(
    tmp_path: Path
) -> None:
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    require_broker("RabbitMQ", AMQP_HOST, AMQP_PORT)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"port": 0},
        "sources": [{"id": "plant", "protocol": "mqtt", "host": MQTT_HOST, "port": MQTT_PORT,
                     "client_id": unique("fbtest-idle-"),
                     "points": [{"name": "v", "topic": unique("fbtest/idle/"), "path": "v"}]}],
        "sinks": [{"id": "rabbit", "protocol": "amqp", "host": AMQP_HOST, "port": AMQP_PORT,
                   "exchange": {"name": unique("fbtest-idle-")}}],
    }), encoding="utf-8")
    async with running_daemon(config) as daemon, \
            httpx.AsyncClient(base_url=daemon.url, timeout=5.0) as client:
        await daemon.poll(lambda: both_up(daemon, client), "the source and the sink up")
        # Settle: start-up work (imports, first commits, the garbage collector's freeze) ends.
        await asyncio.sleep(1.0)
        before, started = cpu_seconds(daemon.pid), time.monotonic()
        await asyncio.sleep(WINDOW)
        used, elapsed = cpu_seconds(daemon.pid) - before, time.monotonic() - started
        assert (await both_up(daemon, client)), json.dumps(
            (await client.get("/v1/sinks")).json())
    assert used / elapsed < BOUND, f"{used:.3f} CPU s in {elapsed:.1f} s idle"
