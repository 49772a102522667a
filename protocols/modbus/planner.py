"""Request planning: the points of one device to the fewest read requests.

Points close to each other are read together: a gap of up to ``max_gap`` unused registers
(or bits) is read through, as long as one request stays within ``max_registers`` (or
``max_bits``). Requests never span two tables. The plan is a pure function of its input.

Reading left to right and extending the current request as long as both limits allow is
optimal here: a request that ends later can never make the rest of the plan longer.

``halves`` and ``join`` are the steps a device's learned plan takes around a register hole
(``protocols.modbus.holes``): a refused request split between its points, and the parts that
read joined again where they touch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocols.modbus.config import BIT_TABLES, MAX_BITS, MAX_REGISTERS, TABLES, Table


@dataclass(frozen=True, slots=True, order=True)
class Span:
    """The registers (or bits) one point needs."""

    table: Table
    start: int
    count: int

    @property
    def end(self) -> int:
        """One past the last register."""
        return self.start + self.count


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers (or bits) of ``table`` from ``start``."""

    table: Table
    start: int
    count: int

    @property
    def end(self) -> int:
        """One past the last register."""
        return self.start + self.count


def plan(
    spans: Iterable[Span],
    *,
    max_gap: int,
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
) -> list[Block]:
    """The fewest blocks covering every span, ordered by table then address.

    Raises ``ValueError`` for a span larger than one request may be (configuration
    validation prevents it).
    """
    if max_gap < 0 or max_registers < 1 or max_bits < 1:
        raise ValueError("max_gap must be >= 0, max_registers and max_bits >= 1")
    by_table: dict[str, list[Span]] = {}
    for span in spans:
        by_table.setdefault(span.table, []).append(span)
    blocks: list[Block] = []
    for table in TABLES:
        limit = max_bits if table in BIT_TABLES else max_registers
        start = end = -1
        for span in sorted(set(by_table.get(table, ()))):
            if span.count > limit:
                raise ValueError(f"{span.count} {table} values do not fit in one request "
                                 f"(at most {limit})")
            if start >= 0 and span.start - end <= max_gap and max(end, span.end) - start <= limit:
                end = max(end, span.end)
                continue
            if start >= 0:
                blocks.append(Block(table, start, end - start))
            start, end = span.start, span.end
        if start >= 0:
            blocks.append(Block(table, start, end - start))
    return blocks


def spans_in(block: Block, spans: Iterable[Span]) -> list[Span]:
    """The distinct spans that ``block`` reads, in address order."""
    return sorted({span for span in spans
                   if span.table == block.table and block.start <= span.start
                   and span.end <= block.end})


def halves(block: Block, spans: Sequence[Span]) -> tuple[Block, Block] | None:
    """``block`` split in two between its spans (``spans_in`` order), each half covering
    its spans only; ``None`` when it reads a single span and cannot be split."""
    if len(spans) < 2:
        return None
    middle = len(spans) // 2
    left, right = spans[:middle], spans[middle:]
    left_end = max(span.end for span in left)
    right_end = max(span.end for span in right)
    return (Block(block.table, left[0].start, left_end - left[0].start),
            Block(block.table, right[0].start, right_end - right[0].start))


def join(blocks: Iterable[Block], *, max_registers: int = MAX_REGISTERS,
         max_bits: int = MAX_BITS) -> list[Block]:
    """Blocks that touch (one ends where the next starts) joined, within the request limits:
    every address of a joined block was read by one of the blocks it joins."""
    joined: list[Block] = []
    for block in sorted(blocks, key=lambda item: (TABLES.index(item.table), item.start)):
        limit = max_bits if block.table in BIT_TABLES else max_registers
        if joined:
            last = joined[-1]
            if (last.table == block.table and last.end == block.start
                    and block.end - last.start <= limit):
                joined[-1] = Block(block.table, last.start, block.end - last.start)
                continue
        joined.append(block)
    return joined
