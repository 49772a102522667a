"""Abusive API clients against the daemon run as a subprocess (issue "Hardening", measured
items 5, 6 and 8): huge bodies without a key, bodies past ``api.max_body``, connections that
send nothing or send their request a byte at a time, too many connections, and a huge
written value. Memory is the daemon's, read from ``/proc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from pathlib import Path

import httpx
from helpers import WAIT
from helpers.daemon import MIB, Daemon, running_daemon

from bridge.api.connections import HEALTH_RESERVE
from bridge.demo.simulator import PlantSimulator

WRITE_KEY = "operator-key-0123456789abcdef"


def _config(tmp_path: Path, api: str = "", port: int | None = None) -> Path:
    digest = hashlib.sha256(WRITE_KEY.encode()).hexdigest()
    source = "sources: []\n" if port is None else f"""\
sources:
  - id: plant
    protocol: modbus
    host: 127.0.0.1
    port: {port}
    devices:
      - id: boiler
        unit: 1
        interval: 1s
        points:
          - {{name: setpoint, address: 40001, type: int16, writable: true}}
"""
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(
        "bridge: {id: t, state_dir: state}\n"
        f"api:\n  host: 127.0.0.1\n  port: 0\n{api}"
        f"  keys: [{{name: operator, sha256: {digest}, scopes: [read, write]}}]\n" + source)
    return path


async def _send_body(daemon: Daemon, head: str, size: int) -> bytes:
    """Send ``head`` and then up to ``size`` bytes of body while the server takes them;
    return the status line the server answered with."""
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode())
        chunk = b"x" * MIB
        sent = 0
        response = asyncio.ensure_future(reader.readline())
        try:
            while sent < size and not response.done():
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
        except ConnectionError:
            pass  # the server closed while the client was still sending
        async with asyncio.timeout(WAIT):
            return await response
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_huge_body_without_a_key_is_refused_before_it_is_read(tmp_path: Path) -> None:
    async with running_daemon(_config(tmp_path)) as daemon:
        before = daemon.memory()["VmHWM"]
        head = ("PUT /v1/points/boiler.setpoint HTTP/1.1\r\nHost: t\r\n"
                "Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n")
        # Four at once: before, 914 MB of RSS and 373 MB held afterwards.
        statuses = await asyncio.gather(*(_send_body(daemon, head, 100 * MIB)
                                          for _ in range(4)))
        assert all(status.startswith(b"HTTP/1.1 401 ") for status in statuses), statuses
        after = daemon.memory()
    grown = after["VmHWM"] - before
    assert grown < 32 * MIB, f"VmHWM grew by {grown / MIB:.0f} MiB"


async def test_a_body_past_max_body_is_413_while_it_is_read(tmp_path: Path) -> None:
    async with running_daemon(_config(tmp_path, "  max_body: 64KiB\n")) as daemon:
        before = daemon.memory()["VmHWM"]
        auth = f"Authorization: Bearer {WRITE_KEY}\r\n"
        declared = ("PUT /v1/points/boiler.setpoint HTTP/1.1\r\nHost: t\r\n" + auth +
                    "Content-Type: application/json\r\nContent-Length: 52428800\r\n\r\n")
        assert (await _send_body(daemon, declared, 50 * MIB)).startswith(b"HTTP/1.1 413 ")
        chunked = ("PUT /v1/points/boiler.setpoint HTTP/1.1\r\nHost: t\r\n" + auth +
                   "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                   f"{MIB:x}\r\n")
        # One chunk of 1 MiB (its end is never sent): the limit is counted while reading.
        assert (await _send_body(daemon, chunked, MIB)).startswith(b"HTTP/1.1 413 ")
        # The refusal is the structured error, sent before a byte of the body is read.
        host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(declared.replace("52428800", "70000").encode())
        async with asyncio.timeout(WAIT):
            head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
            length = int(head.split("content-length:")[1].split()[0])
            body = await reader.readexactly(length)
        writer.close()
        assert json.loads(body)["error"]["code"] == "too_large"
        grown = daemon.memory()["VmHWM"] - before
    assert grown < 32 * MIB, f"VmHWM grew by {grown / MIB:.0f} MiB"


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent until it closed the connection (or reset it: b"")."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


def _open_fds(daemon: Daemon) -> int:
    return len(list(Path(f"/proc/{daemon.pid}/fd").iterdir()))


async def test_idle_and_slow_connections_are_closed_and_their_number_capped(
    tmp_path: Path
) -> None:
    api = "  max_connections: 40\n  header_timeout: 1s\n  keep_alive_timeout: 1s\n"
    async with running_daemon(_config(tmp_path, api)) as daemon:
        host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
        baseline = _open_fds(daemon)
        opened = [await asyncio.open_connection(host, int(port)) for _ in range(60)]
        try:
            # A slow client: a request head a few bytes at a time, never finished.
            _, slow_writer = opened[0]
            slow_writer.write(b"GET /health/live HTTP/1.1\r\n")
            answers = await asyncio.gather(*(_until_closed(reader) for reader, _ in opened))
        finally:
            for _, writer in opened:
                writer.close()
        refused = [answer for answer in answers if answer.startswith(b"HTTP/1.1 503 ")]
        closed_silently = [answer for answer in answers if answer == b""]
        # 40 held until the head timeout closed them, and 4 more kept for /health; the
        # other 16 refused at once.
        assert len(refused) == 60 - 40 - HEALTH_RESERVE
        assert len(closed_silently) == 40 + HEALTH_RESERVE
        assert b"too_many_connections" in refused[0]
        assert _open_fds(daemon) <= baseline + 2
        # A keep-alive connection idle after a response is closed too.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        async with asyncio.timeout(WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
            await _until_closed(reader)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200 ")
        assert "API refuses new connections: 40 are open" in "".join(daemon.log)
        # And it serves again.
        async with httpx.AsyncClient(base_url=daemon.url) as client:
            assert (await client.get("/health/live")).status_code == 200


async def test_a_huge_written_value_is_echoed_as_an_excerpt(tmp_path: Path) -> None:
    async with PlantSimulator(port=0, seed=3, interval=0.2) as simulator:
        config = _config(tmp_path, "  max_body: 32MiB\n", port=simulator.port)
        async with running_daemon(config) as daemon, \
                httpx.AsyncClient(base_url=daemon.url, timeout=WAIT) as client:
            value = "x" * 20_000_000
            response = await client.put("/v1/points/boiler.setpoint", json={"value": value},
                                        headers={"Authorization": f"Bearer {WRITE_KEY}"})
            assert response.status_code == 422
            # Before: 40 MB, the value twice.
            assert len(response.content) < 2_000
            assert "(20,000,000 characters)" in response.json()["error"]["message"]
            line = await daemon.until("write failed: key operator, point boiler.setpoint")
            assert len(line) < 1_000
            assert "(20,000,000 characters)" in line


async def _exchange(daemon: Daemon, request: bytes) -> bytes:
    """Send ``request`` on a new connection; what the server sent until it closed it."""
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        async with asyncio.timeout(WAIT):
            return await _until_closed(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_malformed_chunked_body_without_a_key_logs_no_traceback(tmp_path: Path) -> None:
    async with running_daemon(_config(tmp_path)) as daemon:
        for _ in range(3):
            answer = await _exchange(daemon, (
                b"PUT /v1/points/boiler.setpoint HTTP/1.1\r\nHost: t\r\nContent-Type: "
                b"application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"))
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
        async with httpx.AsyncClient(base_url=daemon.url) as client:
            assert (await client.get("/health/live")).status_code == 200
        # Before: each connection logged a 30-line ERROR traceback from uvicorn.
        log = "".join(daemon.log)
        assert "Traceback" not in log
        assert " ERROR " not in log


async def test_a_body_that_trickles_is_answered_408_and_dropped(tmp_path: Path) -> None:
    async with running_daemon(_config(tmp_path, "  body_timeout: 500ms\n")) as daemon:
        answer = await _exchange(daemon, (
            f"PUT /v1/points/boiler.setpoint HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
            f"{WRITE_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            '{"value": '.encode()))
        # Before: the connection waited for the rest of the body for ever (the head was in).
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        assert b"request_timeout" in answer
        assert " ERROR " not in "".join(daemon.log)


async def test_health_answers_while_every_connection_is_taken(tmp_path: Path) -> None:
    async with running_daemon(_config(tmp_path, "  max_connections: 4\n")) as daemon:
        host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
        try:
            # Before: 503 too_many_connections, so a monitor took the API for dead.
            health = await _exchange(daemon, b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert health.startswith(b"HTTP/1.1 200 "), health[:100]
            assert b"connection: close" in health.lower()
            other = await _exchange(daemon, ("GET /v1/points HTTP/1.1\r\nHost: t\r\n"
                                    f"Authorization: Bearer {WRITE_KEY}\r\n\r\n").encode())
            assert other.startswith(b"HTTP/1.1 503 "), other[:100]
            assert b"too_many_connections" in other
        finally:
            for _, writer in idle:
                writer.close()


async def test_a_deeply_nested_json_body_is_422_with_the_structured_error(
    tmp_path: Path
) -> None:
    async with running_daemon(_config(tmp_path)) as daemon, \
            httpx.AsyncClient(base_url=daemon.url, timeout=WAIT) as client:
        response = await client.put(
            "/v1/points/boiler.setpoint", content=b"[" * 1_000 + b"]" * 1_000,
            headers={"Authorization": f"Bearer {WRITE_KEY}",
                     "Content-Type": "application/json"})
        # Before: 400 "There was an error parsing the body", where the README promises 422.
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert error["message"] == "body: the JSON nests too deeply"
        assert error["details"][0]["location"] == "body"


async def test_settings_from_substitution_are_masked_in_the_inventory(tmp_path: Path) -> None:
    secret = tmp_path / "plc-host"
    secret.write_text("127.0.0.1\n")
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(f"""\
bridge: {{id: t, state_dir: state}}
api: {{host: 127.0.0.1, port: 0}}
sources:
  - id: plant
    protocol: modbus
    host: ${{file:{secret}}}
    port: 1
    devices:
      - id: boiler
        points:
          - {{name: t, address: 40001, type: int16}}
""")
    async with running_daemon(path) as daemon, \
            httpx.AsyncClient(base_url=daemon.url, timeout=WAIT) as client:
        (entry,) = (await client.get("/v1/sources")).json()["items"]
        # Before: "tcp://127.0.0.1:1", though the README says such values are never shown.
        assert entry["endpoint"] == "tcp://***:1"
        assert entry["devices"][0]["endpoint"] == "tcp://***:1?unit=1"
