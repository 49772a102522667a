"""MQTT discovery: sample a broker's topics for a while and write templated points.

Topics are grouped by shape: the same number of levels and the same payload structure (the
same JSON leaves, or the same non-JSON format). Within a group, the levels whose value
differs between topics become named levels (``{level3}``), so one point serves every device
that publishes that way. Each JSON leaf becomes a point with its JMESPath and type; a number
or text that is not JSON becomes a ``number`` or ``text`` point. Lists (which need ``each``),
nulls and binary payloads are reported, with what was seen, not guessed at.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiomqtt
from pydantic import Field, field_validator

from bridge.config.models import Duration, Identifier
from bridge.core.discovery import (
    DiscoveredItem,
    Discovery,
    DiscoveryContext,
    DiscoveryRequest,
    DiscoverySpec,
    UniqueNames,
    render_yaml,
    sanitize_name,
    secret_reference,
)
from bridge.core.templates import MQTT_TOPIC, AddressPattern
from protocols.mqtt.config import MqttBrokerSettings
from protocols.mqtt.connection import client_arguments, connector_error, subscribe
from protocols.mqtt.source import PROTOCOL

logger = logging.getLogger(__name__)

MAX_TOPICS = 10_000
"""Distinct topics kept; later ones are counted, not analysed."""
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LeafType = Literal["number", "bool", "string"]


class MqttDiscoverRequest(MqttBrokerSettings, DiscoveryRequest):
    """What to sample, and how to connect: the source's own connection settings."""

    filter: str = Field(default="#", description="Topic filter to sample, e.g. `sensors/#`.")
    seconds: Duration = Field(default=10.0, gt=0, le=3600,
                              description="How long to sample.")
    messages: int | None = Field(
        default=None, ge=1, description="Stop once this many messages arrived (before "
        "`seconds` when there are many).")
    source_id: Identifier = Field(default="mqtt", description="The id of the generated "
                                  "source.")

    @field_validator("filter")
    @classmethod
    def _filter(cls, value: str) -> str:
        if "{" in value:
            raise ValueError("a plain topic filter: `+` and `#` wildcards, no {names}")
        AddressPattern.parse(value, MQTT_TOPIC)
        return value


def _target(text: str) -> dict[str, Any]:
    host, colon, port = text.rpartition(":")
    if colon and port.isdigit() and (not host.count(":") or host.startswith("[")):
        return {"host": host.strip("[]"), "port": port}
    return {"host": text.strip("[]")}


@dataclass
class _Leaf:
    path: str | None
    """JMESPath; ``None``: the whole document."""
    type: LeafType
    example: Any


@dataclass
class _Topic:
    """What one topic carried."""

    topic: str
    messages: int = 0
    retained: bool = False
    format: Literal["json", "number", "text", "binary"] = "json"
    leaves: dict[str | None, _Leaf] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seen: str = ""
    """An excerpt of the last payload, for the report."""

    def signature(self) -> tuple[Any, ...]:
        return (len(self.topic.split("/")), self.format,
                tuple(sorted((str(path), leaf.type) for path, leaf in self.leaves.items())))


def jmespath_of(keys: list[str]) -> str:
    """A JMESPath selecting nested keys, quoting those that are not identifiers."""
    return ".".join(key if _IDENTIFIER.match(key) else json.dumps(key) for key in keys)


def _walk(document: Any, keys: list[str]) -> Iterator[tuple[list[str], Any]]:
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _walk(value, [*keys, str(key)])
    else:
        yield keys, document


def _excerpt(payload: bytes) -> str:
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return f"{len(payload)} bytes: {payload[:16].hex(' ')}{' …' if len(payload) > 16 else ''}"
    return repr(text[:60] + ("…" if len(text) > 60 else ""))


def analyse(entry: _Topic, payload: bytes) -> None:
    """Note what ``payload`` holds on ``entry``'s topic."""
    entry.messages += 1
    entry.seen = _excerpt(payload)
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        entry.format = "binary"
        return
    try:
        document = json.loads(text)
    except ValueError:
        try:
            float(text)
        except ValueError:
            entry.format = "text"
        else:
            entry.format = "number"
        return
    entry.format = "json"
    for keys, value in _walk(document, []):
        path = jmespath_of(keys) if keys else None
        shown = path or "the document"
        if isinstance(value, list):
            note = (f"{shown} is a list ({len(value)} items): map it with `each` by hand")
            if note not in entry.notes:
                entry.notes.append(note)
            continue
        if value is None:
            continue
        kind: LeafType = "bool" if isinstance(value, bool) else (
            "number" if isinstance(value, int | float) else "string")
        known = entry.leaves.get(path)
        if known is not None and known.type != kind:
            known.type = "string"
        elif known is None:
            entry.leaves[path] = _Leaf(path, kind, value)


@dataclass
class _Group:
    """Topics of one shape: the same levels count and payload structure."""

    topics: list[_Topic]

    def template(self) -> tuple[str, str]:
        """The topic filter with named levels, and the point-name stem."""
        split = [topic.topic.split("/") for topic in self.topics]
        levels: list[str] = []
        stem: list[str] = []
        for index, values in enumerate(zip(*split, strict=True)):
            if len(set(values)) > 1:
                name = f"level{index + 1}"
                levels.append(f"{{{name}}}")
                stem.append(f"{{{name}}}")
            else:
                levels.append(values[0])
                cleaned = sanitize_name(values[0], fallback="")
                if cleaned:
                    stem.append(cleaned)
        return "/".join(levels), ".".join(stem) or "topic"


async def _sample(request: MqttDiscoverRequest, context: DiscoveryContext
                  ) -> tuple[dict[str, _Topic], int, str | None]:
    endpoint = request.endpoint()
    arguments = await client_arguments(request, client_id=None, logger=logger)
    topics: dict[str, _Topic] = {}
    ignored = 0
    total = 0
    seconds = request.seconds
    remaining = context.budget.remaining()
    stopped = None
    if remaining is not None and remaining < seconds:
        seconds = remaining
        stopped = f"sampled {seconds:g} s instead of {request.seconds:g} s (the time bound)"
    try:
        async with aiomqtt.Client(**arguments) as client:
            await subscribe(client, [(request.filter, 0)], request)
            try:
                async with asyncio.timeout(seconds):
                    async for message in client.messages:
                        total += 1
                        name = message.topic.value
                        entry = topics.get(name)
                        if entry is None:
                            if len(topics) >= MAX_TOPICS:
                                ignored += 1
                                continue
                            entry = topics[name] = _Topic(name)
                        entry.retained = entry.retained or message.retain
                        payload = message.payload
                        analyse(entry, payload if isinstance(payload, bytes)
                                else str(payload).encode())
                        context.progress.update(total, request.messages,
                                                f"messages on {len(topics)} topics")
                        if request.messages is not None and total >= request.messages:
                            break
            except TimeoutError:
                pass  # the sampling time is over
    except aiomqtt.MqttError as exc:
        raise connector_error(endpoint, exc) from exc
    if ignored:
        stopped = f"{ignored} messages on topics beyond the first {MAX_TOPICS} were not analysed"
    return topics, total, stopped


def _groups(topics: dict[str, _Topic]) -> list[_Group]:
    by_shape: dict[tuple[Any, ...], list[_Topic]] = {}
    for entry in sorted(topics.values(), key=lambda entry: entry.topic):
        if entry.format == "binary" or (entry.format == "json" and not entry.leaves):
            continue
        by_shape.setdefault(entry.signature(), []).append(entry)
    return [_Group(members) for members in by_shape.values()]


async def discover(request: MqttDiscoverRequest, context: DiscoveryContext) -> Discovery:
    """Sample the broker and write a source with templated points.

    Raises ``ConnectorError`` when the broker cannot be reached or refuses the client.
    """
    topics, total, stopped = await _sample(request, context)
    names = UniqueNames()
    points: list[dict[str, Any]] = []
    items: list[DiscoveredItem] = []
    for group in _groups(topics):
        topic, stem = group.template()
        first = group.topics[0]
        leaves = first.leaves.values() if first.format == "json" else [
            _Leaf(None, "number" if first.format == "number" else "string", first.seen)]
        for leaf in leaves:
            suffix = sanitize_name(leaf.path.replace('"', ""), fallback="value") \
                if leaf.path else ""
            name = names.take(f"{stem}.{suffix}" if suffix else stem)
            point: dict[str, Any] = {"name": name, "topic": topic}
            if first.format != "json":
                point["format"] = first.format
            if leaf.path is not None:
                point["path"] = leaf.path
            points.append(point)
            items.append(DiscoveredItem(
                name=name, address=topic, type=leaf.type if first.format == "json" else
                first.format, extra={
                    "format": first.format, "path": leaf.path,
                    "topics": len(group.topics),
                    "messages": sum(entry.messages for entry in group.topics),
                    "example": leaf.example}))
    return _result(request, context, topics, total, points, items, stopped)


def _result(request: MqttDiscoverRequest, context: DiscoveryContext, topics: dict[str, _Topic],
            total: int, points: list[dict[str, Any]], items: list[DiscoveredItem],
            stopped: str | None) -> Discovery:
    moment = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = [
        f"Generated by {context.command or 'fieldbridge discover mqtt'} on {moment}",
        f"from {request.endpoint()}: filter {request.filter!r}, {total} messages on "
        f"{len(topics)} topics in at most {request.seconds:g} s.",
        "Levels that differ between topics of one shape became named levels ({levelN}): "
        "rename them",
        "(in both `topic` and `name`) to what they mean, e.g. {site} or {device}. Units are "
        "not in",
        "payloads: add `unit` where you know it.",
    ]
    warnings: list[str] = []
    report: list[str] = []
    for entry in sorted(topics.values(), key=lambda entry: entry.topic):
        if entry.format == "binary":
            report.append(f"{entry.topic}: binary payload ({entry.seen}); map it with "
                          "`format: binary` and a `type` by hand")
        elif entry.format in ("text", "number"):
            report.append(f"{entry.topic}: not JSON ({entry.format}, e.g. {entry.seen})")
        elif not entry.leaves:
            report.append(f"{entry.topic}: JSON without values to map (e.g. {entry.seen})")
        report.extend(f"{entry.topic}: {note}" for note in entry.notes)
    warnings.extend(line for line in report if "binary" in line or "not JSON" in line)
    if stopped is not None:
        warnings.append(stopped)
    if report:
        header.append("")
        header.append("Seen, and how it was taken:")
        header.extend(f"  {line}" for line in report)
    if not topics:
        header.append("No message arrived: publishers may be idle; sample longer (--seconds) "
                      "or widen --filter.")
    partial = stopped is not None
    if partial:
        header.insert(0, f"PARTIAL: {stopped}")
    document: dict[str, Any] = {}
    if points:
        section: dict[str, Any] = {"id": request.source_id, "protocol": PROTOCOL,
                                   "host": request.host}
        if request.port is not None:
            section["port"] = request.port
        if request.mqtt_version != "3.1.1":
            section["mqtt_version"] = request.mqtt_version
        if request.username is not None:
            section["username"] = request.username
        if request.password is not None:
            section["password"] = secret_reference("MQTT_PASSWORD")
            header.append("Set MQTT_PASSWORD in the environment (or write ${file:/path}).")
        if request.tls is not None:
            tls = request.tls.model_dump(mode="json", exclude_defaults=True)
            if "key_password" in tls:
                tls["key_password"] = secret_reference("MQTT_KEY_PASSWORD")
            section["tls"] = tls
        section["points"] = points
        document["sources"] = [section]
    context.progress.finish(f"{len(points)} points from {len(topics)} topics"
                            + (" (partial)" if partial else ""))
    return Discovery(protocol=PROTOCOL, yaml=render_yaml(document, header=header),
                     items=items, partial=partial, warnings=warnings)



SPEC = DiscoverySpec(
    request_model=MqttDiscoverRequest,
    run=discover,
    target=_target,
    target_name="HOST[:PORT]",
    summary="sample an MQTT broker's topics and write templated points for their payloads",
)
