"""Read planning: the points of one PLC to the fewest read requests that fit its PDU.

As for Modbus, points close to each other are read together: a gap of up to ``max_gap``
unused bytes is read through, as long as one request's data stays within what the
negotiated PDU carries. A request never spans two areas or two DBs. The plan is a pure
function of its input, and reading left to right, extending the current request while
both limits allow, is optimal.

Imports the S7 address module only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protocols.s7.address import ELEMENT_AREAS, Area

ELEMENT_BYTES = 2
"""Bytes of one timer or counter."""


@dataclass(frozen=True, slots=True, order=True)
class Block:
    """One read request (or what one point needs): ``count`` units of an area from
    ``start``; units are bytes, or timers and counters in the T and C areas."""

    area: Area
    db: int
    start: int
    count: int

    @property
    def end(self) -> int:
        """One past the last unit."""
        return self.start + self.count

    def covers(self, other: Block) -> bool:
        """Whether ``other`` lies inside this block."""
        return (other.area == self.area and other.db == self.db
                and self.start <= other.start and other.end <= self.end)

    def __str__(self) -> str:
        if self.area in ELEMENT_AREAS:
            return f"{self.area}{self.start}-{self.area}{self.end - 1}"
        where = f"DB{self.db}" if self.area == "DB" else self.area
        return f"{where} bytes {self.start}-{self.end - 1}"


def unit_limit(area: Area, max_bytes: int) -> int:
    """How many units of ``area`` one request carries when its data may be ``max_bytes``."""
    return max_bytes // ELEMENT_BYTES if area in ELEMENT_AREAS else max_bytes


def plan(spans: Iterable[Block], *, max_gap: int, max_bytes: int) -> list[Block]:
    """The fewest blocks covering every span, by area, DB and start.

    Raises ``ValueError`` for a span larger than one request (validation prevents it).
    """
    if max_gap < 0 or max_bytes < 1:
        raise ValueError("max_gap must be >= 0 and max_bytes >= 1")
    blocks: list[Block] = []
    current: Block | None = None
    for span in sorted(set(spans)):
        limit = unit_limit(span.area, max_bytes)
        if span.count > limit:
            raise ValueError(f"{span} does not fit in one request (at most {limit})")
        if (current is not None and current.area == span.area and current.db == span.db
                and span.start - current.end <= max_gap
                and max(current.end, span.end) - current.start <= limit):
            current = Block(current.area, current.db, current.start,
                            max(current.end, span.end) - current.start)
            continue
        if current is not None:
            blocks.append(current)
        current = span
    if current is not None:
        blocks.append(current)
    return blocks
