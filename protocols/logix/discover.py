"""Logix discovery: list the controller's tag database with types and write a mapping.

Atomic tags become points, arrays a point with ``count`` (the first ``MAX_ELEMENTS``
elements), structures a STRUCT point with their atomic members (nested ones dotted). A
controller that refuses the tag upload (some gateways, and simulators) is said so plainly:
the mapping then reads the identity object by CIP attribute, and tags are added by hand.

Imports ``bridge.config``, ``bridge.core.discovery``, ``bridge.errors`` and the Logix config
and client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import Field

from bridge.config.models import Identifier
from bridge.core.discovery import (
    DiscoveredItem,
    Discovery,
    DiscoveryContext,
    DiscoveryRequest,
    DiscoverySpec,
    UniqueNames,
    point_name,
    render_yaml,
)
from bridge.errors import ConnectorError, ErrorCategory
from protocols.logix.client import ClientError, LogixClient, create_client
from protocols.logix.config import MAX_ELEMENTS, PORT, TYPE_SIZES, LogixSourceConfig
from protocols.logix.mapping import PROTOCOL

IDENTITY: tuple[tuple[str, int, str], ...] = (
    ("identity.vendor", 1, "INT"),
    ("identity.product_code", 3, "INT"),
    ("identity.serial", 6, "DINT"),
    ("identity.product_name", 7, "STRING"),
)
"""Identity object (class 1, instance 1) attributes written when tags cannot be listed."""


class LogixDiscoverRequest(DiscoveryRequest):
    """Where the controller is and how to reach it."""

    host: str = Field(description="Host name or address of the Ethernet module.")
    port: int = Field(default=PORT, ge=1, le=65535, description="EtherNet/IP TCP port.")
    slot: int = Field(default=0, ge=0, le=31, description="Backplane slot of the controller.")
    timeout: float = Field(default=5.0, gt=0, le=60, description="Seconds per answer.")
    source_id: Identifier = Field(default="logix", description="The generated source's id.")

    def source_config(self, points: list[dict[str, Any]] | None = None) -> LogixSourceConfig:
        """The source these settings describe (with ``points``)."""
        return LogixSourceConfig.model_validate({
            "id": self.source_id, "protocol": PROTOCOL, "host": self.host, "port": self.port,
            "slot": self.slot, "timeout": self.timeout, "points": points or []})


def _members(data_type: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """A structure's atomic members, nested ones dotted (arrays inside are left out)."""
    members: list[dict[str, Any]] = []
    for name in data_type.get("attributes", []):
        info = data_type.get("internal_tags", {}).get(name, {})
        if info.get("array"):
            continue
        type_name = info.get("data_type_name")
        if info.get("tag_type") == "struct" and isinstance(info.get("data_type"), dict):
            if type_name == "STRING":
                members.append({"name": prefix + name, "type": "STRING"})
            else:
                members.extend(_members(info["data_type"], f"{prefix}{name}."))
        elif type_name in TYPE_SIZES:
            members.append({"name": prefix + name, "type": type_name})
    return members


def point_for(tag: str, definition: dict[str, Any], names: UniqueNames) -> dict[str, Any] | None:
    """The configuration of one uploaded tag, or ``None`` when no point can read it."""
    type_name = definition.get("data_type_name")
    elements = (definition.get("dimensions") or [0])[0] if definition.get("dim") else 0
    name = point_name([tag.removeprefix("Program:")], names, fallback="tag")
    if definition.get("tag_type") == "struct" and type_name != "STRING":
        data_type = definition.get("data_type")
        members = _members(data_type) if isinstance(data_type, dict) else []
        if elements or not members:
            return None
        return {"name": name, "tag": tag, "type": "STRUCT", "members": members}
    if type_name not in TYPE_SIZES:
        return None
    point: dict[str, Any] = {"name": name, "tag": f"{tag}[0]" if elements else tag,
                             "type": type_name}
    if elements:
        point["count"] = min(elements, MAX_ELEMENTS)
    return point


async def discover(request: LogixDiscoverRequest, context: DiscoveryContext,
                   client_factory: Callable[[LogixSourceConfig], LogixClient]
                   = create_client) -> Discovery:
    """Upload the tag database and write a source that reads every tag it can.

    Raises ``ConnectorError`` when the controller cannot be reached.
    """
    config = request.source_config()
    client = client_factory(config)
    context.progress.announce(f"connecting to {config.endpoint()}")
    try:
        await asyncio.to_thread(client.open)
        database = client.tag_database()
        identity = await asyncio.to_thread(client.identity)
    except ClientError as exc:
        raise ConnectorError(config.endpoint(), exc.reason, ErrorCategory.TRANSIENT) from exc
    finally:
        await asyncio.to_thread(client.close)
    names = UniqueNames()
    points: list[dict[str, Any]] = []
    warnings: list[str] = []
    items: list[DiscoveredItem] = []
    if database is None:
        warnings.append("the controller refuses the tag list upload (Get_Instance_Attribute_"
                        "List on the Symbol object): the mapping reads its identity object; "
                        "add tags by name and type by hand")
        for name, attribute, type_name in IDENTITY:
            points.append({"name": names.take(name), "cip": {"class": 1, "instance": 1,
                                                             "attribute": attribute},
                           "type": type_name})
    else:
        skipped = []
        for tag, definition in sorted(database.items()):
            point = point_for(tag, definition, names)
            if point is None:
                skipped.append(tag)
                continue
            points.append(point)
        if skipped:
            warnings.append(f"{len(skipped)} tags have no readable atomic type and were left "
                            f"out: {', '.join(skipped[:20])}")
    for point in points:
        address = point.get("tag") or f"cip:{point['cip']['class']:#x}/1/" \
            f"{point['cip']['attribute']}"
        items.append(DiscoveredItem(name=point["name"], address=address, type=point["type"],
                                    extra={key: point[key] for key in ("count", "members")
                                           if key in point}))
    request.source_config(points)  # what is written validates
    moment = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    product = identity.get("product_name") or "an EtherNet/IP target"
    header = [f"Generated by {context.command or 'fieldbridge discover logix'} on {moment}",
              f"{product} at {config.endpoint()}: {len(points)} points.", *warnings]
    document = {"sources": [{
        "id": request.source_id, "protocol": PROTOCOL, "host": request.host,
        "port": request.port, "slot": request.slot, "interval": "1s", "points": points}]}
    context.progress.finish(f"{len(points)} points from {product}")
    return Discovery(protocol=PROTOCOL, yaml=render_yaml(document, header=header),
                     items=items, warnings=warnings)


def _target(text: str) -> dict[str, Any]:
    host, colon, port = text.rpartition(":")
    if colon and port.isdigit() and (not host.count(":") or host.startswith("[")):
        return {"host": host.strip("[]"), "port": port}
    return {"host": text.strip("[]")}


SPEC = DiscoverySpec(
    request_model=LogixDiscoverRequest,
    run=discover,
    target=_target,
    target_name="HOST[:PORT]",
    summary="list a Logix controller's tags with their types and write a source that reads "
    "them (HOST[:PORT]; --slot for the controller's backplane slot)",
)
