"""S7 addresses: the classic notation (``DB10.DBD4:REAL``, ``M0.1``, ``IW2``, ``T1``) parsed
into a ``Location``, the data types with their sizes, and a location written back in the
classic notation.

A location's ``start`` is a byte offset in the DB, merker, input and output areas, and the
timer or counter number in the T and C areas (whose elements are two bytes each).

Imports nothing of Fieldbridge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

Area = Literal["DB", "M", "I", "Q", "T", "C"]
"""The memory areas: data blocks, merkers (flags), inputs, outputs, timers and counters."""

AREAS: tuple[Area, ...] = get_args(Area)

DataType = Literal["BOOL", "BYTE", "WORD", "DWORD", "INT", "DINT", "REAL", "LREAL",
                   "STRING", "WSTRING", "DATE_AND_TIME", "TIMER", "COUNTER"]
"""The types a point decodes; TIMER and COUNTER are the T and C areas' own."""

DATA_TYPES: tuple[DataType, ...] = get_args(DataType)

FIXED_SIZES: dict[str, int] = {
    "BYTE": 1, "WORD": 2, "DWORD": 4, "INT": 2, "DINT": 4, "REAL": 4, "LREAL": 8,
    "DATE_AND_TIME": 8, "TIMER": 2, "COUNTER": 2,
}
"""Bytes of each fixed-size type (a BOOL occupies one bit of one byte)."""

MAX_STRING = 254
"""The longest S7 STRING (and, here, WSTRING) in characters."""

ELEMENT_AREAS: frozenset[str] = frozenset({"T", "C"})
"""Areas addressed by element number, each element two bytes."""

_WIDTHS = {"X": 0, "B": 1, "W": 2, "D": 4}
_WIDTH_TYPES: dict[str, tuple[str, ...]] = {
    "X": ("BOOL",),
    "W": ("WORD", "INT"),
    "D": ("DWORD", "DINT", "REAL"),
}
_DEFAULT_TYPE = {"X": "BOOL", "B": "BYTE", "W": "WORD", "D": "DWORD"}
_ALIASES = {"E": "I", "A": "Q", "Z": "C"}
"""German mnemonics: Eingang, Ausgang, Zähler."""

_DB = re.compile(r"^DB(\d+)\.DB([XBWD])(\d+)(?:\.(\d+))?$")
_MEMORY = re.compile(r"^([MIQEA])([XBWD]?)(\d+)(?:\.(\d+))?$")
_ELEMENT = re.compile(r"^([TCZ])(\d+)$")
_TYPE = re.compile(r"^([A-Z_]+)(?:\[(\d+)\])?$")


def data_size(data_type: str, length: int | None) -> int:
    """Bytes one value of the type occupies (a BOOL: its one byte)."""
    if data_type == "BOOL":
        return 1
    if data_type == "STRING":
        return 2 + (length or 0)
    if data_type == "WSTRING":
        return 4 + 2 * (length or 0)
    return FIXED_SIZES[data_type]


@dataclass(frozen=True, slots=True)
class Location:
    """Where one value lives: area, DB number, start (byte or element), bit, type, length."""

    area: Area
    db: int
    start: int
    data_type: DataType
    bit: int | None = None
    length: int | None = None
    """Characters of a STRING or WSTRING."""

    @property
    def size(self) -> int:
        """Units the value occupies: bytes, or elements in the T and C areas."""
        if self.area in ELEMENT_AREAS:
            return 1
        return data_size(self.data_type, self.length)

    def classic(self) -> str:
        """The location in the classic notation, with its type where the width does not
        say it (``DB1.DBD4:REAL``, ``M0.1``, ``MW2``, ``DB2.DBB0:STRING[20]``, ``T1``)."""
        if self.area in ELEMENT_AREAS:
            return f"{self.area}{self.start}"
        if self.data_type == "BOOL":
            body = f"X{self.start}.{self.bit or 0}" if self.area == "DB" else \
                f"{self.start}.{self.bit or 0}"
            return f"DB{self.db}.DB{body}" if self.area == "DB" else f"{self.area}{body}"
        width = {1: "B", 2: "W", 4: "D"}.get(data_size(self.data_type, self.length), "B")
        if width != "B" and self.data_type not in _WIDTH_TYPES[width]:
            width = "B"
        prefix = f"DB{self.db}.DB{width}" if self.area == "DB" else f"{self.area}{width}"
        text = f"{prefix}{self.start}"
        if self.data_type != _DEFAULT_TYPE[width]:
            suffix = self.data_type if self.length is None else \
                f"{self.data_type}[{self.length}]"
            text += f":{suffix}"
        return text


def parse_type(text: str) -> tuple[DataType, int | None]:
    """``REAL`` or ``STRING[20]`` as the type and its length; ``ValueError`` if unknown."""
    match = _TYPE.match(text.strip().upper())
    if match is None or match.group(1) not in DATA_TYPES:
        raise ValueError(f"unknown type {text!r}: expected one of {', '.join(DATA_TYPES[:-2])}"
                         " (STRING[n] and WSTRING[n] with their length)")
    name = match.group(1)
    length = int(match.group(2)) if match.group(2) is not None else None
    if length is not None and name not in ("STRING", "WSTRING"):
        raise ValueError(f"only STRING and WSTRING take a length, not {name}")
    return name, length  # type: ignore[return-value]


def parse(text: str) -> Location:
    """A classic address as a ``Location``; ``ValueError`` saying what is wrong.

    ``DB<n>.DBX<byte>.<bit>``, ``DB<n>.DB{B,W,D}<byte>``, ``{M,I,Q}<byte>.<bit>``,
    ``{M,I,Q}{B,W,D}<byte>``, ``T<n>``, ``C<n>``; an optional ``:TYPE`` after a byte, word
    or double word says how it decodes (``:REAL``, ``:INT``, ``:STRING[20]``; after a byte
    any type that starts there).
    """
    address, _, type_text = text.strip().upper().partition(":")
    address = address.strip()
    element = _ELEMENT.match(address)
    if element is not None:
        area: Area = _ALIASES.get(element.group(1), element.group(1))  # type: ignore[assignment]
        if type_text:
            raise ValueError(f"a {'timer' if area == 'T' else 'counter'} has its own type; "
                             f"leave out ':{type_text}'")
        return Location(area, 0, int(element.group(2)), "TIMER" if area == "T" else "COUNTER")
    db_match = _DB.match(address)
    if db_match is not None:
        db = int(db_match.group(1))
        width, start, bit = db_match.group(2), int(db_match.group(3)), db_match.group(4)
        area = "DB"
        if db < 1:
            raise ValueError("DB numbers start at 1")
    else:
        memory = _MEMORY.match(address)
        if memory is None:
            raise ValueError(
                f"{text!r} is not an S7 address: expected e.g. DB10.DBD4:REAL, DB1.DBX0.3, "
                "M0.1, MW2, IW2, QB0, T1 or C1")
        area = _ALIASES.get(memory.group(1), memory.group(1))  # type: ignore[assignment]
        db = 0
        width = memory.group(2) or ("X" if memory.group(4) is not None else "")
        start, bit = int(memory.group(3)), memory.group(4)
        if not width:
            raise ValueError(f"{text!r} needs a width (B, W or D: {area}W{start}) or a bit "
                             f"({area}{start}.0)")
    if width == "X":
        if bit is None:
            raise ValueError(f"a bit address needs its bit number: {address}.0")
        if int(bit) > 7:
            raise ValueError(f"bit {bit} does not exist: bits are numbered 0-7")
        if type_text and type_text.strip() != "BOOL":
            raise ValueError(f"a bit address is a BOOL, not {type_text}")
        return Location(area, db, start, "BOOL", bit=int(bit))
    if bit is not None:
        raise ValueError(f"only a bit address (X) has a bit number, not a {width} address")
    if not type_text:
        return Location(area, db, start, _DEFAULT_TYPE[width])  # type: ignore[arg-type]
    data_type, length = parse_type(type_text)
    if data_type in ("STRING", "WSTRING") and length is None:
        raise ValueError(f"{data_type} needs its length: {data_type}[n]")
    if data_type in ("TIMER", "COUNTER"):
        raise ValueError(f"{data_type} lives in the {data_type[0]} area: write {data_type[0]}n")
    if data_type == "BOOL":
        raise ValueError(f"a BOOL is one bit: write the bit address ({address}.0 style)")
    if width != "B" and data_type not in _WIDTH_TYPES[width]:
        raise ValueError(f"a {width} address holds {_WIDTHS[width]} bytes: "
                         f"{' or '.join(_WIDTH_TYPES[width])}, not {data_type} (start "
                         f"larger types at a byte address such as DBB{start}:{data_type})")
    return Location(area, db, start, data_type, length=length)
