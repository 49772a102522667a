"""The message point models: how MQTT and AMQP points and sources are configured.

A ``MessagePoint`` names its value in a payload (format, JMESPath ``path``, ``each`` for a
list, binary type and order, timestamp); its name and tags may hold ``{placeholders}``
(``bridge.core.templates``). ``MessageSourceBase`` holds what every message source has
besides its connection; ``resolve_points`` turns its points into configured (template)
points. Each protocol narrows these to its own models.

May import: ``bridge.config``, ``bridge.core.codec`` and ``bridge.core.templates``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import jmespath
from jmespath.exceptions import JMESPathError
from pydantic import Field, field_validator, model_validator

from bridge.config.models import (
    PointBase,
    ReportSpec,
    ResolvedPoint,
    SourceBase,
    StrictModel,
    ValueType,
)
from bridge.config.yamlsource import KeyPath
from bridge.core.codec import ByteOrder, DataType, compile_bytes_decoder, value_type_of
from bridge.core.templates import NAME_TEMPLATE, POINT_ID_MAX, Template


class TimestampSpec(StrictModel):
    """Where a JSON payload carries the source time of its values."""

    path: str = Field(description="JMESPath to the timestamp, e.g. `ts` or `meta.time`.")
    format: Literal["iso8601", "epoch_s", "epoch_ms"] = Field(
        default="iso8601", description="`iso8601` text (no offset: UTC), or a number (or "
        "numeric text) of seconds (`epoch_s`) or milliseconds (`epoch_ms`) since 1970 UTC.")
    on: Literal["document", "item"] = Field(
        default="document", description="Evaluate `path` on the whole document, or on each "
        "list item of a point with `each`.")

    @field_validator("path")
    @classmethod
    def _compiles(cls, value: str) -> str:
        return _check_jmespath(value)


def _check_jmespath(expression: str) -> str:
    try:
        jmespath.compile(expression)
    except JMESPathError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"invalid JMESPath {expression!r}: {message}") from None
    return expression


Format = Literal["json", "text", "number", "binary"]


DeclaredType = Literal["number", "integer", "bool", "string"]
"""What the value of a JSON or text point must be."""

DECLARED_TYPES: tuple[str, ...] = ("number", "integer", "bool", "string")


class MessagePoint(PointBase):
    """A point read from message payloads; its name and tags may hold ``{placeholders}``."""

    name: str = Field(
        pattern=NAME_TEMPLATE, max_length=POINT_ID_MAX,
        description="Point name; may hold `{placeholders}` filled per message (topic or "
        "routing-key level names, `{item.FIELD}`/`{index}` with `each`, protocol metadata). "
        "The point id is the source `prefix` + the expanded name.")
    format: Format = Field(
        default="json", description="How the payload is read: `json`, `text` (UTF-8), "
        "`number` (text holding a number) or `binary`.")
    path: str | None = Field(
        default=None, description="JSON: JMESPath to the value; unset: the whole document.")
    each: str | None = Field(
        default=None, description="JSON: JMESPath to a list; the point repeats for each item, "
        "`path` is evaluated on the item, and the name needs `{item.FIELD}` or `{index}`.")
    type: DataType | DeclaredType | None = Field(
        default=None, description="Binary: the value type, as for Modbus registers. JSON and "
        "text: what the value must be, `number`, `integer`, `bool` or `string`; a value of "
        "another type is converted when it can be (`\"21.5\"` to 21.5 for `number`, `1` or "
        "`\"on\"` to true for `bool`, 21.5 to `\"21.5\"` for `string`), else the event is "
        "`bad` with the reason. Unset: the value as the payload has it.")
    order: ByteOrder = Field(
        default="ABCD", description="Binary: byte/word order (ABCD, DCBA, BADC, CDAB; 64-bit "
        "aliases ABCDEFGH, HGFEDCBA, BADCFEHG, GHEFCDAB).")
    byte_offset: int | None = Field(
        default=None, ge=0, description="Binary: where the value starts in a larger frame, in "
        "bytes. Unset: the payload is exactly the value.")
    length: int | None = Field(
        default=None, ge=1, description="Binary strings: length in bytes (unset: the rest).")
    timestamp: TimestampSpec | None = Field(
        default=None, description="JSON: where the payload carries the source time; unset: "
        "the source's `timestamp`, else the receive time.")

    @field_validator("path", "each")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        return None if value is None else _check_jmespath(value)

    @model_validator(mode="after")
    def _consistent(self) -> MessagePoint:
        given = self.model_fields_set
        if self.format != "json":
            for key in ("path", "each", "timestamp"):
                if key in given:
                    raise ValueError(f"`{key}` applies to json payloads, not {self.format}")
        if self.format == "binary":
            if self.type is None:
                raise ValueError("a binary point needs a `type`")
            if self.type in ("number", "integer"):
                raise ValueError(f"`type: {self.type}` is for json and text payloads; a binary "
                                 "point needs a register type such as float32 or int16")
            try:
                compile_bytes_decoder(self.register_type(), self.order, length=self.length)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        else:
            if self.type is not None and self.type not in DECLARED_TYPES:
                raise ValueError(f"`type: {self.type}` applies to binary payloads; a "
                                 f"{self.format} point may declare "
                                 f"{', '.join(DECLARED_TYPES)}")
            for key in ("order", "byte_offset", "length"):
                if key in given:
                    raise ValueError(f"`{key}` applies to binary payloads, not {self.format}")
        if self.writable:
            raise ValueError("message points cannot be written back")
        name = Template.parse(self.name)
        if self.each is not None and not any(
            variable == "index" or variable.startswith("item.") for variable in name.names
        ):
            raise ValueError("a point with `each` needs `{item.FIELD}` or `{index}` in its name, "
                             "else every item would be the same point")
        if self.timestamp is not None and self.timestamp.on == "item" and self.each is None:
            raise ValueError("`timestamp.on: item` needs `each`")
        for key, value in self.tags.items():
            tag = Template.parse(value)
            missing = [variable for variable in tag.names if variable not in name.names]
            if missing:
                raise ValueError(f"tag '{key}' uses {{{missing[0]}}}, which the point name does "
                                 "not: a point's tags are fixed by its id")
        return self

    def value_type(self) -> ValueType | None:
        """The declared ``type`` (a binary type decodes to a bool, an integer, a number or
        text), unless an enum or a scale decides."""
        mapped = super().value_type()
        declared = self.type
        if mapped is not None or declared is None:
            return mapped
        if declared == "number" or declared == "integer":
            return declared
        return value_type_of(declared)

    def register_type(self) -> DataType:
        """The binary value type (``type`` of a binary point, which the model checked)."""
        kind = self.type
        if kind is None or kind == "number" or kind == "integer":
            raise ValueError(f"point {self.name} has no binary value type")
        return kind

    def check_variables(self, known: Iterable[str], open_prefixes: Iterable[str] = ()) -> None:
        """Raise ``ValueError`` when the name uses a placeholder that can never be filled.

        ``known`` are exact variable names; ``open_prefixes`` are families such as
        ``headers.`` whose members are only known per message.
        """
        available = set(known)
        prefixes = tuple(open_prefixes)
        if self.each is not None:
            available.add("index")
            prefixes += ("item.",)
        for variable in Template.parse(self.name).names:
            if variable not in available and not variable.startswith(prefixes):
                choices = ", ".join(f"{{{name}}}" for name in sorted(available)) or "none"
                raise ValueError(f"placeholder {{{variable}}} is not known here (known: "
                                 f"{choices})")


class MessageSourceBase(SourceBase):
    """Settings every message-protocol source has besides its connection."""

    prefix: str = Field(
        default="", pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9_.:-]*)?$",
        description="Prefix of every point id of this source, e.g. `plant1.`.")
    report: ReportSpec | None = Field(
        default=None, description="Report-by-exception defaults for every point.")
    timestamp: TimestampSpec | None = Field(
        default=None, description="Default `timestamp` of this source's JSON points.")
    max_points: int = Field(
        default=10_000, ge=1, description="At most this many distinct point ids from templated "
        "names; messages for more are counted in `dropped_points`, not mapped.")

    points: Sequence[MessagePoint] = Field(
        min_length=1, description="The points; each protocol narrows this to its own model.")

    @field_validator("timestamp")
    @classmethod
    def _document_timestamp(cls, value: TimestampSpec | None) -> TimestampSpec | None:
        if value is not None and value.on == "item":
            raise ValueError("a source-wide timestamp is read from the document (`on: item` "
                             "is for points with `each`)")
        return value

    @field_validator("tags")
    @classmethod
    def _fixed_tags(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not Template.parse(text).is_static:
                raise ValueError(f"tag '{key}': source tags are fixed; put placeholders in "
                                 "point tags")
        return value


def resolve_points(source: MessageSourceBase, path: KeyPath) -> list[ResolvedPoint]:
    """The resolved (template) points of a message source, for ``ProtocolSpec.source_points``."""
    report = ReportSpec().merged(source.report)
    return [
        ResolvedPoint(
            id=f"{source.prefix}{point.name}",
            source=source.id,
            device=None,
            spec=point,
            tags={**source.tags, **point.tags},
            report=report.merged(point.report),
            path=(*path, "points", index),
        )
        for index, point in enumerate(source.points)
    ]

