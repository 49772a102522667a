"""The daemon on a full disk: a real tmpfs under its state directory (issue "Hardening", item 2).

The disk is filled while MQTT QoS 1 messages arrive: the daemon pauses instead of exiting, its
API and ``/health/live`` answer throughout, ``/health/ready`` and ``/v1/sources`` say why, and
once the tmpfs is remounted bigger every message is stored and delivered to RabbitMQ. None is
missing, so none was acknowledged upstream without being stored (the broker redelivers nothing
that was acknowledged). Started on a full disk, the daemon serves its API and waits.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
import yaml
from helpers.brokers import (
    AMQP_HOST,
    AMQP_PORT,
    MQTT_HOST,
    MQTT_PORT,
    RabbitAdmin,
    require_broker,
    unique,
)
from helpers.daemon import MIB, Daemon, running_daemon

MESSAGES = 600
PAD = "x" * 400
"""A second point per message, so the store grows quickly enough to fill what is left."""


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI machine runs the suite as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _fill(mount: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the tmpfs with a file of its own."""
    size = _free(mount) - leave
    with (mount / "filler").open("wb") as filler:
        os.posix_fallocate(filler.fileno(), 0, size)


def _remount(mount: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def _config(tmp_path: Path, mount: Path, topic: str, store: dict[str, Any],
            sink: dict[str, Any] | None = None) -> Path:
    config: dict[str, Any] = {
        "bridge": {"id": "edge", "state_dir": str(mount / "state")},
        "api": {"host": "127.0.0.1", "port": 0},
        "store": store,
        "sources": [{"id": "plant", "protocol": "mqtt", "host": MQTT_HOST, "port": MQTT_PORT,
                     "client_id": unique("fbtest-disk-"), "clean_session": False, "qos": 1,
                     "points": [{"name": "v", "topic": topic, "path": "v"},
                                {"name": "pad", "topic": topic, "path": "pad"}]}],
    }
    if sink is not None:
        config["sinks"] = [sink]
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _publisher() -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=unique("fbtest-pub-"))
    client.connect(MQTT_HOST, MQTT_PORT)
    client.loop_start()
    return client


async def _warm_up(daemon: Daemon, api: httpx.AsyncClient, publisher: paho.Client,
                   topic: str) -> None:
    """Publish until the daemon stores a message (ready does not wait for the SUBACK)."""
    async def arrived() -> bool:
        publisher.publish(topic, json.dumps({"v": -1, "pad": ""}), qos=1)
        response = await api.get("/v1/points/v")
        return response.status_code == 200 and response.json()["value"] == -1

    await daemon.poll(arrived, "a message from the daemon's subscription")


async def _status(api: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await api.get("/health/ready")
    return response.status_code, response.json()


async def _history(api: httpx.AsyncClient) -> list[Any]:
    response = await api.get("/v1/points/v/history", params={"limit": 5000})
    assert response.status_code == 200, response.text
    return [item["value"] for item in response.json()["items"]]


@pytest.mark.parametrize(("min_free", "leave"), [
    ("4MiB", 3 * MIB),
    (0, 96 * 1024),
], ids=["min_free reserve", "sqlite hits the wall"])
async def test_a_full_disk_pauses_ingest_and_loses_nothing_acknowledged(
    tmp_path: Path, tmpfs: Path, rabbit: RabbitAdmin, min_free: Any, leave: int
) -> None:
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    require_broker("RabbitMQ", AMQP_HOST, AMQP_PORT)
    topic = unique("fbtest/disk/")
    queue = unique("fbtest.disk.")
    sink = {"id": "rabbit", "protocol": "amqp", "host": AMQP_HOST, "port": AMQP_PORT,
            "timeout": 5, "points": ["v"], "exchange": {"name": unique("fbtest.disk.x.")},
            "topology": {"queues": [{"name": queue}]}}
    config = _config(tmp_path, tmpfs, topic, {"min_free": min_free}, sink)
    publisher = _publisher()
    try:
        async with running_daemon(config) as daemon, httpx.AsyncClient(
                base_url=daemon.url, timeout=5) as api:
            await _warm_up(daemon, api, publisher, topic)
            _fill(tmpfs, leave)

            async def paused() -> dict[str, Any] | None:
                code, body = await _status(api)
                return body if code == 503 else None

            if min_free:
                # The reserve is reached before anything more is written.
                await daemon.poll(paused, "the store to report its reserve reached")
            for value in range(MESSAGES):
                publisher.publish(topic, json.dumps({"v": value, "pad": PAD}), qos=1)
            await daemon.until("sources wait and nothing is acknowledged upstream",
                               within=60)
            body = await daemon.poll(paused, "the store to report a full disk")
            reason = " ".join(body["reasons"])
            assert reason.startswith("store: disk full"), reason
            assert (await api.get("/health/live")).status_code == 200
            sources = (await api.get("/v1/sources")).json()["items"]
            assert sources[0]["paused"].startswith("store: disk full")
            stored_while_full = await _history(api)
            if min_free:
                assert set(stored_while_full) == {-1}
            assert len(set(stored_while_full)) < MESSAGES + 1
            assert (await api.get("/v1/points/v")).status_code == 200

            _remount(tmpfs, "256m")

            async def everything_stored() -> bool:
                return sorted(set(await _history(api))) == list(range(-1, MESSAGES))

            await daemon.poll(everything_stored, "every message stored")
            code, _ = await _status(api)
            assert code == 200
            assert (await api.get("/v1/sources")).json()["items"][0].get("paused") is None
            await daemon.until("the store writes again")
            stored = len(await _history(api))
        # Delivery resumed: every stored event of the point reached the queue.
        delivered = [json.loads(delivery.body)["value"]
                     for delivery in rabbit.drain(queue, stored, within=60)]
        assert set(delivered) == set(range(-1, MESSAGES))
    finally:
        publisher.loop_stop()
        publisher.disconnect()


async def test_started_on_a_full_disk_the_daemon_serves_its_api_and_waits(
    tmp_path: Path, tmpfs: Path
) -> None:
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    topic = unique("fbtest/disk/")
    config = _config(tmp_path, tmpfs, topic, {"min_free": 0})
    (tmpfs / "state").mkdir()
    _fill(tmpfs, 0)
    publisher = _publisher()
    try:
        async with running_daemon(config, ready=False) as daemon:
            await daemon.until("the API starts, the sources wait until the store opens")
            async with httpx.AsyncClient(base_url=daemon.url, timeout=5) as api:
                assert (await api.get("/health/live")).status_code == 200
                code, body = await _status(api)
                assert code == 503
                assert any(reason.startswith("store: disk") for reason in body["reasons"]), body
                assert daemon.process.returncode is None

                _remount(tmpfs, "64m")
                await daemon.until("ready")
                code, body = await _status(api)
                assert code == 200, body
                await _warm_up(daemon, api, publisher, topic)
    finally:
        publisher.loop_stop()
        publisher.disconnect()
