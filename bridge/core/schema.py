"""The JSON Schema of the normalized event, generated from its declaration (``Event``).

``bridge/core/event.schema.json`` is the same schema, committed so it can be read without
running anything; ``tests/core/test_event_schema.py`` fails when it is stale. Regenerate it with
``fieldbridge event-schema > bridge/core/event.schema.json``.
"""

from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import msgspec

from bridge.core.model import Event, EventJson

SCHEMA_ID = "https://fieldbridge.dev/schema/event/v1"
"""The ``$id`` of the published event schema (a new major version gets a new one)."""
SCHEMA_FILE = "event.schema.json"
"""The committed schema, in the ``bridge.core`` package."""

_SCHEMA_KEYS = ("$schema", "$id", "title", "description", "type", "additionalProperties",
                "required", "properties")
_PROPERTY_KEYS = ("type", "format", "enum", "additionalProperties", "description")
"""Keys first in these orders, any others after them as generated: the file reads top down."""


def event_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one published event, generated from ``Event``."""
    return json.loads(event_schema_text())  # type: ignore[no-any-return]


@functools.cache
def event_schema_text() -> str:
    """``event_schema()`` as the committed file holds it (and ``fieldbridge event-schema``
    prints it): indented by two, one newline at the end."""
    return json.dumps(_generate(), indent=2, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class EventField:
    """One field of the published event, for a model that describes the same JSON object
    (the API's response models)."""

    name: str
    type: Any
    """Its Python type in the JSON object: a timestamp is ``str``, the others as declared."""
    description: str
    json_schema_extra: dict[str, Any]
    """What the type does not say: ``format`` (``uuid``, ``date-time``), ``enum``."""


@functools.cache
def event_fields() -> tuple[EventField, ...]:
    """The published fields, in the order of the JSON object. Every one is present in every
    published event.

    A pydantic model of the event derives from them, e.g.
    ``create_model("EventModel", **{field.name: (field.type, Field(description=...,
    json_schema_extra=field.json_schema_extra)) for field in event_fields()})``.
    """
    hints = get_type_hints(EventJson, include_extras=True)
    fields = []
    for field in msgspec.structs.fields(EventJson):
        hint = hints[field.name]
        metadata = get_args(hint)[1:] if get_origin(hint) is Annotated else ()
        extra: dict[str, Any] = {}
        description = ""
        for meta in metadata:
            if isinstance(meta, msgspec.Meta):
                extra.update(meta.extra_json_schema or {})
                description = meta.description or description
        fields.append(EventField(
            name=field.encode_name,
            type=get_args(hint)[0] if metadata else hint,
            description=description,
            json_schema_extra=extra))
    return tuple(fields)


def event_property_schemas() -> dict[str, dict[str, Any]]:
    """Each published field's schema (type, format, enum, description), by name, in the order
    of the JSON object: what an API model of the event (or of a point's latest value) derives
    its fields' descriptions and formats from."""
    properties: dict[str, dict[str, Any]] = event_schema()["properties"]
    return properties


def event_descriptions() -> dict[str, str]:
    """Each published field's description, by name."""
    return {name: schema["description"]
            for name, schema in event_property_schemas().items() if "description" in schema}


def shipped_event_schema_text() -> str:
    """The committed ``event.schema.json``, as text."""
    return resources.files("bridge.core").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


def _generate() -> dict[str, Any]:
    generated = msgspec.json.schema(EventJson)
    definitions: dict[str, Any] = generated["$defs"]
    body = definitions[EventJson.__name__]
    properties = {name: _clean(_inline(schema, definitions))
                  for name, schema in body["properties"].items()}
    for field in msgspec.structs.fields(EventJson):
        kind = get_args(field.type)[0] if get_origin(field.type) is Annotated else field.type
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            # msgspec sorts an enum's values; the declared order reads better.
            properties[field.encode_name]["enum"] = [member.value for member in kind]
    summary = (Event.__doc__ or "").strip().split("\n\n")[0]
    return _ordered(_SCHEMA_KEYS, {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Fieldbridge normalized event",
        "description": " ".join(summary.split()),
        "type": "object",
        "additionalProperties": body.get("additionalProperties", True),
        # The encoder writes every field of every event (defaults too): each one is required
        # of a published event, even where reading a stored one back may default it.
        "required": list(properties),
        "properties": properties,
    })


def _inline(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$ref``s replaced by what they name (the field's own keys win),
    so each property reads on its own."""
    reference = schema.get("$ref")
    if reference is None:
        return schema
    named = dict(definitions[reference.removeprefix("#/$defs/")])
    named.pop("title", None)
    rest = {key: value for key, value in schema.items() if key != "$ref"}
    return {**named, **rest}


def _clean(schema: dict[str, Any]) -> dict[str, Any]:
    """One property's schema as a person writes it: ``anyOf`` of plain types as a ``type``
    list (``integer`` within ``number``), enums in their declared order, no defaults."""
    schema = {key: value for key, value in schema.items() if key != "default"}
    choices = schema.get("anyOf")
    if choices is not None and all(set(choice) == {"type"} for choice in choices):
        types = [choice["type"] for choice in choices]
        if "number" in types and "integer" in types:
            types.remove("integer")
        del schema["anyOf"]
        schema["type"] = types[0] if len(types) == 1 else types
    return _ordered(_PROPERTY_KEYS, schema)


def _ordered(keys: tuple[str, ...], schema: dict[str, Any]) -> dict[str, Any]:
    first = {key: schema[key] for key in keys if key in schema}
    return {**first, **{key: value for key, value in schema.items() if key not in first}}
