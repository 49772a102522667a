"""The REST API through ASGI: points, history, sources, health, errors, OpenAPI, metrics."""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.api import (
    NOW,
    add_source,
    error_of,
    feed,
    make_event,
    parse_exposition,
    sample,
    write_config,
)

from bridge import __version__
from bridge.api.app import create_app
from bridge.api.context import TIME_PATTERN, parse_time
from bridge.api.models import History, PointPage, PointValue, SourceList, SourceModel
from bridge.core.counters import READINGS
from bridge.core.model import Event
from bridge.registry import load_config
from bridge.runtime import Runtime

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
        "/v1/sources/{source_id}", "/v1/sinks", "/v1/sinks/{sink_id}", "/v1/servers",
        "/v1/status/stream",
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


# Conformance notes of the "Hardening" issue, one test each (tests/api/test_schemathesis.py runs
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


async def test_metric_labels_are_escaped(
    plant: Runtime, client: httpx.AsyncClient
) -> None:
    odd = add_source(plant, 'a"b\\c\nd')
    odd.counters.add(READINGS, 3)
    response = await client.get("/metrics")
    # Parsing checks every line: a raw newline or quote in a label would break the format.
    families = parse_exposition(response.text)
    assert sample(families, "fieldbridge_source_up", source='a\\"b\\\\c\\nd') == 0
    counter = families["fieldbridge_source_readings_total"]
    assert counter["help"] == READINGS.help
    assert counter["type"] == "counter"
    assert ({"source": 'a\\"b\\\\c\\nd', "protocol": "modbus"}, 3) in counter["samples"]


async def test_metrics_never_show_endpoints(plant: Runtime, client: httpx.AsyncClient) -> None:
    add_source(plant, "secured-plc").endpoint = "opc.tcp://operator:hunter2-secret@plc:4840"
    text = (await client.get("/metrics")).text
    assert 'source="secured-plc"' in text
    assert "hunter2" not in text
    assert "plant:502" not in text
