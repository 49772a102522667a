"""The published event schema is generated from the event's declaration, and every event the
bridge serializes is valid against it."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Any

import msgspec
import pytest
from pydantic import BaseModel, Field, create_model

from bridge.cli import main
from bridge.core.model import Event, Quality, Value, isoformat, new_event_id
from bridge.core.schema import (
    event_descriptions,
    event_fields,
    event_property_schemas,
    event_schema,
    event_schema_text,
    shipped_event_schema_text,
)

REGENERATE = "fieldbridge event-schema > bridge/core/event.schema.json"

_TYPES: dict[str, Any] = {
    "string": str, "object": dict, "null": type(None), "boolean": bool,
    "number": (int, float), "integer": int, "array": list,
}
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def problems(instance: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """What in ``instance`` breaks ``schema``, for the keywords the event schema uses
    (``type``, ``enum``, ``format``, ``required``, ``properties``, ``additionalProperties``)."""
    found: list[str] = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(isinstance(instance, _TYPES[name])
                   and not (isinstance(instance, bool) and name in ("number", "integer"))
                   for name in names):
            found.append(f"{path or '/'}: {instance!r} is not of type {names}")
    if "enum" in schema and instance not in schema["enum"]:
        found.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if schema.get("format") == "date-time" and isinstance(instance, str):
        if not _TIMESTAMP.match(instance):
            found.append(f"{path}: {instance!r} is not ISO 8601 UTC with milliseconds and Z")
        else:
            datetime.fromisoformat(instance.replace("Z", "+00:00"))
    if schema.get("format") == "uuid" and isinstance(instance, str):
        try:
            uuid.UUID(instance)
        except ValueError:
            found.append(f"{path}: {instance!r} is not a UUID")
    if isinstance(instance, dict):
        found += [f"{path}/{name}: required" for name in schema.get("required", [])
                  if name not in instance]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, value in instance.items():
            if name in properties:
                found += problems(value, properties[name], f"{path}/{name}")
            elif extra is False:
                found.append(f"{path}/{name}: not allowed")
            elif isinstance(extra, dict):
                found += problems(value, extra, f"{path}/{name}")
    return found


def test_the_committed_schema_is_the_one_generated_from_the_declaration() -> None:
    assert shipped_event_schema_text() == event_schema_text(), (
        f"bridge/core/event.schema.json is stale: regenerate it with `{REGENERATE}`")


def test_the_command_prints_the_generated_schema_exactly(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    assert main(["event-schema"]) == 0
    assert capsys.readouterr().out == event_schema_text()


def test_the_schema_is_draft_2020_12_with_the_published_constraints() -> None:
    schema = event_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "Fieldbridge normalized event"
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert "$defs" not in schema
    assert "$ref" not in json.dumps(schema)
    properties = schema["properties"]
    assert schema["required"] == list(properties) == [
        "id", "source", "point", "value", "unit", "quality", "reason", "ts", "received_at",
        "protocol", "tags", "bridge"]
    assert properties["id"]["format"] == "uuid"
    assert properties["value"]["type"] == ["number", "boolean", "string", "null"]
    assert properties["quality"]["enum"] == ["good", "uncertain", "bad"]
    # Any connector may stamp its protocol name: a string, not a list of the built-in ones.
    assert properties["protocol"] == {"type": "string", "minLength": 1,
                                      "description": properties["protocol"]["description"]}
    for name in ("ts", "received_at"):
        assert (properties[name]["type"], properties[name]["format"]) == ("string", "date-time")
    assert properties["tags"]["additionalProperties"] == {"type": "string"}
    assert all("default" not in each for each in properties.values())


def test_descriptions_are_the_declarations() -> None:
    published = [field.name for field in msgspec.structs.fields(Event) if field.name != "body"]
    assert list(event_descriptions()) == published == list(event_property_schemas())
    assert event_descriptions()["reason"] == "Why the quality is not good; null when good."


def test_a_response_model_derived_from_the_fields_reads_and_writes_events_exactly() -> None:
    fields = event_fields()
    assert [field.name for field in fields] == list(event_property_schemas())
    assert {field.name: field.type for field in fields}["ts"] is str
    model: type[BaseModel] = create_model(  # type: ignore[call-overload]
        "EventModel", **{field.name: (field.type, Field(
            description=field.description, json_schema_extra=field.json_schema_extra or None))
            for field in fields})
    schema = model.model_json_schema()
    assert schema["required"] == event_schema()["required"]
    for name, each in event_property_schemas().items():
        assert schema["properties"][name]["description"] == each["description"]
    assert schema["properties"]["received_at"]["format"] == "date-time"
    for event in events():
        assert model.model_validate(event.to_dict()).model_dump(mode="json") == event.to_dict()


def events() -> list[Event]:
    """Events of every kind a source makes."""
    now = 1_763_720_102.125
    kinds: list[tuple[Value, str | None, Quality, str | None, str, dict[str, str]]] = [
        (64.8, "degC", Quality.GOOD, None, "modbus", {"site": "demo"}),
        (7, None, Quality.GOOD, None, "opcua", {}),
        (True, None, Quality.UNCERTAIN, "stale", "mqtt", {"a": "b", "ünï": "✓"}),
        ("open", None, Quality.GOOD, None, "amqp", {}),
        (None, "kW", Quality.BAD, "timeout after 3 attempts", "modbus", {}),
    ]
    made = [
        Event(id=new_event_id(), source="plant", point="boiler.t", value=value, unit=unit,
              quality=quality, reason=reason, ts=now - index, received_at=now,
              protocol=protocol, bridge="edge-01", tags=tags)
        for index, (value, unit, quality, reason, protocol, tags) in enumerate(kinds)]
    carried = [msgspec.structs.replace(event, body=event.to_json()) for event in made]
    read_back = [Event.from_json(event.to_json()) for event in made]
    return [*made, *carried, *read_back]


@pytest.mark.parametrize("event", events(), ids=lambda event: f"{event.value!r}")
def test_every_serialized_event_is_valid_against_the_schema(event: Event) -> None:
    schema = event_schema()
    body = json.loads(event.to_json())
    assert problems(body, schema) == []
    assert event.to_dict() == body
    assert list(body) == list(schema["properties"])
    assert body["ts"] == isoformat(event.ts)


def test_the_validator_finds_what_breaks_the_schema() -> None:
    schema = event_schema()
    good = events()[0].to_dict()
    assert problems({**good, "quality": "fine"}, schema)
    assert problems({**good, "ts": 1.5}, schema)
    assert problems({**good, "ts": "2024-06-10 08:00"}, schema)
    assert problems({**good, "value": [1]}, schema)
    assert problems({**good, "extra": 1}, schema)
    assert problems({**good, "tags": {"a": 1}}, schema)
    assert problems({**good, "id": "not-a-uuid"}, schema)
    assert problems({key: value for key, value in good.items() if key != "reason"}, schema)
