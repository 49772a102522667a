"""Logix points flattened and planned: one point per array element and structure member,
and the multi-service requests that read them.

Elements of one array that follow each other are read as one slice (``Temps[0]{4}``); the
reads of a cycle are packed into multi-service requests whose request and reply both fit in
the connection size. CIP attributes are read one request each.

Imports ``bridge.config`` and the Logix config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bridge.config.models import ReportSpec, ResolvedPoint, SourceBase
from bridge.config.yamlsource import KeyPath
from protocols.logix.config import TYPE_SIZES, LogixPoint, LogixSourceConfig, split_element

REQUEST_OVERHEAD = 8
"""Bytes of a multi-service request or reply besides its services."""
SERVICE_OVERHEAD = 10
"""Bytes each service adds besides its path (request) or data (reply): service code,
status, element count, offset."""


def logix_source(source: SourceBase) -> LogixSourceConfig:
    """``source`` as a Logix source (``TypeError`` otherwise)."""
    if not isinstance(source, LogixSourceConfig):
        raise TypeError(f"source {source.id} is not a Logix source")
    return source


def flatten(point: LogixPoint) -> list[LogixPoint]:
    """The points a configured point stands for: itself, or one per element or member."""
    if point.count is not None and point.tag is not None:
        located = split_element(point.tag)
        if located is None:  # excluded by validation
            raise ValueError(f"tag {point.tag} names no element")
        base, first = located
        return [point.model_copy(update={
            "name": f"{point.name}.{first + index}", "tag": f"{base}[{first + index}]",
            "count": None}) for index in range(point.count)]
    if point.members is not None and point.tag is not None:
        return [point.model_copy(update={
            "name": f"{point.name}.{member.name}", "tag": f"{point.tag}.{member.name}",
            "type": member.type, "members": None,
            "unit": member.unit if member.unit is not None else point.unit})
            for member in point.members]
    return [point]


def source_points(source: SourceBase, path: KeyPath) -> list[ResolvedPoint]:
    """The source's points, flattened, with their ids, tags and report settings."""
    config = logix_source(source)
    resolved = []
    for index, declared in enumerate(config.points):
        for point in flatten(declared):
            resolved.append(ResolvedPoint(
                id=f"{config.point_prefix}{point.name}", source=config.id, device=None,
                spec=point, tags={**config.tags, **point.tags},
                report=ReportSpec().merged(point.report), path=(*path, "points", index),
                max_value_bytes=config.max_value_bytes))
    return resolved


@dataclass(frozen=True, slots=True)
class ReadItem:
    """One service of a multi-service request: a tag, a slice, or a CIP attribute."""

    request: str
    """What pycomm3 is asked for: ``Speed``, ``Temps[0]{4}`` or ``cip:0x1/1/7``."""
    type: str
    elements: int = 1
    first: int | None = None
    """For a slice: the index of its first element."""
    attribute: bool = False

    @property
    def reply_bytes(self) -> int:
        """Bytes its answer takes in a reply."""
        return SERVICE_OVERHEAD + TYPE_SIZES[self.type] * self.elements

    @property
    def request_bytes(self) -> int:
        """Bytes it takes in a request: its symbolic path, padded to words."""
        return SERVICE_OVERHEAD + 2 * len(self.request)


def _spec(point: ResolvedPoint) -> LogixPoint:
    if not isinstance(point.spec, LogixPoint):
        raise TypeError(f"point {point.id} is not a Logix point")
    return point.spec


def items(points: Sequence[ResolvedPoint]) -> list[ReadItem]:
    """What to read for ``points``: consecutive elements of one array as one slice."""
    singles: dict[str, ReadItem] = {}
    arrays: dict[tuple[str, str], set[int]] = {}
    attributes: dict[str, ReadItem] = {}
    for point in points:
        spec = _spec(point)
        if spec.cip is not None:
            attributes.setdefault(str(spec.cip), ReadItem(str(spec.cip), spec.type,
                                                          attribute=True))
            continue
        tag = spec.tag or ""
        located = split_element(tag)
        if located is not None and spec.type != "BOOL":
            arrays.setdefault((located[0], spec.type), set()).add(located[1])
        else:
            singles.setdefault(tag, ReadItem(tag, spec.type))
    planned = list(singles.values())
    for (base, type_name), indexes in arrays.items():
        ordered = sorted(indexes)
        start = ordered[0]
        previous = start
        for index in [*ordered[1:], None]:
            if index is not None and index == previous + 1:
                previous = index
                continue
            count = previous - start + 1
            request = f"{base}[{start}]" if count == 1 else f"{base}[{start}]{{{count}}}"
            planned.append(ReadItem(request, type_name, elements=count,
                                    first=start if count > 1 else None))
            if index is not None:
                start = previous = index
    return [*planned, *attributes.values()]


def pack(planned: Sequence[ReadItem], connection_size: int) -> list[list[ReadItem]]:
    """Tag reads packed into multi-service requests within the connection size (an item
    too large for one packet goes alone: pycomm3 reads it in fragments); each CIP
    attribute on its own."""
    budget = connection_size - REQUEST_OVERHEAD
    packets: list[list[ReadItem]] = []
    current: list[ReadItem] = []
    request_size = reply_size = 0
    for item in planned:
        if item.attribute:
            packets.append([item])
            continue
        request_bytes = item.request_bytes + 2
        reply_bytes = item.reply_bytes + 2
        if current and (request_size + request_bytes > budget
                        or reply_size + reply_bytes > budget):
            packets.append(current)
            current, request_size, reply_size = [], 0, 0
        current.append(item)
        request_size += request_bytes
        reply_size += reply_bytes
    if current:
        packets.append(current)
    return packets
