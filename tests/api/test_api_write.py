"""Write-back (``PUT /v1/points/{id}``) and live reads (``GET /v1/points/{id}/live``).

End to end against the demo plant simulator over Modbus TCP, and with small fake sources for
each kind of device failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.api.app import create_app
from bridge.api.models import EventModel, WriteResult
from bridge.api.server import ApiServer
from bridge.config.models import ApiKey, Config, PointBase, ReportSpec, ResolvedPoint
from bridge.core.model import Event, Reading, Value
from bridge.core.source import Source, SourceContext, SourceUnit
from bridge.core.status import EndpointStatus
from bridge.demo.run import PORT_VARIABLE, load_demo_config
from bridge.demo.simulator import PlantSimulator
from bridge.errors import ErrorCategory, ReadError, WriteError
from bridge.inventory import RunningSource
from bridge.registry import load_config
from bridge.runtime import Runtime

SETTLE = 10.0
"""Seconds any awaited condition may take before the test fails."""
KEYS = {
    "viewer": ("viewer-key-0123456789abcdef", ["read"]),
    "operator": ("operator-key-0123456789abcdef", ["read", "write"]),
    "robot": ("robot-key-0123456789abcdef", ["write"]),
    "root": ("root-key-0123456789abcdef", ["admin"]),
}


def auth(name: str) -> dict[str, str]:
    """The header presenting the key called ``name``."""
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


# --- the demo plant, bridged ------------------------------------------------------------------


class Plant:
    """The demo configuration running against the simulator, its API on a free port."""

    def __init__(self, runtime: Runtime, simulator: PlantSimulator) -> None:
        self.runtime = runtime
        self.simulator = simulator
        self.stored: list[Event] = []
        self._changed = asyncio.Event()
        runtime.router.add_listener(self._record)
        self.task = asyncio.create_task(runtime.run(services=[ApiServer]),
                                        name="test.runtime")

    def _record(self, events: Sequence[Event]) -> None:
        self.stored.extend(events)
        self._changed.set()

    @property
    def url(self) -> str:
        """The API's base URL."""
        assert self.runtime.api_port is not None
        return f"http://127.0.0.1:{self.runtime.api_port}"

    async def until_stored(self, condition: Callable[[Event], bool], what: str) -> Event:
        """Wait for a stored event that satisfies ``condition``."""
        async with asyncio.timeout(SETTLE):
            while True:
                for event in self.stored:
                    if condition(event):
                        return event
                self.stored.clear()
                self._changed.clear()
                await self._changed.wait()
                assert not self.task.done(), f"the runtime stopped before {what}"

    async def stop(self) -> None:
        """Stop the runtime and wait for it."""
        self.runtime.stop()
        async with asyncio.timeout(SETTLE):
            await self.task


def with_keys(config: Config) -> Config:
    """``config`` with the test's API keys."""
    keys = [ApiKey(name=name, sha256=hashlib.sha256(key.encode()).hexdigest(),
                   scopes=scopes)  # type: ignore[arg-type]
            for name, (key, scopes) in KEYS.items()]
    return dataclasses.replace(config, api=config.api.model_copy(update={"keys": keys}))


@pytest.fixture
async def plant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Plant]:
    async with PlantSimulator(port=0, seed=7, interval=0.2) as simulator:
        monkeypatch.setenv(PORT_VARIABLE, str(simulator.port))
        config = with_keys(load_demo_config(state_dir=tmp_path / "state", api_port=0))
        running = Plant(Runtime(config), simulator)
        try:
            async with asyncio.timeout(SETTLE):
                await running.runtime.ready.wait()
            # Connected: every point has been polled once.
            await running.until_stored(lambda event: event.point == "boiler.flow",
                                       "the first poll")
            yield running
        finally:
            await running.stop()


@pytest.fixture
async def http(plant: Plant) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=plant.url, timeout=SETTLE) as client:
        yield client


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The structured error of a response."""
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert error["message"]
    assert error["hint"]
    return error


# --- end to end -------------------------------------------------------------------------------


async def test_write_a_setpoint_and_read_it_back_live(
    plant: Plant, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="bridge.audit"):
        response = await http.put("/v1/points/boiler.setpoint", json={"value": 55.5},
                                  headers=auth("operator"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert WriteResult.model_validate(body).model_dump(mode="json") == body
    assert (body["point"], body["source"], body["value"]) == ("boiler.setpoint", "plant", 55.5)
    assert abs(time.time() - datetime_seconds(body["written_at"])) < 60
    audit = [record for record in caplog.records if record.name == "bridge.audit"]
    assert len(audit) == 1
    assert audit[0].levelno == logging.INFO
    assert "operator" in audit[0].getMessage()
    assert "boiler.setpoint" in audit[0].getMessage()
    assert "55.5" in audit[0].getMessage()
    assert KEYS["operator"][0] not in caplog.text

    live = await http.get("/v1/points/boiler.setpoint/live", headers=auth("viewer"))
    assert live.status_code == 200, live.text
    event = live.json()
    assert EventModel.model_validate(event).model_dump(mode="json") == event
    assert (event["point"], event["value"], event["unit"], event["quality"]) == (
        "boiler.setpoint", 55.5, "degC", "good")
    assert (event["source"], event["protocol"], event["bridge"]) == ("plant", "modbus", "demo")
    assert event["tags"]["site"] == "demo"
    await plant.simulator.next_update()
    assert plant.simulator.state.setpoint == 55.5
    exposition = (await http.get("/metrics", headers=auth("viewer"))).text
    assert ('fieldbridge_api_device_requests_total{operation="write",result="ok"} 1'
            in exposition)
    assert ('fieldbridge_api_device_requests_total{operation="read",result="ok"} 1'
            in exposition)


async def test_write_the_pump_command_and_see_the_pump_stop(
    plant: Plant, http: httpx.AsyncClient
) -> None:
    response = await http.put("/v1/points/boiler.pump_command", json={"value": False},
                              headers=auth("root"))
    assert response.status_code == 200, response.text
    assert response.json()["value"] is False
    command = await http.get("/v1/points/boiler.pump_command/live", headers=auth("root"))
    assert command.json()["value"] is False
    await plant.simulator.next_update()  # the plant acts on the coil at its next step
    running = await http.get("/v1/points/boiler.pump_running/live", headers=auth("root"))
    assert running.status_code == 200
    assert running.json()["value"] is False


async def test_a_live_read_is_returned_not_stored_and_never_suppressed(
    plant: Plant, http: httpx.AsyncClient
) -> None:
    # The setpoint reports by exception (heartbeat 60 s) and does not move by itself: a
    # polled reading of it is suppressed, a live read still answers, every time.
    before = plant.runtime.router.latest["boiler.setpoint"]
    reads = [await http.get("/v1/points/boiler.setpoint/live", headers=auth("viewer"))
             for _ in range(2)]
    events = [read.json() for read in reads]
    assert [read.status_code for read in reads] == [200, 200]
    assert events[0]["value"] == events[1]["value"] == before.value
    assert events[0]["id"] != events[1]["id"]
    assert events[0]["id"] != before.id
    for event in events:
        assert plant.runtime.store.history_seq(event["id"]) is None
    assert plant.runtime.router.latest["boiler.setpoint"] == before


async def test_a_write_is_still_reported_by_the_poll_after_a_live_read(
    plant: Plant, http: httpx.AsyncClient
) -> None:
    # Were the live read mapped through the running mapping, it would take the change and
    # the next poll would see nothing new until the heartbeat, a minute later.
    write = await http.put("/v1/points/boiler.setpoint", json={"value": 71.5},
                           headers=auth("operator"))
    assert write.status_code == 200
    live = await http.get("/v1/points/boiler.setpoint/live", headers=auth("operator"))
    assert live.json()["value"] == 71.5
    polled = await plant.until_stored(
        lambda event: event.point == "boiler.setpoint" and event.value == 71.5,
        "the poll reported the new setpoint")
    assert polled.id != live.json()["id"]


@pytest.mark.parametrize(("point", "body", "status", "code"), [
    ("boiler.setpoint", {"value": "hot"}, 422, "rejected"),
    ("boiler.setpoint", {"value": 55.55}, 422, "rejected"),
    ("boiler.setpoint", {"value": 1e9}, 422, "rejected"),
    ("boiler.pump_command", {"value": 5}, 422, "rejected"),
    ("boiler.setpoint", {"value": None}, 422, "invalid_request"),
    ("boiler.setpoint", {}, 422, "invalid_request"),
    ("boiler.setpoint", {"value": 50, "unit": "degC"}, 422, "invalid_request"),
    ("boiler.setpoint", [50], 422, "invalid_request"),
    ("boiler.supply_temp", {"value": 50}, 409, "not_writable"),
    ("boiler.mode", {"value": "heating"}, 409, "not_writable"),
    ("boiler.nothing", {"value": 1}, 404, "not_found"),
])
async def test_write_refusals(
    plant: Plant, http: httpx.AsyncClient, point: str, body: Any, status: int, code: str
) -> None:
    setpoint = plant.simulator.state.setpoint
    response = await http.put(f"/v1/points/{point}", json=body, headers=auth("operator"))
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code
    assert plant.simulator.state.setpoint == setpoint


async def test_a_body_that_is_not_json_is_refused(http: httpx.AsyncClient) -> None:
    response = await http.put("/v1/points/boiler.setpoint", content=b"55",
                              headers={**auth("operator"), "Content-Type": "text/plain"})
    assert response.status_code == 422
    assert error_of(response)["code"] == "invalid_request"


async def test_live_read_of_an_unknown_point_is_404(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/points/boiler.nothing/live", headers=auth("viewer"))
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


@pytest.mark.parametrize(("method", "path", "key", "status"), [
    ("PUT", "/v1/points/boiler.setpoint", "viewer", 403),
    ("PUT", "/v1/points/boiler.setpoint", None, 401),
    ("GET", "/v1/points/boiler.setpoint/live", "robot", 403),
    ("GET", "/v1/points/boiler.setpoint/live", None, 401),
    ("PUT", "/v1/points/boiler.setpoint", "robot", 200),
])
async def test_scopes(
    plant: Plant, http: httpx.AsyncClient, method: str, path: str, key: str | None,
    status: int
) -> None:
    setpoint = plant.simulator.state.setpoint
    response = await http.request(method, path, json={"value": 50.0},
                                  headers=auth(key) if key else {})
    assert response.status_code == status, response.text
    if status == 403:
        assert error_of(response)["code"] == "forbidden"
        assert "write" in response.json()["error"]["message"] or method == "GET"
    if method == "PUT" and status != 200:
        await plant.simulator.next_update()
        assert plant.simulator.state.setpoint == setpoint


async def test_live_reads_through_opcua(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    from bridge.demo.opcua_plant import PlantServer

    async with PlantSimulator(port=0, interval=0.2) as simulator, PlantServer(port=0) as server:
        monkeypatch.setenv(PORT_VARIABLE, str(simulator.port))
        monkeypatch.setenv("FIELDBRIDGE_DEMO_OPCUA", "true")
        monkeypatch.setenv("FIELDBRIDGE_DEMO_OPCUA_URL", server.url)
        config = with_keys(load_demo_config(state_dir=tmp_path / "state", api_port=0))
        running = Plant(Runtime(config), simulator)
        try:
            await running.until_stored(lambda event: event.point == "opcua.boiler_running",
                                       "the OPC-UA subscription")
            stamp = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
            await server.set("Boiler.Temperature", 70.125, source_timestamp=stamp)
            async with httpx.AsyncClient(base_url=running.url, timeout=SETTLE) as http:
                temperature = await http.get("/v1/points/opcua.boiler_temperature/live",
                                             headers=auth("viewer"))
                by_path = await http.get("/v1/points/opcua.boiler_running/live",
                                         headers=auth("viewer"))
                refused = await http.put("/v1/points/opcua.pump_speed", json={"value": 1.0},
                                         headers=auth("operator"))
        finally:
            await running.stop()
    # asyncua's client runs blocking calls on the loop's default executor: end its thread.
    await asyncio.get_running_loop().shutdown_default_executor()
    assert temperature.status_code == 200, temperature.text
    event = temperature.json()
    assert (event["value"], event["unit"], event["protocol"]) == (70.12, "degC", "opcua")
    assert event["ts"] == "2026-05-06T07:08:09.000Z"
    assert by_path.status_code == 200, by_path.text
    assert by_path.json()["value"] is True
    assert refused.status_code == 409
    assert error_of(refused)["code"] == "not_writable"


def datetime_seconds(text: str) -> float:
    """ISO 8601 to POSIX seconds."""
    from bridge.core.model import parse_timestamp

    return parse_timestamp(text)


# --- every kind of device failure, with fake sources ------------------------------------------


class FailingSource(Source):
    """A source whose live reads and writes fail with one category."""

    def __init__(self, category: ErrorCategory) -> None:
        super().__init__(source_id="rig", protocol="modbus", endpoint="tcp://rig:502")
        self.category = category
        self.attempts: list[tuple[str, Value]] = []

    async def run(self, context: SourceContext) -> None:
        await asyncio.Event().wait()

    async def read(self, point_id: str) -> list[Reading]:
        raise ReadError(point_id, f"{self.category} trouble", self.category)

    async def write(self, point_id: str, value: Value) -> None:
        self.attempts.append((point_id, value))
        raise WriteError(point_id, f"{self.category} trouble", self.category)


class SilentSource(Source):
    """A source of a protocol without live reads or write-back."""

    async def run(self, context: SourceContext) -> None:
        await asyncio.Event().wait()


class NoMapper:
    """Maps nothing."""

    def map(self, reading: Reading) -> list[Event]:
        return []


def rig(tmp_path: Path, source: Source, *, enabled: bool = True) -> Runtime:
    """A runtime with one fake source serving one writable point ``rig.valve``."""
    path = tmp_path / "fieldbridge.yaml"
    path.write_text("bridge:\n  id: edge-1\n  state_dir: state\napi:\n  port: 0\nsources: []\n")
    runtime = Runtime(load_config(path))
    status = EndpointStatus(name=source.id, kind="source", protocol=source.protocol,
                            endpoint=source.endpoint)
    runtime.sources[source.id] = RunningSource(SourceUnit(source, NoMapper()), status, enabled)
    runtime.points["rig.valve"] = ResolvedPoint(
        id="rig.valve", source=source.id, device=None,
        spec=PointBase(name="valve", writable=True), tags={}, report=ReportSpec(),
        path=("sources", 0))
    return runtime


async def call(runtime: Runtime, method: str, path: str) -> httpx.Response:
    """One request to the app in-process."""
    transport = httpx.ASGITransport(app=create_app(runtime.facade()))
    async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as client:
        return await client.request(method, path,
                                    json={"value": 1} if method == "PUT" else None)


@pytest.mark.parametrize(("category", "status", "code"), [
    (ErrorCategory.CONFIG, 422, "rejected"),
    (ErrorCategory.DEVICE, 502, "device_error"),
    (ErrorCategory.TRANSIENT, 503, "device_unavailable"),
    (ErrorCategory.AUTH, 502, "device_denied"),
    (ErrorCategory.PROTOCOL, 502, "protocol_error"),
])
@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/v1/points/rig.valve"), ("GET", "/v1/points/rig.valve/live")])
async def test_device_failures_map_to_statuses(
    tmp_path: Path, category: ErrorCategory, status: int, code: str, method: str, path: str
) -> None:
    source = FailingSource(category)
    response = await call(rig(tmp_path, source), method, path)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["code"] == code
    assert f"{category} trouble" in error["message"]
    assert "rig.valve" in error["message"]
    if status == 503:
        assert response.headers["retry-after"] == "5"
        assert "/v1/sources/rig" in error["hint"]
    if method == "PUT":
        assert source.attempts == [("rig.valve", 1)]


async def test_a_disabled_source_is_a_conflict(tmp_path: Path) -> None:
    runtime = rig(tmp_path, FailingSource(ErrorCategory.DEVICE), enabled=False)
    for method, path in (("PUT", "/v1/points/rig.valve"), ("GET", "/v1/points/rig.valve/live")):
        response = await call(runtime, method, path)
        assert response.status_code == 409
        assert error_of(response)["code"] == "source_disabled"


async def test_a_protocol_without_live_reads_or_writes_says_so(tmp_path: Path) -> None:
    runtime = rig(tmp_path, SilentSource(source_id="rig", protocol="mqtt",
                                         endpoint="mqtt://broker:1883"))
    write = await call(runtime, "PUT", "/v1/points/rig.valve")
    read = await call(runtime, "GET", "/v1/points/rig.valve/live")
    assert (write.status_code, read.status_code) == (422, 422)
    assert "mqtt sources do not support write-back" in error_of(write)["message"]
    assert "mqtt sources do not support live reads" in error_of(read)["message"]


@pytest.mark.parametrize("source", [
    FailingSource(ErrorCategory.TRANSIENT),
    SilentSource(source_id="rig", protocol="mqtt", endpoint="mqtt://broker:1883"),
], ids=["read-error", "no-live-reads"])
async def test_a_failed_live_read_is_a_read_error(tmp_path: Path, source: Source) -> None:
    runtime = rig(tmp_path, source)
    with pytest.raises(ReadError) as caught:
        await runtime.facade().read_live("rig.valve")
    assert not isinstance(caught.value, WriteError)
    assert caught.value.point == "rig.valve"
    expected = ErrorCategory.CONFIG if isinstance(source, SilentSource) else ErrorCategory.TRANSIENT
    assert caught.value.category is expected
