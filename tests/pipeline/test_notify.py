"""systemd notification: a runtime announces READY=1 once it serves and STOPPING=1 on stop.

Each test plays systemd: it binds its own datagram socket and points NOTIFY_SOCKET at it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.api.server import ApiServer
from bridge.pipeline.notify import notify, watchdog_interval
from bridge.registry import load_config
from bridge.runtime import Runtime

SETTLE = 10.0
"""Seconds a notification may take before the test fails."""


@pytest.fixture(autouse=True)
def _no_inherited_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests may themselves run under systemd.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[list[str]] = []

    async def receive(self) -> list[str]:
        """The next datagram, as its ``KEY=value`` lines."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(SETTLE):
            data = await loop.sock_recv(self.sock, 65536)
        message = data.decode().splitlines()
        self.received.append(message)
        return message

    async def receive_until(self, line: str) -> list[list[str]]:
        """Every datagram up to and including the one holding ``line``."""
        messages = []
        while True:
            message = await self.receive()
            messages.append(message)
            if line in message:
                return messages


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


@pytest.fixture(params=["path", "abstract"])
def systemd(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeSystemd]:
    """A notify socket bound to a file in tmp_path, or in the abstract namespace ('@')."""
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock = _bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    else:
        name = f"fieldbridge-test-{uuid.uuid4().hex}"
        sock = _bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    with sock:
        yield FakeSystemd(sock)


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    """A runtime with no sources, serving the API on a free loopback port."""
    path = tmp_path / "fieldbridge.yaml"
    path.write_text("bridge: {id: notify-test, state_dir: state}\n"
                    "api: {host: 127.0.0.1, port: 0}\n"
                    "sources: []\n", encoding="utf-8")
    return Runtime(load_config(path))


async def test_ready_once_serving_and_stopping_on_stop(
    systemd: FakeSystemd, runtime: Runtime
) -> None:
    task = asyncio.create_task(runtime.run(services=[ApiServer]), name="test.runtime")
    try:
        ready = await systemd.receive()
        assert "READY=1" in ready
        assert "STATUS=serving 0 points from 0 sources" in ready
        # READY=1 means serving: the API accepts connections by then.
        assert runtime.ready.is_set()
        assert runtime.api_port
        _, writer = await asyncio.open_connection("127.0.0.1", runtime.api_port)
        writer.close()
        await writer.wait_closed()
        assert not task.done()
        runtime.stop()
        messages = await systemd.receive_until("STOPPING=1")
    finally:
        runtime.stop()
        async with asyncio.timeout(SETTLE):
            await task
    assert all("READY=1" not in message for message in messages), "READY is sent once"


async def test_watchdog_is_petted_at_half_the_timeout(
    systemd: FakeSystemd, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == pytest.approx(0.1)
    task = asyncio.create_task(runtime.run(), name="test.runtime")
    try:
        assert "READY=1" in await systemd.receive()
        pets = 0
        while pets < 3:
            message = await systemd.receive()
            assert message == ["WATCHDOG=1"]
            pets += 1
    finally:
        runtime.stop()
        async with asyncio.timeout(SETTLE):
            await task


def test_watchdog_meant_for_another_process_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


def test_without_systemd_notify_does_nothing() -> None:
    assert notify("READY=1") is False


def test_unreachable_socket_is_a_warning_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.WARNING, logger="bridge.pipeline.notify"):
        assert notify("READY=1") is False
    assert "cannot notify systemd" in caplog.text
