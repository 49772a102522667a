"""Configuration of Rockwell Logix (EtherNet/IP, CIP) sources and their points.

A point reads a tag by its symbolic name (``Speed``, ``Program:Main.Speed``, ``Temps[3]``,
``Motor.Status.Running``) or, for an EtherNet/IP device that is not a Logix controller, one
CIP attribute by class, instance and attribute. An array slice (``count``) and a structure
(``members``) are flattened into one point per element or member when the source's points
are resolved (``protocols.logix.points``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from bridge.config.models import (
    Duration,
    Identifier,
    PlainText,
    PointBase,
    SourceBase,
    StrictModel,
    ValueType,
)
from bridge.config.validation import field_error

LogixType = Literal["BOOL", "SINT", "INT", "DINT", "LINT", "REAL", "LREAL", "STRING"]
"""The atomic types a point reads."""

PointType = Literal["BOOL", "SINT", "INT", "DINT", "LINT", "REAL", "LREAL", "STRING", "STRUCT"]
"""A point's type: an atomic one, or STRUCT for a structure whose members become points."""

INTEGER_TYPES: dict[str, tuple[int, int]] = {
    "SINT": (-(2**7), 2**7 - 1),
    "INT": (-(2**15), 2**15 - 1),
    "DINT": (-(2**31), 2**31 - 1),
    "LINT": (-(2**63), 2**63 - 1),
}
"""The integer types and their ranges."""

TYPE_SIZES: dict[str, int] = {"BOOL": 1, "SINT": 1, "INT": 2, "DINT": 4, "LINT": 8,
                              "REAL": 4, "LREAL": 8, "STRING": 88}
"""Bytes one value takes in a reply (a Logix STRING: 4-byte length and 82 characters, plus
its structure handle and padding)."""

MAX_ELEMENTS = 1000
"""The longest array slice one point may flatten."""

PORT = 44818
"""The EtherNet/IP TCP port."""

_SEGMENT = r"[A-Za-z_][A-Za-z0-9_]*(?:\[\d+(?:,\d+){0,2}\])?"
TAG_PATTERN = re.compile(
    rf"^(?:Program:[A-Za-z_][A-Za-z0-9_]*\.)?{_SEGMENT}(?:\.{_SEGMENT})*(?:\.\d{{1,2}})?$")
"""A symbolic tag path: an optional ``Program:<name>.`` scope, names with optional
subscripts joined by dots, and an optional bit number at the end."""

_LAST_INDEX = re.compile(r"^(?P<base>.*)\[(?P<index>\d+)\]$")
_ROUTE = re.compile(r"^\d+/\d+(?:/(?:\d+|\d{1,3}(?:\.\d{1,3}){3})/\d+)*$")


def split_element(tag: str) -> tuple[str, int] | None:
    """``("Temps", 3)`` for ``Temps[3]``; ``None`` when the tag does not end in a single
    subscript."""
    match = _LAST_INDEX.match(tag)
    if match is None or "," in match.group("index"):
        return None
    return match.group("base"), int(match.group("index"))


class CipAttribute(StrictModel):
    """One attribute of a CIP object: class, instance and attribute numbers."""

    class_code: int = Field(alias="class", ge=1, le=0xFFFF,
                            description="The object's class, written `class` (1: Identity, 0xF5: "
                            "TCP/IP ...).")
    instance: int = Field(default=1, ge=0, le=0xFFFF, description="The instance; 0 is the "
                          "class itself.")
    attribute: int = Field(ge=1, le=0xFFFF, description="The attribute number.")

    def __str__(self) -> str:
        return f"cip:{self.class_code:#x}/{self.instance}/{self.attribute}"


class StructMember(StrictModel):
    """One member of a structure (UDT) point: flattened into a point of its own."""

    name: Identifier = Field(description="The member's name as the controller spells it; "
                             "dotted for a member of a nested structure (`Status.Running`).")
    type: LogixType = Field(description="The member's atomic type.")
    unit: PlainText | None = Field(default=None, description="Engineering unit.")


class LogixPoint(PointBase):
    """One value: a Logix tag, or a CIP attribute of another EtherNet/IP device."""

    tag: str | None = Field(
        default=None, description="Symbolic tag path: `Speed`, `Program:Main.Speed`, "
        "`Temps[3]`, `Motor.Speed`, `Flags.5` (bit 5 of an integer tag).")
    cip: CipAttribute | None = Field(
        default=None, description="Read one CIP attribute instead of a tag: "
        "`{class: 1, instance: 1, attribute: 7}`.")
    type: PointType = Field(
        description="BOOL, SINT, INT, DINT, LINT, REAL, LREAL or STRING; STRUCT for a whole "
        "structure (UDT) tag whose `members` become points.")
    count: int | None = Field(
        default=None, ge=1, le=MAX_ELEMENTS,
        description="Read this many array elements from the one `tag` names (`Temps[0]`); "
        "each becomes a point `<name>.<index>`.")
    members: Sequence[StructMember] | None = Field(
        default=None, description="The members of a STRUCT tag to read; each becomes a point "
        "`<name>.<member>`.")

    @property
    def value_kind(self) -> Literal["bool", "number", "string"]:
        """What a value of this point is."""
        if self.type == "BOOL":
            return "bool"
        return "string" if self.type == "STRING" else "number"

    def value_type(self) -> ValueType | None:
        """What the type gives, unless an enum or a scale decides."""
        mapped = super().value_type()
        if mapped is not None:
            return mapped
        if self.type == "BOOL":
            return "bool"
        if self.type == "STRING":
            return "string"
        return "integer" if self.type in INTEGER_TYPES else "number"

    @model_validator(mode="after")
    def _consistent(self) -> LogixPoint:
        if (self.tag is None) == (self.cip is None):
            raise field_error("tag", "give `tag` (a symbolic tag) or `cip` (class, instance, "
                              "attribute), exactly one")
        if self.tag is not None and not TAG_PATTERN.match(self.tag):
            raise field_error("tag", "expected a tag path such as `Speed`, `Program:Main.Speed`, "
                              "`Temps[3]` or `Motor.Speed`", self.tag)
        if self.type == "STRUCT":
            if self.tag is None:
                raise field_error("type", "a CIP attribute has an atomic type, not STRUCT",
                                  self.type)
            if not self.members:
                raise field_error("members", "a STRUCT point needs `members` (each becomes "
                                  "a point)")
            if self.writable:
                raise field_error("writable", "write a STRUCT's members one by one: declare "
                                  "them as points of their own", self.writable)
        elif self.members is not None:
            raise field_error("members", "`members` apply to type STRUCT", self.type)
        if self.count is not None:
            if self.tag is None or split_element(self.tag) is None:
                raise field_error("count", "`count` needs a tag ending in the first element "
                                  "to read, such as `Temps[0]`", self.count)
            if self.type == "STRUCT":
                raise field_error("count", "an array of structures is read one element at "
                                  "a time: declare each element as a STRUCT point", self.count)
        if self.cip is not None and self.writable:
            raise field_error("writable", "CIP attribute points are read-only", self.writable)
        if self.writable and self.scale == 0.0:
            raise field_error("scale", "a writable point needs a non-zero scale", self.scale)
        if self.value_kind != "number" and self.enum is None and (
            self.scale != 1.0 or self.offset != 0.0 or self.round is not None
        ):
            raise field_error("scale", f"scale, offset and round apply to numbers, not to "
                              f"a {self.type}", self.scale)
        return self


class LogixSourceConfig(SourceBase):
    """One EtherNet/IP connection to a Logix controller, or another CIP device, and its points.
    """

    protocol: Literal["logix"] = Field(description="Always `logix`.")
    host: PlainText = Field(description="Host name or address of the controller's (or "
                            "the device's) Ethernet module.")
    port: int = Field(default=PORT, ge=1, le=65535, description="EtherNet/IP TCP port.")
    slot: int = Field(default=0, ge=0, le=31, description="Backplane slot of the "
                      "controller behind the Ethernet module (0 for CompactLogix).")
    route: PlainText | None = Field(
        default=None, description="A full CIP route path instead of `slot`, as port/link "
        "pairs: `1/0` (backplane, slot 0), `1/2/2/10.0.0.5/1/0` (through a second Ethernet "
        "module at slot 2 to a controller at 10.0.0.5, slot 0).")
    controller: bool = Field(
        default=True, description="Whether the target is a Logix controller (tags). "
        "`false` for another EtherNet/IP device: only `cip` points, no forward open.")
    connection_size: int = Field(
        default=4002, ge=500, le=4002, description="The connection size asked for at "
        "forward open, in bytes (a controller that refuses it gets 500); the size granted is "
        "shown in the inventory and bounds each multi-service request.")
    upload_tags: bool = Field(
        default=True, description="Read the controller's tag database at connect: tags are "
        "then read with the controller's own definitions (structure members and bits need "
        "them). `false`, or a controller that refuses the upload, reads atomic tags and "
        "arrays with the types configured here.")
    timeout: Duration = Field(default=2.0, gt=0, le=60,
                              description="Wait this long for each answer.")
    interval: Duration = Field(default=1.0, gt=0, description="Poll interval.")
    point_prefix: PlainText = Field(
        default="", description="Prefix of the point ids, e.g. `line1.`.")
    points: Sequence[LogixPoint] = Field(default_factory=list, description="The points.")

    @model_validator(mode="after")
    def _connection(self) -> LogixSourceConfig:
        if self.route is not None:
            if "slot" in self.model_fields_set:
                raise field_error("route", "give `slot` or `route`, not both", self.route)
            if not _ROUTE.match(self.route):
                raise field_error("route", "expected port/link pairs such as `1/0` or "
                                  "`1/2/2/10.0.0.5/1/0`", self.route)
        if not self.controller:
            for index, point in enumerate(self.points):
                if point.tag is not None:
                    raise field_error(
                        ("points", index, "tag"), "a device that is not a controller has "
                        "no tags (`controller: false`): read it with `cip`", point.tag)
        return self

    @property
    def route_path(self) -> str:
        """The CIP route from the Ethernet module to the target."""
        return self.route if self.route is not None else f"1/{self.slot}"

    def endpoint(self) -> str:
        """``enip://host:44818/1/0``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if not self.controller:
            return f"enip://{host}:{self.port}"
        return f"enip://{host}:{self.port}/{self.route_path}"
