"""Payload extraction shared by the message protocols (MQTT and AMQP).

A message point is a *template*: its name and tags may hold ``{placeholders}`` filled, per
message, from the topic or routing-key segments the point names (``sensors/{site}/{device}``),
from protocol metadata (``{topic}``, ``{routing_key}``, ``{headers.NAME}``) and, for points
that fan out over a JSON list with ``each``, from the list item (``{item.FIELD}``,
``{index}``). The configured (resolved) point id of a templated point is the template string
itself, e.g. ``{site}.{device}.temperature``; events carry the expanded id, e.g.
``north.boiler-1.temperature``. Each expanded id gets its own compiled ``PointProgram`` (its
own report-by-exception state) on first sight, up to ``max_points`` per source.

Payload formats: ``json`` (a JMESPath ``path`` picks the value; ``each`` fans out over a list),
``text``, ``number`` and ``binary`` (decoded by ``bridge.core.codec`` with the same type and byte
order vocabulary as Modbus registers).

What goes wrong, and what happens:

* the payload as a whole cannot be read (invalid JSON or UTF-8, not a number, wrong binary
  length), or no configured point matches the address: ``DecodeError`` naming the topic or
  routing key; the runtime counts the message as rejected and settles it upstream (AMQP:
  dead-lettered when configured);
* a ``path`` finds nothing, or finds an object or a list: a ``bad`` event for that point, with
  the reason, counted in the source's ``bad_values`` counter;
* a payload timestamp is missing or unreadable: the event carries the receive time, quality
  ``uncertain`` and the reason;
* a placeholder cannot be filled (a header is missing), an expanded id is not a valid point id,
  is already produced by another template, or would exceed ``max_points``: that point is
  skipped and counted in ``dropped_points``, with the reason in ``details.last_dropped_point``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jmespath
from jmespath.exceptions import JMESPathError
from pydantic import Field, SecretStr, field_validator, model_validator

from bridge.config.models import (
    PointBase,
    ReportSpec,
    ResolvedPoint,
    SourceBase,
    StrictModel,
    ValueType,
)
from bridge.config.yamlsource import KeyPath
from bridge.core.codec import (
    ByteOrder,
    DataType,
    compile_bytes_decoder,
    register_count,
    value_type_of,
)
from bridge.core.mapping import PointProgram
from bridge.core.model import Event, Quality, Reading, parse_timestamp
from bridge.core.status import EndpointStatus
from bridge.errors import DecodeError

logger = logging.getLogger(__name__)

POINT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
"""What an expanded point id must look like (the config's ``Identifier``)."""
POINT_ID_MAX = 200

NEW_POINTS_PER_MESSAGE = 1_000
"""Point ids one message may create from templates: a payload with a million list items
must not take all of ``max_points`` (they stay taken until the source restarts)."""

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[^{}\s]+)?$")
_SEGMENT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_TEMPLATE = r"^(?:[A-Za-z0-9_.:-]|\{[A-Za-z_][^{}\s]*\})+$"

_LATEST_TIMESTAMP = 253402300799.0
"""9999-12-31T23:59:59Z: later payload timestamps are taken as garbage."""


# --- templates --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """A string with ``{name}`` placeholders, parsed once."""

    text: str
    literals: tuple[str, ...]
    """The text around the placeholders; one more than ``names``."""
    names: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        """Parse ``text``; ``ValueError`` for an unbalanced brace or a bad placeholder name."""
        literals: list[str] = []
        names: list[str] = []
        position = 0
        for match in _PLACEHOLDER.finditer(text):
            literals.append(text[position:match.start()])
            name = match.group(1)
            if not _VARIABLE.match(name):
                raise ValueError(f"'{{{name}}}' is not a valid placeholder; expected a name such "
                                 "as {device}, {item.id} or {headers.site}")
            names.append(name)
            position = match.end()
        literals.append(text[position:])
        if any("{" in literal or "}" in literal for literal in literals):
            raise ValueError(f"unbalanced brace in {text!r}")
        return cls(text, tuple(literals), tuple(names))

    @property
    def is_static(self) -> bool:
        """Whether the template has no placeholders."""
        return not self.names

    def expand(self, variables: Mapping[str, str]) -> str:
        """The text with every placeholder filled; ``KeyError`` names a missing variable."""
        if not self.names:
            return self.text
        parts = [self.literals[0]]
        for name, literal in zip(self.names, self.literals[1:], strict=True):
            parts.append(variables[name])
            parts.append(literal)
        return "".join(parts)


# --- topic filters and routing-key patterns ---------------------------------------------------


@dataclass(frozen=True)
class AddressSyntax:
    """How a protocol spells hierarchical addresses and their wildcards."""

    separator: str
    single: str
    """Wildcard for exactly one level (MQTT ``+``, AMQP ``*``)."""
    multi: str
    """Wildcard for any number of levels (``#``)."""
    multi_last_only: bool
    """MQTT allows ``#`` only as the last level."""
    single_matches_empty: bool
    """MQTT ``+`` matches an empty level; AMQP ``*`` needs a word."""


MQTT_TOPIC = AddressSyntax("/", "+", "#", multi_last_only=True, single_matches_empty=True)
AMQP_ROUTING_KEY = AddressSyntax(".", "*", "#", multi_last_only=False, single_matches_empty=False)


@dataclass(frozen=True)
class AddressPattern:
    """A topic filter or routing-key pattern whose levels may be named: ``a/{site}/+/#``."""

    text: str
    subscription: str
    """The pattern with named levels replaced by the single-level wildcard."""
    names: tuple[str, ...]
    regex: re.Pattern[str] = field(repr=False)

    @classmethod
    def parse(cls, text: str, syntax: AddressSyntax) -> AddressPattern:
        """Compile ``text``; ``ValueError`` says what is wrong with it."""
        if not text:
            raise ValueError("an empty pattern matches nothing")
        levels = text.split(syntax.separator)
        names: list[str] = []
        subscription: list[str] = []
        pieces: list[str] = []
        separator = re.escape(syntax.separator)
        word = f"[^{separator}]" + ("*" if syntax.single_matches_empty else "+")
        skip_separator = False
        for index, level in enumerate(levels):
            first = index == 0
            lead = "" if first or skip_separator else separator
            skip_separator = False
            if level == syntax.multi:
                if syntax.multi_last_only and index != len(levels) - 1:
                    raise ValueError(f"'{syntax.multi}' must be the last level of {text!r}")
                if index > 0 and levels[index - 1] == syntax.multi:
                    continue
                subscription.append(level)
                if len(levels) == 1:
                    pieces.append(".*")
                elif first:
                    pieces.append(f"(?:.*{separator})?")
                    skip_separator = True
                else:
                    pieces.append(f"(?:{separator}.*)?")
                continue
            if level.startswith("{") and level.endswith("}"):
                name = level[1:-1]
                if not _SEGMENT_NAME.match(name):
                    raise ValueError(f"'{level}' in {text!r}: a level name is letters, digits "
                                     "and _, not starting with a digit")
                if name in names:
                    raise ValueError(f"level name '{name}' is used twice in {text!r}")
                names.append(name)
                subscription.append(syntax.single)
                pieces.append(f"{lead}(?P<{name}>{word})")
                continue
            if "{" in level or "}" in level:
                raise ValueError(f"'{level}' in {text!r}: a placeholder must fill a whole level")
            if syntax.multi in level or syntax.single in level:
                if level != syntax.single:
                    raise ValueError(f"'{level}' in {text!r}: a wildcard must fill a whole level")
                subscription.append(level)
                pieces.append(f"{lead}{word}")
                continue
            subscription.append(level)
            pieces.append(lead + re.escape(level))
        return cls(
            text=text,
            subscription=syntax.separator.join(subscription),
            names=tuple(names),
            regex=re.compile("".join(pieces)),
        )

    def match(self, address: str) -> dict[str, str] | None:
        """The named levels of ``address``, or ``None`` when it does not match."""
        found = self.regex.fullmatch(address)
        if found is None:
            return None
        return found.groupdict()


# --- configuration ----------------------------------------------------------------------------


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

_TRUE = frozenset({"true", "on", "yes", "1"})
_FALSE = frozenset({"false", "off", "no", "0"})


def convert(value: Any, declared: str) -> Any:
    """``value`` as the ``declared`` type; ``ValueError`` saying why when it is not one."""
    if declared == "string":
        if isinstance(value, bool):
            return "true" if value else "false"
        return value if isinstance(value, str) else json.dumps(value)
    if declared == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"expected a bool, got {_excerpt(repr(value))}")
    number: int | float
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a{'n integer' if declared == 'integer' else ' number'}, "
                         f"got {_excerpt(repr(value))}")
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"expected a{'n integer' if declared == 'integer' else ' number'}"
                                 f", got {_excerpt(repr(value))}") from None
    else:
        number = value
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {_excerpt(repr(value))}")
    if declared == "integer":
        if isinstance(number, float):
            if not number.is_integer():
                raise ValueError(f"expected an integer, got {_excerpt(repr(value))}")
            return int(number)
        return number
    return number


class MessagePoint(PointBase):
    """A point read from message payloads; its name and tags may hold ``{placeholders}``."""

    name: str = Field(
        pattern=_NAME_TEMPLATE, max_length=POINT_ID_MAX,
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


class ClientTls(StrictModel):
    """TLS towards a broker: CA to trust, and a client certificate if the broker asks for one."""

    ca: Path | None = Field(
        default=None, description="PEM CA bundle that signs the broker's certificate; unset: "
        "the system's trust store.")
    cert: Path | None = Field(default=None, description="PEM client certificate (chain).")
    key: Path | None = Field(
        default=None, description="PEM private key of `cert`; unset: in the `cert` file.")
    key_password: SecretStr | None = Field(
        default=None, description="Password of an encrypted `key`.")
    verify_hostname: bool = Field(
        default=True, description="Check that the certificate names the host connected to.")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> ClientTls:
        if (self.key is not None or self.key_password is not None) and self.cert is None:
            raise ValueError("`key` and `key_password` go with `cert`")
        return self

    def context(self) -> ssl.SSLContext:
        """An SSL context; reads files, so call it off the event loop.

        Raises ``OSError`` or ``ssl.SSLError`` when a file is missing or invalid.
        """
        context = ssl.create_default_context(
            cafile=str(self.ca) if self.ca is not None else None)
        context.check_hostname = self.verify_hostname
        if self.cert is not None:
            password = self.key_password.get_secret_value() if self.key_password else None
            context.load_cert_chain(str(self.cert), str(self.key) if self.key else None,
                                    password)
        return context


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


# --- the compiled mapping ---------------------------------------------------------------------


class _PointError(Exception):
    """One point of a message cannot be produced; the rest of the message can."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Payload:
    """One message body, parsed lazily and at most once per format."""

    __slots__ = ("_document", "_parsed", "_text", "raw", "where")

    def __init__(self, raw: Any, where: str) -> None:
        self.raw: bytes = raw.encode() if isinstance(raw, str) else bytes(raw)
        self.where = where
        self._text: str | None = None
        self._parsed = False
        self._document: Any = None

    def text(self) -> str:
        if self._text is None:
            try:
                self._text = self.raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DecodeError(f"{self.where}: payload is not UTF-8 text (byte {exc.start})"
                                  ) from None
        return self._text

    def json(self) -> Any:
        if not self._parsed:
            if not self.raw.strip():
                raise DecodeError(f"{self.where}: empty payload, expected JSON")
            try:
                self._document = json.loads(self.raw)
            except (ValueError, RecursionError) as exc:
                raise DecodeError(f"{self.where}: invalid JSON: {exc}") from None
            self._parsed = True
        return self._document

    def number(self) -> int | float:
        text = self.text().strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise DecodeError(f"{self.where}: payload {_excerpt(text)} is not a number"
                              ) from None


def _excerpt(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


@dataclass(slots=True)
class _Extracted:
    raw: Any
    problem: str | None = None
    ts: float | None = None
    ts_problem: str | None = None
    variables: Mapping[str, str] | None = None


def _timestamp(value: Any, form: str) -> float:
    """A payload timestamp to POSIX seconds; ``ValueError`` when it is not one."""
    if form == "iso8601":
        if not isinstance(value, str):
            raise ValueError(f"expected ISO 8601 text, got {_excerpt(repr(value))}")
        seconds = parse_timestamp(value)
    else:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected a number, got {_excerpt(repr(value))}")
        number = float(value)
        seconds = number / 1000.0 if form == "epoch_ms" else number
    if not math.isfinite(seconds) or not 0 <= seconds <= _LATEST_TIMESTAMP:
        raise ValueError(f"{_excerpt(repr(value))} is out of range")
    return seconds


def _variable_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    return None


class Route:
    """One configured message point, compiled: address pattern, extraction and templates."""

    def __init__(self, point: ResolvedPoint, pattern: AddressPattern,
                 timestamp: TimestampSpec | None = None) -> None:
        spec = point.spec
        if not isinstance(spec, MessagePoint):
            raise TypeError(f"point {point.id} is not a message point")
        self.point = point
        self.spec = spec
        self.pattern = pattern
        self.id_template = Template.parse(point.id)
        self.tag_templates = {key: Template.parse(value) for key, value in point.tags.items()}
        self.format = spec.format
        self.path = jmespath.compile(spec.path) if spec.path is not None else None
        self.each = jmespath.compile(spec.each) if spec.each is not None else None
        self.timestamp = spec.timestamp or (timestamp if spec.format == "json" else None)
        self.timestamp_path = (jmespath.compile(self.timestamp.path)
                               if self.timestamp is not None else None)
        self.declared = spec.type if spec.format != "binary" else None
        self.decode: Callable[[bytes], Any] | None = None
        self.size: int | None = None
        if spec.format == "binary":
            register_type = spec.register_type()
            self.decode = compile_bytes_decoder(register_type, spec.order, length=spec.length)
            if register_type == "bool":
                self.size = 1
            elif register_type == "string":
                self.size = spec.length
            else:
                self.size = 2 * register_count(register_type)

    def extract(self, payload: _Payload) -> list[_Extracted]:
        """The raw values this point finds in ``payload``.

        Raises ``DecodeError`` when the payload as a whole is unreadable and ``_PointError``
        when this point alone cannot be produced.
        """
        if self.format == "text":
            return [self._declared(_Extracted(payload.text().strip()))]
        if self.format == "number":
            return [self._declared(_Extracted(payload.number()))]
        if self.format == "binary":
            return [_Extracted(self._binary(payload))]
        document = payload.json()
        if self.each is None:
            return [self._declared(self._json_value(document, document, None))]
        items = self.each.search(document)
        if not isinstance(items, list):
            found = "nothing" if items is None else f"a {type(items).__name__}"
            raise _PointError(f"`each` {self.spec.each!r} found {found}, expected a list")
        extracted = []
        for index, item in enumerate(items):
            variables = {"index": str(index)}
            if isinstance(item, dict):
                for key, value in item.items():
                    text = _variable_text(value)
                    if text is not None:
                        variables[f"item.{key}"] = text
            extracted.append(self._declared(self._json_value(document, item, variables)))
        return extracted

    def _declared(self, extracted: _Extracted) -> _Extracted:
        """``extracted`` converted to the point's declared ``type``, or with the problem."""
        if self.declared is None or extracted.problem is not None:
            return extracted
        try:
            extracted.raw = convert(extracted.raw, self.declared)
        except ValueError as exc:
            extracted.problem = str(exc)
        return extracted

    def _binary(self, payload: _Payload) -> Any:
        assert self.decode is not None
        raw = payload.raw
        offset = self.spec.byte_offset
        if offset is not None:
            end = len(raw) if self.size is None else offset + self.size
            if end > len(raw) or offset >= len(raw):
                raise DecodeError(f"{payload.where}: binary payload of {len(raw)} bytes is too "
                                  f"short for {self.spec.type} at offset {offset}")
            raw = raw[offset:end]
        try:
            return self.decode(raw)
        except DecodeError as exc:
            raise DecodeError(f"{payload.where}: binary payload of {len(payload.raw)} bytes: "
                              f"{exc.reason}") from None

    def _json_value(self, document: Any, item: Any,
                    variables: Mapping[str, str] | None) -> _Extracted:
        value = self.path.search(item) if self.path is not None else item
        extracted = _Extracted(value, variables=variables)
        if value is None:
            extracted.problem = (f"path {self.spec.path!r} found nothing"
                                 if self.path is not None else "the value is null")
        elif isinstance(value, dict | list):
            kind = "an object" if isinstance(value, dict) else "a list"
            extracted.problem = (f"path {self.spec.path!r} found {kind}, expected a value"
                                 if self.path is not None else f"the payload is {kind}; give "
                                 "a `path` to the value")
        if self.timestamp is not None and self.timestamp_path is not None:
            scope = item if self.timestamp.on == "item" else document
            stamp = self.timestamp_path.search(scope)
            if stamp is None:
                extracted.ts_problem = (f"timestamp {self.timestamp.path!r} not found; "
                                        "receive time used")
            else:
                try:
                    extracted.ts = _timestamp(stamp, self.timestamp.format)
                except ValueError as exc:
                    extracted.ts_problem = (f"timestamp {self.timestamp.path!r} unreadable "
                                            f"({exc}); receive time used")
        return extracted


Variables = Callable[[Reading], Mapping[str, str]]
"""Protocol metadata of a reading as placeholder values (``topic``, ``headers.NAME``)."""


def _no_variables(reading: Reading) -> Mapping[str, str]:
    return {}


class MessageMapper:
    """The compiled mapping of one message source: payloads in, events out."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        protocol: str,
        bridge_id: str,
        address_label: str,
        max_points: int,
        variables: Variables = _no_variables,
    ) -> None:
        self.routes = list(routes)
        self.protocol = protocol
        self.bridge_id = bridge_id
        self.address_label = address_label
        """How the address is named in reasons: ``topic`` or ``routing key``."""
        self.max_points = max_points
        self._variables = variables
        self._own_counters: Counter[str] = Counter()
        self._own_details: dict[str, Any] = {}
        self._status: EndpointStatus | None = None
        self._programs: dict[str, tuple[Route, PointProgram]] = {}
        self._dynamic = 0
        self._created = 0
        """Point ids created by the message being mapped."""
        self._cap_logged = False
        for route in self.routes:
            if route.id_template.is_static:
                self._programs[route.point.id] = (route, self._compile(route, route.point.id,
                                                                       dict(route.point.tags)))

    def attach(self, status: EndpointStatus) -> None:
        """Report into ``status`` from now on (called by the source when it starts); what was
        counted before is carried over."""
        if status is self._status:
            return
        status.counters.update(self.counters)
        status.details.update(self.details)
        self._status = status

    @property
    def counters(self) -> Counter[str]:
        """What the mapping counted: the attached status's counters, or its own until then."""
        return self._own_counters if self._status is None else self._status.counters

    @property
    def details(self) -> dict[str, Any]:
        """The last bad value and dropped point: on the attached status, or its own until then."""
        return self._own_details if self._status is None else self._status.details

    @property
    def point_count(self) -> int:
        """Distinct point ids compiled so far."""
        return len(self._programs)

    def map(self, reading: Reading) -> list[Event]:
        """Events for one message; ``DecodeError`` when the message cannot be mapped at all."""
        address = str(reading.address)
        where = f"{self.address_label} {address}"
        matched = []
        for route in self.routes:
            segments = route.pattern.match(address)
            if segments is not None:
                matched.append((route, segments))
        if not matched:
            raise DecodeError(f"{where}: no configured point matches")
        payload = _Payload(reading.value, where)
        metadata = self._variables(reading)
        received_at = reading.received_at
        message_id = reading.message_id
        events: list[Event] = []
        self._created = 0
        for route, segments in matched:
            try:
                extracted = route.extract(payload)
            except _PointError as problem:
                self._drop(route.point.id, address, problem.reason)
                continue
            for item in extracted:
                program = self._program(route, metadata, segments, item.variables, address)
                if program is None:
                    continue
                ts = item.ts if item.ts is not None else reading.ts
                if item.problem is not None:
                    self.counters["bad_values"] += 1
                    self.details["last_bad_value"] = {
                        "point": program.point_id, "address": address, "reason": item.problem,
                        "at": time.time()}
                    event = program.bad(item.problem, received_at=received_at, ts=ts,
                                        message_id=message_id)
                elif item.ts_problem is not None:
                    event = program.produce(item.raw, received_at=received_at, ts=ts,
                                            quality=Quality.UNCERTAIN, reason=item.ts_problem,
                                            message_id=message_id)
                else:
                    event = program.produce(item.raw, received_at=received_at, ts=ts,
                                            quality=reading.quality, reason=reading.reason,
                                            message_id=message_id)
                if event is not None:
                    events.append(event)
        return events

    def _program(
        self,
        route: Route,
        metadata: Mapping[str, str],
        segments: Mapping[str, str],
        item: Mapping[str, str] | None,
        address: str,
    ) -> PointProgram | None:
        if route.id_template.is_static:
            return self._programs[route.point.id][1]
        variables = {**metadata, **segments, **(item or {})}
        try:
            point_id = route.id_template.expand(variables)
            tags = {key: template.expand(variables)
                    for key, template in route.tag_templates.items()}
        except KeyError as exc:
            self._drop(route.point.id, address, f"no value for placeholder {{{exc.args[0]}}}")
            return None
        known = self._programs.get(point_id)
        if known is not None:
            owner, program = known
            if owner is not route:
                self._drop(route.point.id, address, f"point id '{point_id}' is already "
                           f"produced by point '{owner.point.id}'")
                return None
            return program
        if len(point_id) > POINT_ID_MAX or not POINT_ID.match(point_id):
            self._drop(route.point.id, address, f"'{_excerpt(point_id)}' is not a valid point "
                       "id (letters, digits, _ . : - only)")
            return None
        if self._created >= NEW_POINTS_PER_MESSAGE:
            self._drop(route.point.id, address, f"more than {NEW_POINTS_PER_MESSAGE:,} new "
                       "point ids in one message")
            return None
        if self._dynamic >= self.max_points:
            if not self._cap_logged:
                self._cap_logged = True
                logger.warning("%s source %s: more than %d point ids from templates; further "
                               "ones are dropped and counted", self.protocol,
                               route.point.source, self.max_points)
            self._drop(route.point.id, address, f"more than max_points={self.max_points} "
                       "point ids")
            return None
        program = self._compile(route, point_id, tags)
        self._programs[point_id] = (route, program)
        self._dynamic += 1
        self._created += 1
        return program

    def _compile(self, route: Route, point_id: str, tags: dict[str, str]) -> PointProgram:
        point = route.point
        resolved = ResolvedPoint(id=point_id, source=point.source, device=point.device,
                                 spec=point.spec, tags=tags, report=point.report, path=point.path,
                                 max_value_bytes=point.max_value_bytes)
        return PointProgram(resolved, protocol=self.protocol, bridge_id=self.bridge_id)

    def _drop(self, template: str, address: str, reason: str) -> None:
        self.counters["dropped_points"] += 1
        self.details["last_dropped_point"] = {
            "point": template, "address": address, "reason": reason, "at": time.time()}
