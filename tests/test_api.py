"""The REST API: every endpoint through ASGI, and the real server on a free port."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge import __version__
from bridge.api import server as api_server
from bridge.api.app import create_app
from bridge.api.context import TIME_PATTERN, parse_time
from bridge.api.models import History, PointPage, PointValue, SourceList, SourceModel
from bridge.api.server import ApiServer, api_services
from bridge.config.models import PointBase, ReportSpec, ResolvedPoint
from bridge.core.model import Event, Quality, Reading, new_event_id
from bridge.core.source import Source, SourceContext, SourceUnit
from bridge.core.status import EndpointStatus
from bridge.errors import ApiServerError, ErrorCategory
from bridge.inventory import RunningSource
from bridge.registry import load_config
from bridge.runtime import Runtime

READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
NOW = float(int(time.time()))
"""Whole seconds, so ISO 8601 round trips are exact."""


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def no_leftovers() -> AsyncIterator[None]:
    """Fail a test that leaves tasks or threads behind."""
    threads = set(threading.enumerate())
    yield
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    assert not tasks, f"tasks left behind: {tasks}"
    extra = [thread for thread in threading.enumerate() if thread not in threads]
    assert not extra, f"threads left behind: {extra}"


def write_config(tmp_path: Path, api: str = "") -> Path:
    """A configuration without sources; ``api`` is extra YAML under ``api:``."""
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(
        "bridge:\n  id: edge-1\n  state_dir: state\n"
        f"api:\n  host: 127.0.0.1\n  port: 0\n{api}"
        "sources: []\n")
    return path


def key_config(*keys: tuple[str, str, Sequence[str]]) -> str:
    """YAML for ``api.keys``."""
    lines = ["  keys:\n"]
    for name, key, scopes in keys:
        digest = hashlib.sha256(key.encode()).hexdigest()
        lines.append(f"    - {{name: {name}, sha256: {digest}, scopes: [{', '.join(scopes)}]}}\n")
    return "".join(lines)


class IdleSource(Source):
    """A source that never connects: the API only reads its status."""

    async def run(self, context: SourceContext) -> None:
        await asyncio.Event().wait()


class NoMapper:
    """Maps nothing."""

    def map(self, reading: Reading) -> list[Event]:
        return []


def add_source(runtime: Runtime, source_id: str, *, enabled: bool = True) -> EndpointStatus:
    """Register a fake source with the runtime, as the config would have."""
    status = EndpointStatus(name=source_id, kind="source", protocol="modbus",
                            endpoint=f"tcp://{source_id}.plant:502")
    source = IdleSource(source_id=source_id, protocol="modbus", endpoint=status.endpoint)
    runtime.sources[source_id] = RunningSource(SourceUnit(source, NoMapper()), status, enabled)
    return status


def add_point(
    runtime: Runtime,
    point_id: str,
    source: str,
    device: str | None,
    *,
    unit: str | None = None,
    writable: bool = False,
    tags: dict[str, str] | None = None,
) -> None:
    """Register a configured point with the runtime."""
    name = point_id.rsplit(".", 1)[-1]
    runtime.points[point_id] = ResolvedPoint(
        id=point_id, source=source, device=device,
        spec=PointBase(name=name, unit=unit, description=f"the {name}", writable=writable),
        tags=tags or {}, report=ReportSpec(), path=("sources", 0))


def make_event(
    point: str,
    value: float | bool | str | None,
    *,
    ts: float,
    source: str = "plc1",
    quality: Quality = Quality.GOOD,
    unit: str | None = None,
) -> Event:
    """An event as a mapping would produce it."""
    return Event(id=new_event_id(), source=source, point=point, value=value, unit=unit,
                 quality=quality, ts=ts, received_at=ts + 0.01, protocol="modbus",
                 bridge="edge-1", tags={}, reason=None if quality is Quality.GOOD else "stale")


async def feed(runtime: Runtime, events: Sequence[Event]) -> None:
    """Submit events through the router and wait until they are stored."""
    stored = asyncio.Event()
    remove = runtime.router.add_listener(
        lambda batch: stored.set() if runtime.router.pending == 0 else None)
    try:
        await runtime.router.submit(events)
        await asyncio.wait_for(stored.wait(), 5)
    finally:
        remove()


async def open_runtime(path: Path) -> tuple[Runtime, asyncio.Task[None]]:
    """A runtime with its store open and its router running."""
    runtime = Runtime(load_config(path))
    runtime.store.open()
    return runtime, asyncio.create_task(runtime.router.run(), name="router")


async def close_runtime(runtime: Runtime, router: asyncio.Task[None]) -> None:
    """Stop the router and close the store."""
    router.cancel()
    await asyncio.gather(router, return_exceptions=True)
    runtime.store.close()


@pytest.fixture
async def plant(tmp_path: Path) -> AsyncIterator[Runtime]:
    """A runtime with two sources, five points, and values for four of them."""
    runtime, router = await open_runtime(write_config(tmp_path))
    add_source(runtime, "plc1")
    boiler = runtime.sources["plc1"].status.child("boiler", "tcp://plc1.plant:502/1")
    boiler.success()
    runtime.sources["plc1"].status.success()
    runtime.sources["plc1"].status.counters.update(readings=12, events=10, rejected=2)
    meter = add_source(runtime, "meter-bus")
    meter.down("connection refused", ErrorCategory.TRANSIENT)
    add_point(runtime, "boiler.supply_temp", "plc1", "boiler", unit="degC",
              tags={"area": "north", "kind": "temperature"})
    add_point(runtime, "boiler.return_temp", "plc1", "boiler", unit="degC",
              tags={"area": "north", "kind": "temperature"})
    add_point(runtime, "boiler.setpoint", "plc1", "boiler", unit="degC", writable=True,
              tags={"area": "north", "kind": "setpoint"})
    add_point(runtime, "meter:1.energy", "meter-bus", "meter:1", unit="kWh",
              tags={"area": "south"})
    add_point(runtime, "meter:1.power", "meter-bus", "meter:1", unit="kW",
              tags={"area": "south"})
    await feed(runtime, [
        make_event("boiler.supply_temp", 71.5, ts=NOW - 10, unit="degC"),
        make_event("boiler.return_temp", 55.0, ts=NOW - 10, unit="degC"),
        make_event("boiler.setpoint", 70, ts=NOW - 10, unit="degC"),
        make_event("meter:1.energy", None, ts=NOW - 5, source="meter-bus",
                   quality=Quality.BAD, unit="kWh"),
    ])
    yield runtime
    await close_runtime(runtime, router)


@pytest.fixture
async def client(plant: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process."""
    transport = httpx.ASGITransport(app=create_app(plant.facade()))
    async with httpx.AsyncClient(transport=transport, base_url="http://fieldbridge.test") as http:
        yield http


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The structured error of a response, checked for shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert isinstance(error.get("hint"), str)
    return error


# --- points -----------------------------------------------------------------------------------


async def test_points_lists_every_configured_point_with_its_latest_value(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/points")
    assert response.status_code == 200
    body = response.json()
    assert PointPage.model_validate(body).model_dump(mode="json") == body
    assert body["total"] == 5
    assert [item["id"] for item in body["items"]] == [
        "boiler.return_temp", "boiler.setpoint", "boiler.supply_temp", "meter:1.energy",
        "meter:1.power"]
    supply = body["items"][2]
    assert supply["value"] == 71.5
    assert supply["quality"] == "good"
    assert supply["unit"] == "degC"
    assert supply["device"] == "boiler"
    assert supply["source"] == "plc1"
    assert supply["description"] == "the supply_temp"
    assert supply["tags"] == {"area": "north", "kind": "temperature"}
    assert supply["configured"] is True
    assert supply["ts"].endswith("Z")
    assert supply["event_id"]
    assert body["items"][1]["value"] == 70
    assert isinstance(body["items"][1]["value"], int)
    assert body["items"][1]["writable"] is True
    energy = body["items"][3]
    assert (energy["value"], energy["quality"], energy["reason"]) == (None, "bad", "stale")
    power = body["items"][4]
    assert (power["value"], power["quality"], power["ts"]) == (None, None, None)
    assert power["unit"] == "kW"


@pytest.mark.parametrize(("query", "expected"), [
    ("source=meter-bus", ["meter:1.energy", "meter:1.power"]),
    ("device=boiler", ["boiler.return_temp", "boiler.setpoint", "boiler.supply_temp"]),
    ("prefix=boiler.s", ["boiler.setpoint", "boiler.supply_temp"]),
    ("tag=kind=temperature", ["boiler.return_temp", "boiler.supply_temp"]),
    ("tag=area=north&tag=kind=setpoint", ["boiler.setpoint"]),
    ("tag=kind", ["boiler.return_temp", "boiler.setpoint", "boiler.supply_temp"]),
    ("tag=area=nowhere", []),
    ("quality=bad", ["meter:1.energy"]),
    ("quality=none", ["meter:1.power"]),
    ("quality=bad&quality=none", ["meter:1.energy", "meter:1.power"]),
    ("source=plc1&quality=good&prefix=boiler.r", ["boiler.return_temp"]),
    ("source=unknown", []),
])
async def test_points_filters(
    client: httpx.AsyncClient, query: str, expected: list[str]
) -> None:
    response = await client.get(f"/v1/points?{query}")
    assert response.status_code == 200
    body = response.json()
    assert [item["id"] for item in body["items"]] == expected
    assert body["total"] == len(expected)


async def test_points_pages_keep_the_total(client: httpx.AsyncClient) -> None:
    pages = [(await client.get(f"/v1/points?limit=2&offset={offset}")).json()
             for offset in (0, 2, 4, 6)]
    assert [page["total"] for page in pages] == [5, 5, 5, 5]
    assert [len(page["items"]) for page in pages] == [2, 2, 1, 0]
    ids = [item["id"] for page in pages for item in page["items"]]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    assert (pages[1]["offset"], pages[1]["limit"]) == (2, 2)


@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "offset=-1", "quality=great",
                                   "tag==x"])
async def test_points_reject_bad_parameters_with_a_structured_422(
    client: httpx.AsyncClient, query: str
) -> None:
    response = await client.get(f"/v1/points?{query}")
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("query.")
    assert error["details"][0]["location"].startswith("query.")


async def test_one_point_by_an_id_with_dots_and_colons(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/points/meter:1.energy")
    assert response.status_code == 200
    assert PointValue.model_validate(response.json()).model_dump(mode="json") == response.json()
    assert response.json()["id"] == "meter:1.energy"
    assert response.json()["quality"] == "bad"
    encoded = await client.get("/v1/points/meter%3A1.energy")
    assert encoded.json() == response.json()


async def test_unknown_point_is_a_structured_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/points/boiler.nothing")
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "not_found"
    assert "boiler.nothing" in error["message"]
    assert "/v1/points" in error["hint"]
    history = await client.get("/v1/points/boiler.nothing/history")
    assert history.status_code == 404


async def test_a_stored_point_no_longer_configured_is_listed_as_such(
    plant: Runtime, client: httpx.AsyncClient
) -> None:
    await feed(plant, [make_event("old.point", "on", ts=NOW - 100, unit="state")])
    response = await client.get("/v1/points/old.point")
    assert response.status_code == 200
    body = response.json()
    assert (body["configured"], body["value"], body["source"], body["unit"]) == (
        False, "on", "plc1", "state")
    listed = (await client.get("/v1/points?prefix=old")).json()["items"]
    assert [item["id"] for item in listed] == ["old.point"]


# --- history ----------------------------------------------------------------------------------


HISTORY_URL = "/v1/points/meter:1.power/history"


@pytest.fixture
async def history(plant: Runtime) -> list[Event]:
    """Six events of a point without earlier ones, a minute apart, the newest 30 s ago."""
    events = [make_event("meter:1.power", 50.0 + index, ts=NOW - 330 + 60 * index,
                         source="meter-bus") for index in range(6)]
    await feed(plant, events)
    return events


async def test_history_is_newest_first_by_default(
    client: httpx.AsyncClient, history: list[Event]
) -> None:
    response = await client.get(HISTORY_URL)
    assert response.status_code == 200
    body = response.json()
    assert History.model_validate(body).model_dump(mode="json") == body
    assert [item["value"] for item in body["items"]] == [55.0, 54.0, 53.0, 52.0, 51.0, 50.0]
    assert (body["point"], body["order"], body["count"], body["has_more"]) == (
        "meter:1.power", "desc", 6, False)
    assert body["items"][0] == {**history[5].to_dict(), "reason": None}


async def test_history_order_and_limit(
    client: httpx.AsyncClient, history: list[Event]
) -> None:
    oldest = (await client.get(HISTORY_URL, params={"order": "asc", "limit": 2})).json()
    assert [item["value"] for item in oldest["items"]] == [50.0, 51.0]
    assert (oldest["order"], oldest["count"], oldest["has_more"]) == ("asc", 2, True)
    newest = (await client.get(HISTORY_URL, params={"limit": 3})).json()
    assert [item["value"] for item in newest["items"]] == [55.0, 54.0, 53.0]
    assert newest["has_more"] is True
    exact = (await client.get(HISTORY_URL, params={"limit": 6})).json()
    assert (exact["count"], exact["has_more"]) == (6, False)


async def test_history_between_times(
    client: httpx.AsyncClient, history: list[Event]
) -> None:
    def stamp(seconds: float) -> str:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()

    between = (await client.get(HISTORY_URL, params={
        "since": stamp(history[1].ts), "until": stamp(history[3].ts), "order": "asc"})).json()
    assert [item["value"] for item in between["items"]] == [51.0, 52.0, 53.0]
    zulu = (await client.get(HISTORY_URL, params={
        "since": stamp(history[4].ts).replace("+00:00", "Z")})).json()
    assert [item["value"] for item in zulu["items"]] == [55.0, 54.0]
    # Relative to the clock now, not to NOW: the module may have been imported minutes ago.
    relative = f"-{int(time.time() - history[4].ts) + 30}s"
    recent = (await client.get(HISTORY_URL, params={"since": relative})).json()
    assert [item["value"] for item in recent["items"]] == [55.0, 54.0]
    until = (await client.get(HISTORY_URL, params={
        "until": f"{history[0].ts}", "since": "-1h"})).json()
    assert [item["value"] for item in until["items"]] == [50.0]


@pytest.mark.parametrize(("params", "location"), [
    ({"since": "yesterday"}, "query.since"),
    ({"until": "-5 fortnights"}, "query.until"),
    ({"since": "-1m", "until": "-1h"}, "query.since"),
    ({"limit": "10001"}, "query.limit"),
    ({"order": "sideways"}, "query.order"),
])
async def test_history_rejects_bad_parameters(
    client: httpx.AsyncClient, params: dict[str, str], location: str
) -> None:
    response = await client.get(HISTORY_URL, params=params)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_request"
    assert error["details"][0]["location"] == location


def test_parse_time_forms() -> None:
    now = 1_700_000_000.0
    assert parse_time("now", now) == now
    assert parse_time("-1h", now) == now - 3600
    assert parse_time("-90s", now) == now - 90
    assert parse_time("-500ms", now) == now - 0.5
    assert parse_time("-7d", now) == now - 7 * 86400
    assert parse_time("1699999000", now) == 1_699_999_000.0
    assert parse_time("2023-11-14T22:13:20Z", now) == now
    assert parse_time("2023-11-14T23:13:20+01:00", now) == now
    assert parse_time("2023-11-14T22:13:20", now) == now
    for bad in ("nan", "-1y", "soon", ""):
        with pytest.raises(ValueError):  # noqa: PT011
            parse_time(bad, now)


# --- sources and health -----------------------------------------------------------------------


async def test_sources_inventory(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/sources")
    assert response.status_code == 200
    # Every key is declared in the model, so the OpenAPI documents all of it.
    listed = SourceList.model_validate(response.json()).items
    assert all(item.model_extra == {} for item in listed)
    assert all(device.model_extra == {} for item in listed for device in item.devices or [])
    items = {item["id"]: item for item in response.json()["items"]}
    assert set(items) == {"plc1", "meter-bus"}
    plc = items["plc1"]
    assert (plc["state"], plc["kind"], plc["protocol"], plc["enabled"], plc["points"]) == (
        "up", "source", "modbus", True, 3)
    assert plc["counters"] == {"readings": 12, "events": 10, "rejected": 2}
    assert [(device["id"], device["state"], device["points"]) for device in plc["devices"]] == [
        ("boiler", "up", 3)]
    meter = items["meter-bus"]
    assert (meter["state"], meter["last_error"], meter["error_category"]) == (
        "down", "connection refused", "transient")
    one = await client.get("/v1/sources/meter-bus")
    assert one.status_code == 200
    assert one.json() == meter
    assert SourceModel.model_validate(one.json()).model_extra == {}


async def test_unknown_source_is_a_structured_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/sources/nope")
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


async def test_liveness_and_readiness(plant: Runtime, client: httpx.AsyncClient) -> None:
    live = await client.get("/health/live")
    assert live.status_code == 200
    assert live.json()["status"] == "alive"
    assert live.json()["version"] == __version__
    not_ready = await client.get("/health/ready")
    assert not_ready.status_code == 503
    body = not_ready.json()
    assert body["status"] == "not_ready"
    assert body["reasons"] == ["starting: the sources are not all started yet"]
    assert body["error"]["code"] == "not_ready"
    assert body["sources"] == {"plc1": "up", "meter-bus": "down"}
    plant.ready.set()
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "reasons": [], "error": None,
                            "sources": {"plc1": "up", "meter-bus": "down"},
                            "summary": {"up": 1, "down": 1}}


async def test_readiness_fails_when_the_store_is_closed(tmp_path: Path) -> None:
    runtime = Runtime(load_config(write_config(tmp_path)))
    runtime.ready.set()
    transport = httpx.ASGITransport(app=create_app(runtime.facade()))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["reasons"] == ["the store cannot be read: store is not open"]


# --- errors and OpenAPI -----------------------------------------------------------------------


async def test_unknown_routes_and_methods_are_structured(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v2/everything")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"
    assert "/docs" in error_of(missing)["hint"]
    wrong = await client.delete("/v1/points")
    assert wrong.status_code == 405
    assert error_of(wrong)["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "GET"


async def test_a_failing_handler_is_a_structured_500(plant: Runtime) -> None:
    app = create_app(plant.facade())

    @app.get("/test/broken")
    async def broken() -> None:
        raise RuntimeError("internal detail 4711")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/test/broken")
    assert response.status_code == 500
    assert error_of(response)["code"] == "internal"
    assert "4711" not in response.text


async def test_openapi_documents_every_route(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["info"]["title"] == "Fieldbridge"
    assert document["info"]["version"] == __version__
    assert set(document["paths"]) == {
        "/v1/points", "/v1/points/{point_id}", "/v1/points/{point_id}/history",
        "/v1/points/{point_id}/live", "/v1/events/stream", "/v1/sources",
        "/v1/sources/{source_id}", "/v1/sinks", "/v1/sinks/{sink_id}", "/v1/status/stream",
        "/v1/whoami", "/health/live", "/health/ready", "/metrics", "/v1/discover/{protocol}"}
    assert set(document["paths"]["/v1/points/{point_id}"]) == {"get", "put"}
    stream = document["paths"]["/v1/events/stream"]["get"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    points = document["paths"]["/v1/points"]["get"]
    assert {parameter["name"] for parameter in points["parameters"]} == {
        "source", "device", "tag", "prefix", "quality", "limit", "offset"}
    assert set(points["responses"]) >= {"200", "401", "403", "422"}
    assert points["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}
    assert {"PointPage", "PointValue", "History", "EventModel", "SourceModel",
            "ErrorResponse", "Readiness"} <= set(document["components"]["schemas"])
    assert set(document["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


# Conformance notes of the "Hardening" issue, one test each (tests/test_schemathesis.py runs
# schemathesis itself against the daemon).


async def test_a_405_allows_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    # /v1/points/{point_id} has a route for GET and another for PUT: before, Allow: GET.
    response = await client.options("/v1/points/boiler.setpoint")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, PUT"
    assert error_of(response)["hint"] == "use GET, PUT"
    assert (await client.delete("/v1/points/boiler.setpoint")).headers["allow"] == "GET, PUT"


async def test_a_body_that_is_not_utf8_is_the_documented_422(client: httpx.AsyncClient) -> None:
    # Before: an undocumented 400, "There was an error parsing the body".
    response = await client.put("/v1/points/boiler.setpoint", content=b"\xff\x64\xff",
                                headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_request"
    assert error["details"][0]["location"] == "body"


@pytest.mark.parametrize(("url", "location"), [
    ("/v1/points?tag=", "query.tag"),
    ("/v1/points/boiler.supply_temp/history?since=", "query.since"),
    ("/v1/points/boiler.supply_temp/history?until=", "query.until"),
])
async def test_an_empty_filter_is_a_422_the_openapi_foretells(
    client: httpx.AsyncClient, url: str, location: str
) -> None:
    response = await client.get(url)
    assert response.status_code == 422
    assert error_of(response)["details"][0]["location"] == location
    # The document says so: a generated client never sends the empty value.
    document = (await client.get("/openapi.json")).json()
    path = url.partition("?")[0].replace("boiler.supply_temp", "{point_id}")
    name = location.removeprefix("query.")
    parameter = next(parameter for parameter in document["paths"][path]["get"]["parameters"]
                     if parameter["name"] == name)
    string = parameter["schema"]["anyOf"][0]
    pattern = re.compile(string["items"]["pattern"] if "items" in string else string["pattern"])
    assert not pattern.search("")


async def test_a_tag_filter_named_false_is_a_tag_name(client: httpx.AsyncClient) -> None:
    # tag=false asks for points that have a tag named "false": none here, and not an error.
    response = await client.get("/v1/points?tag=false")
    assert response.status_code == 200
    assert response.json()["items"] == []


def test_the_time_pattern_documents_the_forms_parse_time_reads() -> None:
    pattern = re.compile(TIME_PATTERN)
    now = 1_700_000_000.0
    for text in ("now", "-15m", "-500ms", "-7d", "-90", "1699999000", "1699999000.5",
                 "2023-11-14", "2023-11-14T22:13:20Z", "2023-11-14T23:13:20+01:00",
                 "2023-11-14T22:13:20.250", "2023-11-14 22:13"):
        assert pattern.fullmatch(text), text
        parse_time(text, now)
    for text in ("", "soon", "-1y", "nan", "yesterday", " now", "2023-13-01", "2023-11-14T24:00"):
        assert not pattern.fullmatch(text), text


async def test_errors_of_streams_and_metrics_are_documented_as_json(
    client: httpx.AsyncClient
) -> None:
    # A streaming response class documented its 422 as text/event-stream, which it is not.
    document = (await client.get("/openapi.json")).json()
    for path in ("/v1/events/stream", "/v1/status/stream", "/metrics"):
        responses = document["paths"][path]["get"]["responses"]
        for status in ("401", "403", "422"):
            assert set(responses[status]["content"]) == {"application/json"}, (path, status)
    for path in ("/v1/events/stream", "/v1/status/stream"):
        assert set(document["paths"][path]["get"]["responses"]["200"]["content"]) == {
            "text/event-stream"}
    response = await client.get("/v1/events/stream?tag==x")
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"


async def test_each_stream_message_kind_has_its_schema(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()

    def kinds(path: str) -> dict[str, Any]:
        content = document["paths"][path]["get"]["responses"]["200"]["content"]
        return {kind["properties"]["event"]["const"]: kind["properties"]["data"]
                for kind in content["text/event-stream"]["itemSchema"]["oneOf"]}

    events = kinds("/v1/events/stream")
    assert set(events) == {"event", "warning", "error"}
    assert events["event"]["contentSchema"] == {"$ref": "#/components/schemas/EventModel"}
    notice = events["warning"]["contentSchema"]
    # The unknown_last_event_id warning, as the stream sends it, fits its schema.
    assert set(notice["required"]) == {"code", "message", "hint"}
    assert notice["properties"]["last_event_id"]["anyOf"] == [{"type": "string"},
                                                              {"type": "null"}]
    status = kinds("/v1/status/stream")
    assert set(status) == {"status"}
    assert status["status"]["contentSchema"]["properties"]["sinks"]["items"] == {
        "$ref": "#/components/schemas/SinkModel"}


# --- metrics ----------------------------------------------------------------------------------

SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """Families of a text exposition, checking the format as Prometheus reads it."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"family {name} appears twice"
            families[name] = {"help": help_text, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current, f"TYPE of {name} without its HELP first"
            assert kind in ("counter", "gauge", "untyped")
            families[name]["type"] = kind
        else:
            match = SAMPLE.match(line)
            assert match is not None, f"not a sample line: {line!r}"
            assert match["name"] == current, f"sample {line!r} outside its family"
            labels = dict(LABEL.findall(match["labels"] or ""))
            value = float(match["value"])
            families[match["name"]]["samples"].append((labels, value))
    for name, family in families.items():
        assert family["type"] is not None, name
        if family["type"] == "counter":
            assert name.endswith("_total"), name
    return families


def sample(families: dict[str, dict[str, Any]], name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    values = [value for found, value in families[name]["samples"]
              if labels.items() <= found.items()]
    assert len(values) == 1, (name, labels, families[name]["samples"])
    return float(values[0])


async def test_metrics_exposition(plant: Runtime, client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = parse_exposition(response.text)
    assert sample(families, "fieldbridge_info", version=__version__, bridge="edge-1") == 1
    assert sample(families, "process_start_time_seconds") == pytest.approx(plant.started_at)
    assert sample(families, "fieldbridge_router_events_total") == 4
    assert sample(families, "fieldbridge_router_pending_events") == 0
    assert sample(families, "fieldbridge_router_backpressure_waits_total") == 0
    assert sample(families, "fieldbridge_store_written_events_total") == 4
    assert sample(families, "fieldbridge_points") == 5
    assert sample(families, "fieldbridge_source_up", source="plc1", protocol="modbus") == 1
    assert sample(families, "fieldbridge_source_up", source="meter-bus") == 0
    assert sample(families, "fieldbridge_source_state", source="meter-bus", state="down") == 1
    assert sample(families, "fieldbridge_source_state", source="meter-bus", state="up") == 0
    assert sample(families, "fieldbridge_source_events_total", source="plc1") == 10
    assert sample(families, "fieldbridge_source_readings_total", source="plc1") == 12
    assert sample(families, "fieldbridge_source_rejected_total", source="plc1") == 2
    assert sample(families, "fieldbridge_source_errors_total", source="meter-bus") == 1
    assert sample(families, "fieldbridge_device_up", source="plc1", device="boiler") == 1
    assert families["fieldbridge_source_up"]["type"] == "gauge"
    assert families["fieldbridge_source_events_total"]["type"] == "counter"
    assert "fieldbridge_api_auth_failures_total" not in families


async def test_metric_labels_and_help_are_escaped(
    plant: Runtime, client: httpx.AsyncClient
) -> None:
    odd = add_source(plant, 'a"b\\c\nd')
    odd.counters["odd\\key\nx"] += 3
    response = await client.get("/metrics")
    # Parsing checks every line: a raw newline or quote in a label would break the format.
    families = parse_exposition(response.text)
    assert sample(families, "fieldbridge_source_up", source='a\\"b\\\\c\\nd') == 0
    counter = families["fieldbridge_source_odd_key_x_total"]
    assert counter["help"] == "Source counter 'odd\\\\key\\nx'."
    assert counter["type"] == "counter"
    assert counter["samples"] == [({"source": 'a\\"b\\\\c\\nd', "protocol": "modbus"}, 3)]


async def test_metrics_never_show_endpoints(plant: Runtime, client: httpx.AsyncClient) -> None:
    add_source(plant, "secured-plc").endpoint = "opc.tcp://operator:hunter2-secret@plc:4840"
    text = (await client.get("/metrics")).text
    assert 'source="secured-plc"' in text
    assert "hunter2" not in text
    assert "plant:502" not in text


# --- authentication ---------------------------------------------------------------------------


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an API with a read key, a write-only key and an admin key."""
    path = write_config(tmp_path, key_config(
        ("dashboard", READ_KEY, ["read"]), ("writer", WRITE_KEY, ["write"]),
        ("ops", ADMIN_KEY, ["admin"])))
    runtime, router = await open_runtime(path)
    add_point(runtime, "boiler.supply_temp", "plc1", "boiler")
    transport = httpx.ASGITransport(app=create_app(runtime.facade()))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http
    await close_runtime(runtime, router)


@pytest.mark.parametrize("path", ["/v1/points", "/v1/points/boiler.supply_temp",
                                  "/v1/points/boiler.supply_temp/history", "/v1/sources",
                                  "/metrics"])
async def test_a_key_is_required(secured: httpx.AsyncClient, path: str) -> None:
    missing = await secured.get(path)
    assert missing.status_code == 401
    assert error_of(missing)["code"] == "unauthenticated"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    unknown = await secured.get(path, headers={"Authorization": "Bearer not-a-key"})
    assert unknown.status_code == 401
    assert error_of(unknown)["message"] == "the API key is not known"
    for headers in ({"Authorization": f"Bearer {READ_KEY}"}, {"X-API-Key": READ_KEY},
                    {"authorization": f"bearer {ADMIN_KEY}"}, {"x-api-key": ADMIN_KEY}):
        allowed = await secured.get(path, headers=headers)
        assert allowed.status_code == 200, (headers, allowed.text)


async def test_a_key_without_the_scope_is_forbidden(
    secured: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = await secured.get("/v1/points", headers={"X-API-Key": WRITE_KEY})
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "forbidden"
    assert "writer" in error["message"]
    assert "'read'" in error["hint"]
    await secured.get("/v1/points", headers={"Authorization": f"Bearer {READ_KEY}x"})
    for key in (READ_KEY, WRITE_KEY, ADMIN_KEY):
        assert key not in caplog.text
        assert key not in response.text
    metrics = parse_exposition((await secured.get(
        "/metrics", headers={"X-API-Key": ADMIN_KEY})).text)
    assert sample(metrics, "fieldbridge_api_auth_failures_total", reason="forbidden") == 1
    assert sample(metrics, "fieldbridge_api_auth_failures_total", reason="unauthenticated") == 1


@pytest.mark.parametrize("path", ["/health/live", "/openapi.json", "/docs"])
async def test_health_and_docs_stay_open(secured: httpx.AsyncClient, path: str) -> None:
    assert (await secured.get(path)).status_code == 200


async def test_a_malformed_authorization_header_falls_back_to_the_api_key_header(
    secured: httpx.AsyncClient,
) -> None:
    response = await secured.get("/v1/points", headers={
        "Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": READ_KEY})
    assert response.status_code == 200


# --- the real server --------------------------------------------------------------------------


async def test_real_server_on_a_free_port(plant: Runtime) -> None:
    server = ApiServer(plant.facade())
    await server.start()
    try:
        assert server.port is not None
        assert server.port != 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=server.url) as http:
            live = await http.get("/health/live")
            point = await http.get("/v1/points/boiler.supply_temp")
        assert live.status_code == 200
        assert point.json()["value"] == 71.5
        assert "server" not in point.headers
        assert [task.get_name() for task in asyncio.all_tasks()].count("api") == 1
    finally:
        port = server.port
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 2
    assert "api" not in [task.get_name() for task in asyncio.all_tasks()]
    assert server.port is None
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/health/live")


async def test_stop_while_a_client_keeps_its_connection_open(plant: Runtime) -> None:
    server = ApiServer(plant.facade())
    await server.start()
    assert server.url is not None
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/health/live")).status_code == 200
        # The keep-alive connection is still open here.
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 2


async def test_stop_ends_long_responses_through_the_closing_event(plant: Runtime) -> None:
    server = ApiServer(plant.facade())
    waiting = asyncio.Event()

    @server.app.get("/test/stream")
    async def stream() -> dict[str, bool]:
        waiting.set()
        await server.context.closing.wait()
        return {"closed": True}

    await server.start()
    assert server.url is not None
    async with httpx.AsyncClient(base_url=server.url) as http:
        request = asyncio.create_task(http.get("/test/stream"))
        await asyncio.wait_for(waiting.wait(), 5)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 1
        response = await request
    assert response.json() == {"closed": True}


async def test_stop_cancels_a_request_that_does_not_end(plant: Runtime) -> None:
    server = ApiServer(plant.facade())
    waiting = asyncio.Event()

    @server.app.get("/test/hang")
    async def hang() -> None:
        waiting.set()
        await asyncio.Event().wait()

    await server.start()
    assert server.url is not None
    async with httpx.AsyncClient(base_url=server.url) as http:
        request = asyncio.create_task(http.get("/test/hang"))
        await asyncio.wait_for(waiting.wait(), 5)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < ApiServer.STOP_TIMEOUT
        assert (await request).status_code == 500


def test_every_resolved_address_is_bound_on_one_port(monkeypatch: pytest.MonkeyPatch) -> None:
    def loopbacks(host: str | None, port: int, **_: object) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", port, 0, 0)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", loopbacks)
    sockets = api_server._bind("loopback", 0)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1
        assert sockets[0].getsockname()[0] == "127.0.0.1"
        # Without IPv6 the second address is skipped rather than failing the start.
        assert [sock.family for sock in sockets][:1] == [socket.AF_INET]
        assert all(sock.proto == socket.IPPROTO_TCP for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


async def test_an_unknown_host_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path).read_text().replace("127.0.0.1", "no-such-host.invalid")
    (tmp_path / "unknown.yaml").write_text(config)
    with pytest.raises(ApiServerError, match=r"no-such-host\.invalid:0: cannot resolve"):
        await ApiServer(Runtime(load_config(tmp_path / "unknown.yaml")).facade()).start()


async def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path).read_text().replace("port: 0", f"port: {port}")
        (tmp_path / "busy.yaml").write_text(config)
        runtime = Runtime(load_config(tmp_path / "busy.yaml"))
        with pytest.raises(ApiServerError, match=rf"127\.0\.0\.1:{port}: .*in use") as caught:
            await ApiServer(runtime.facade()).start()
    assert (caught.value.host, caught.value.port) == ("127.0.0.1", port)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fieldbridge test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "api.crt", directory / "api.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    path = write_config(tmp_path, f"  tls: {{cert: {cert}, key: {key}}}\n")
    runtime = Runtime(load_config(path))
    async with ApiServer(runtime.facade()) as server:
        assert server.url is not None
        assert server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(base_url=server.url, verify=context) as http:
            assert (await http.get("/health/live")).status_code == 200
    assert server.port is None


async def test_an_unreadable_certificate_is_a_clear_error(tmp_path: Path) -> None:
    cert = tmp_path / "missing.crt"
    path = write_config(tmp_path, f"  tls: {{cert: {cert}, key: {cert}}}\n")
    with pytest.raises(ApiServerError, match=r"cannot load TLS certificate .*missing\.crt"):
        await ApiServer(Runtime(load_config(path)).facade()).start()


async def test_the_runtime_serves_the_api(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.runtime")
    config = load_config(write_config(tmp_path))
    runtime = Runtime(config)
    running = asyncio.create_task(runtime.run(services=api_services(config)), name="runtime")
    try:
        await asyncio.wait_for(runtime.ready.wait(), 5)
        assert runtime.api_port
        assert f"API on port {runtime.api_port}" in caplog.text
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.api_port}") as http:
            response = await http.get("/health/ready")
        assert response.status_code == 200
        assert response.json()["status"] == "ready"
    finally:
        runtime.stop()
        await asyncio.wait_for(running, 5)
    assert runtime.api_port is None


async def test_a_busy_port_stops_the_runtime_before_it_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path).read_text().replace("port: 0", f"port: {port}")
        (tmp_path / "busy.yaml").write_text(config)
        runtime = Runtime(load_config(tmp_path / "busy.yaml"))
        # A plain error, not an exception group: nothing has started yet.
        with pytest.raises(ApiServerError, match=rf"127\.0\.0\.1:{port}: .*in use"):
            await runtime.run(services=[ApiServer])
    assert not runtime.ready.is_set()
    assert not runtime.store.is_open


def test_a_disabled_api_is_not_served(tmp_path: Path) -> None:
    assert api_services(load_config(write_config(tmp_path))) == [ApiServer]
    assert api_services(load_config(write_config(tmp_path, "  enabled: false\n"))) == []

