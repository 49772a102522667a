"""Register holes: a device's request plan, relearned around the addresses it refuses.

The planner reads neighbouring points in one request, through the unused addresses between
them. A device that refuses some of those addresses (exception 2, illegal data address, or 3
from some devices) refuses the whole request, and every point in it would stay ``bad``. The
source then splits the refused request in two between its points, again and again, until
each part reads or holds a single point; ``DevicePlan`` keeps the result: parts that read,
joined again where they touch, and the single points that do not, polled on their own.

The plan is learned once per source object: a reconnect keeps it (devices do not move their
holes), while a reload that changes the source's configuration builds a new source and plans
from scratch.

Imports nothing from ``bridge``; the Modbus config and planner only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from protocols.modbus.config import MAX_BITS, MAX_REGISTERS, TABLES
from protocols.modbus.planner import Block, Span, halves, join, spans_in

HOLE_CODES = frozenset({2, 3})
"""Illegal data address, and illegal data value (which some devices give for the same)."""


def describe(block: Block | Span) -> str:
    """``holding 99`` or ``holding 110-119``: 0-based offsets, as the plan reports them."""
    last = block.start + block.count - 1
    return f"{block.table} {block.start}" + (f"-{last}" if last != block.start else "")


@dataclass
class DevicePlan:
    """One device as the source polls it: its unit id, interval, points and requests.

    ``blocks`` starts as the planner's and changes when a request is refused for an
    address inside it (``learn``).
    """

    id: str
    unit: int
    interval: float
    blocks: tuple[Block, ...]
    spans: tuple[Span, ...] = ()
    """What each point reads; without them a refused request is not split."""
    max_registers: int = MAX_REGISTERS
    max_bits: int = MAX_BITS
    unreadable: dict[Span, str] = field(default_factory=dict)
    """Points whose own request is refused, with the reason."""
    joined: set[Block] = field(default_factory=set)
    """Blocks made by joining parts that read: refused again, they are not joined again."""
    learned: bool = False
    """Whether a refused request changed the plan."""

    def split(self, block: Block) -> tuple[Block, Block] | None:
        """``block`` in two halves between its points, or ``None`` for a single point."""
        return halves(block, spans_in(block, self.spans))

    def learn(self, refused: Block, parts: Sequence[tuple[Block, str | None]]) -> None:
        """Replace ``refused`` by the ``parts`` it was split into, each with the reason it
        was refused (``None``: it reads). Parts that read are joined where they touch,
        unless ``refused`` was itself such a join."""
        readable = [block for block, reason in parts if reason is None]
        kept = readable if refused in self.joined else join(
            readable, max_registers=self.max_registers, max_bits=self.max_bits)
        self.joined.update(block for block in kept if block not in readable)
        for block, reason in parts:
            if reason is not None:
                kept.append(block)
                for span in spans_in(block, self.spans):
                    self.unreadable[span] = reason
        others = [block for block in self.blocks if block != refused]
        self.blocks = tuple(sorted(
            (*others, *kept), key=lambda block: (TABLES.index(block.table), block.start)))
        self.learned = True

    def read(self, block: Block) -> bool:
        """``block`` read: its points are no longer unreadable (the device changed). Returns
        whether that changed the plan's details."""
        if not self.unreadable:
            return False
        cleared = [span for span in spans_in(block, self.spans) if span in self.unreadable]
        for span in cleared:
            del self.unreadable[span]
        return bool(cleared)

    def details(self) -> dict[str, list[str]]:
        """The learned plan as the inventory shows it: the requests polled, and the points
        that the device refuses."""
        return {
            "requests": [describe(block) for block in self.blocks],
            "unreadable": [f"{describe(span)}: {reason}"
                           for span, reason in sorted(self.unreadable.items())],
        }
