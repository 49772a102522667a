"""Configuration of BACnet/IP sources: the local port, the devices by instance, their points.

A device is named by its device instance, the identity BACnet keeps when a controller is
re-addressed; an IP address is only a hint where to ask first. A point names an object
(``analog-value,1``, ``multi-state-output,3``, or any type by number, ``130,7``) and a
property (``present-value`` unless told). Object types and property names are checked
against the BACnet standard at load; whether the device has them is known only once it
answers.
"""

from __future__ import annotations

import builtins
import ipaddress
from collections.abc import Sequence
from typing import Literal

from bacpypes3.primitivedata import ObjectIdentifier, ObjectType, PropertyIdentifier
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from bridge.config.models import (
    DeviceBase,
    DeviceSourceBase,
    Duration,
    PlainText,
    PointBase,
    ProfileBase,
    SourceBase,
    ValueType,
)

PROTOCOL = "bacnet"

DEFAULT_PORT = 47808
"""BACnet/IP's UDP port (0xBAC0)."""

MAX_INSTANCE = 4194302
"""The highest device or object instance; 4194303 is the wildcard."""

MULTI_STATE = frozenset({"multi-state-input", "multi-state-output", "multi-state-value"})
BINARY = frozenset({"binary-input", "binary-output", "binary-value"})
COMMANDABLE = frozenset({"analog-output", "binary-output", "multi-state-output"})
"""Object types whose present-value is always commandable (a priority array)."""


def parse_object(text: str) -> ObjectIdentifier:
    """An object identifier from ``type,instance``; raises ``ValueError`` saying what is wrong."""
    try:
        identifier = ObjectIdentifier(text.replace(":", ","))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"'{text}' is not a BACnet object; expected type,instance such as "
                         "analog-value,1 or multi-state-output,3") from exc
    if identifier[1] > MAX_INSTANCE:
        raise ValueError(f"instance {identifier[1]} is above {MAX_INSTANCE}")
    return identifier


def object_text(identifier: ObjectIdentifier) -> str:
    """``type,instance`` as configurations write it."""
    return f"{identifier[0]},{identifier[1]}"


def parse_property(text: str) -> PropertyIdentifier:
    """A property identifier from its name (``present-value``) or number."""
    try:
        return PropertyIdentifier(int(text) if text.isdigit() else text)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"'{text}' is not a BACnet property; expected a name such as "
                         "present-value, status-flags or priority-array") from exc


def parse_address(text: str) -> tuple[str, int]:
    """``host`` or ``host:port`` (IPv4) as host and port."""
    host, colon, port_text = text.rpartition(":")
    if not colon:
        host, port_text = text, str(DEFAULT_PORT)
    try:
        ipaddress.IPv4Address(host)
        port = int(port_text)
    except ValueError as exc:
        raise ValueError(f"'{text}' is not an IPv4 address with an optional port, such as "
                         "192.0.2.20 or 192.0.2.20:47808") from exc
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    return host, port


class BacnetPoint(PointBase):
    """One property of one object of a BACnet device."""

    object: PlainText = Field(
        description="The object as `type,instance`: `analog-input,1`, `binary-value,4`, "
        "`multi-state-output,2`, `accumulator,1`, or any type by number (`130,7`).")
    property: PlainText = Field(
        default="present-value", description="The property by name (`present-value`, "
        "`status-flags`, `priority-array`, `description` …) or number.")
    priority: int = Field(
        default=16, ge=1, le=16, description="Write priority 1..16 (1 highest). A write of "
        "null relinquishes the point's slot at this priority.")
    mode: Literal["auto", "cov", "poll"] = Field(
        default="auto", description="`auto`: a change-of-value subscription when the device "
        "supports SubscribeCOV and the property is present-value, else polling. `cov`: "
        "subscribe, the point is `bad` when the device refuses. `poll`: always read each "
        "interval.")

    @field_validator("object")
    @classmethod
    def _valid_object(cls, text: str) -> str:
        return object_text(parse_object(text))

    @field_validator("property")
    @classmethod
    def _valid_property(cls, text: str) -> str:
        return str(parse_property(text))

    @builtins.property
    def object_type(self) -> str:
        """The object's type name, e.g. ``analog-value``."""
        return str(parse_object(self.object)[0])

    @builtins.property
    def address(self) -> str:
        """``object/property``, the address readings carry within a device."""
        return f"{self.object}/{self.property}"

    def value_type(self) -> ValueType | None:
        """Binary present-values are booleans; otherwise the configuration or the values tell."""
        fixed = super().value_type()
        if fixed is None and self.property == "present-value" and self.object_type in BINARY:
            return "bool"
        return fixed


class BacnetDevice(DeviceBase):
    """One BACnet device, found by its device instance."""

    instance: int = Field(
        ge=0, le=MAX_INSTANCE, description="Device instance (0..4194302): how the device is "
        "found and followed when its address changes.")
    address: PlainText | None = Field(
        default=None, description="Where to ask first, `host` or `host:port` (default port "
        "47808). Unset, or when the device no longer answers there, Who-Is finds it.")
    interval: Duration = Field(default=5.0, gt=0, description="Poll interval of its points.")
    cov_lifetime: Duration = Field(
        default=300.0, ge=2, le=28800, description="Lifetime asked for each COV "
        "subscription (2 s .. 8 h); renewed when half of it has passed.")
    points: Sequence[BacnetPoint] = Field(
        default_factory=list, description="Points added to (or replacing, by name) the "
        "profile's.")

    @field_validator("address")
    @classmethod
    def _valid_address(cls, text: str | None) -> str | None:
        if text is not None:
            parse_address(text)
        return text


class BacnetProfile(ProfileBase):
    """The objects of one controller model, instantiated by devices with `profile:`."""

    protocol: Literal["bacnet"] = Field(description="Always `bacnet`.")
    points: Sequence[BacnetPoint] = Field(
        default_factory=list, description="The points of every device using this profile.")


class BacnetSourceConfig(DeviceSourceBase):
    """A local BACnet/IP port and the devices it reads."""

    protocol: Literal["bacnet"] = Field(description="Always `bacnet`.")
    bind: PlainText = Field(
        default="0.0.0.0:47808", description="Local `address:port` the bridge's own BACnet "
        "device listens on (one per port on a host).")
    local_instance: int = Field(
        default=4194301, ge=0, le=MAX_INSTANCE, description="Device instance of the bridge "
        "itself; unique on the BACnet network.")
    who_is: Sequence[PlainText] = Field(
        default_factory=lambda: ["255.255.255.255"], description="Where Who-Is is sent to "
        "find devices: broadcast addresses (`192.0.2.255`) or single hosts, each with an "
        "optional `:port`.")
    timeout: Duration = Field(
        default=3.0, gt=0, description="How long each request waits for its answer.")
    retries: int = Field(default=2, ge=0, le=10, description="Repeats of an unanswered request.")
    max_unknown_devices: int = Field(
        default=1000, ge=1, description="Distinct unknown devices remembered (I-Am and COV "
        "notifications from devices not configured are counted and dropped).")
    devices: Sequence[BacnetDevice] = Field(
        default_factory=list, description="Devices read through this port.")

    @field_validator("bind")
    @classmethod
    def _valid_bind(cls, text: str) -> str:
        parse_address(text)
        return text

    @field_validator("who_is")
    @classmethod
    def _valid_targets(cls, targets: Sequence[str]) -> Sequence[str]:
        for target in targets:
            parse_address(target)
        return targets

    @model_validator(mode="after")
    def _unique_instances(self) -> BacnetSourceConfig:
        errors: list[InitErrorDetails] = []
        seen: dict[int, str] = {}
        for index, device in enumerate(self.devices):
            other = seen.setdefault(device.instance, device.id)
            if other != device.id:
                errors.append(InitErrorDetails(
                    type=PydanticCustomError(
                        "bacnet", "device instance {instance} is used twice on this source "
                        "(also by device '{other}')",
                        {"instance": device.instance, "other": other}),
                    loc=("devices", index, "instance"), input=device.instance))
        if errors:
            raise ValidationError.from_exception_data("bacnet", errors)
        return self

    def endpoint(self) -> str:
        """``bacnet://address:port``, the local port."""
        host, port = parse_address(self.bind)
        return f"bacnet://{host}:{port}"


def bacnet_source(source: SourceBase) -> BacnetSourceConfig:
    """``source`` as a BACnet source (the registry only hands us our own)."""
    if not isinstance(source, BacnetSourceConfig):
        raise TypeError(f"source {source.id} is not a BACnet source")
    return source


def known_object_type(name: str) -> bool:
    """Whether ``name`` is a standard object type name."""
    try:
        ObjectType(name)
    except ValueError:
        return False
    return True
