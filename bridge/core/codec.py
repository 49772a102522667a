"""Binary value codec: 16-bit registers or raw bytes to typed values, and back.

Protocol independent: Modbus decodes registers with it; MQTT and AMQP binary payloads decode
bytes with it. Every codec is compiled once (a ``struct.Struct`` and a few flags); a call only
packs, slices and unpacks.

Byte and word order
-------------------
Names spell the order of the value's big-endian bytes as they arrive, ``A`` being the most
significant byte. Two independent swaps describe all four orders:

=========  ============  ====================================================================
32-bit     64-bit        meaning
=========  ============  ====================================================================
``ABCD``   ``ABCDEFGH``  big endian (Modbus standard): first register is the high word
``CDAB``   ``GHEFCDAB``  words swapped: first register is the low word, bytes big endian
``BADC``   ``BADCFEHG``  bytes swapped within each 16-bit word, words big endian
``DCBA``   ``HGFEDCBA``  fully little endian (both swaps)
=========  ============  ====================================================================

The 4-letter and 8-letter names are aliases: ``CDAB`` on a 64-bit value reverses the order of
its four words, exactly as ``GHEFCDAB`` does. On a 16-bit value only the byte swap matters
(``BADC`` and ``DCBA`` swap the two bytes). Strings accept the byte swap only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from bridge.config.models import ValueType
from bridge.core.model import Value
from bridge.errors import DecodeError

DataType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64",
    "string",
]
"""Value types the codec decodes."""

ByteOrder = Literal[
    "ABCD", "DCBA", "BADC", "CDAB", "ABCDEFGH", "HGFEDCBA", "BADCFEHG", "GHEFCDAB",
]
"""Byte/word orders; see the module docstring."""

DATA_TYPES: tuple[DataType, ...] = get_args(DataType)
BYTE_ORDERS: tuple[ByteOrder, ...] = get_args(ByteOrder)


def value_type_of(data_type: DataType) -> ValueType:
    """The kind of value ``data_type`` decodes to."""
    if data_type in ("bool", "string"):
        return data_type
    return "number" if data_type in ("float32", "float64") else "integer"

RegisterDecoder = Callable[[Sequence[int]], Value]
RegisterEncoder = Callable[[Value], list[int]]
BytesDecoder = Callable[[bytes], Value]


@dataclass(frozen=True, slots=True)
class Order:
    """A byte order as its two swaps."""

    swap_words: bool
    """The first register (16-bit word) holds the least significant part."""
    swap_bytes: bool
    """Each 16-bit word carries its low byte first."""


_ORDERS: dict[str, Order] = {
    "ABCD": Order(swap_words=False, swap_bytes=False),
    "ABCDEFGH": Order(swap_words=False, swap_bytes=False),
    "CDAB": Order(swap_words=True, swap_bytes=False),
    "GHEFCDAB": Order(swap_words=True, swap_bytes=False),
    "BADC": Order(swap_words=False, swap_bytes=True),
    "BADCFEHG": Order(swap_words=False, swap_bytes=True),
    "DCBA": Order(swap_words=True, swap_bytes=True),
    "HGFEDCBA": Order(swap_words=True, swap_bytes=True),
}

_FORMATS: dict[str, str] = {
    "int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q", "uint64": "Q",
    "float32": "f", "float64": "d",
}
_REGISTERS: dict[str, int] = {
    "bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4, "uint64": 4,
    "float32": 2, "float64": 4,
}
_INTEGERS = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})
_BIT_HOSTS = frozenset({"bool", "int16", "uint16"})


def parse_order(order: str) -> Order:
    """The swaps of a byte order name; ``ValueError`` for an unknown name."""
    try:
        return _ORDERS[order]
    except KeyError:
        raise ValueError(f"unknown byte order {order!r}; expected one of "
                         f"{', '.join(BYTE_ORDERS)}") from None


def register_count(data_type: DataType, length: int | None = None) -> int:
    """How many 16-bit registers a value occupies; a string's ``length`` is in registers."""
    if data_type == "string":
        if length is None or length < 1:
            raise ValueError("a string needs a length of at least 1 register")
        return length
    if length is not None:
        raise ValueError("length applies to strings only")
    try:
        return _REGISTERS[data_type]
    except KeyError:
        raise ValueError(f"unknown data type {data_type!r}") from None


def _check_order(data_type: DataType, order: Order) -> None:
    if data_type == "string" and order.swap_words:
        raise ValueError("a string accepts byte order ABCD or BADC only")


def _wrong_length(data_type: str, expected: int, got: int, unit: str) -> DecodeError:
    return DecodeError(f"{data_type} needs {expected} {unit}, got {got}")


def _text(raw: bytes) -> str:
    """Register text ends at the first NUL; trailing spaces are padding."""
    end = raw.find(b"\x00")
    if end >= 0:
        raw = raw[:end]
    try:
        return raw.decode("utf-8").rstrip(" ")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"string is not valid UTF-8 at byte {exc.start}") from None


def compile_register_decoder(
    data_type: DataType,
    order: ByteOrder | str = "ABCD",
    *,
    bit: int | None = None,
    length: int | None = None,
) -> RegisterDecoder:
    """A decoder from registers (ints 0..65535) to one value.

    ``bit`` (0 = least significant) turns a 16-bit register into the bool of that bit, after
    the byte order is applied. A ``bool`` without ``bit`` is true when its register is non-zero.
    A ``string`` of ``length`` registers holds two UTF-8 bytes per register. The decoder raises
    ``DecodeError`` for the wrong number of registers, a register out of range, or invalid
    UTF-8; a NaN or infinite float is returned as is (the point's transform rejects it).
    """
    swaps = parse_order(order)
    _check_order(data_type, swaps)
    count = register_count(data_type, length)
    words = struct.Struct(("<" if swaps.swap_bytes else ">") + f"{count}H")
    pack = words.pack

    def packed(registers: Sequence[int]) -> bytes:
        if len(registers) != count:
            raise _wrong_length(data_type, count, len(registers), "registers")
        try:
            return pack(*(reversed(registers) if swaps.swap_words else registers))
        except struct.error:
            raise DecodeError(f"register values out of range: {list(registers)!r}") from None

    if bit is not None:
        if data_type not in _BIT_HOSTS:
            raise ValueError(f"a bit is read from a 16-bit register, not from {data_type}")
        if not 0 <= bit <= 15:
            raise ValueError("bit must be 0..15")
        mask = 1 << bit
        to_int = struct.Struct(">H").unpack

        def decode_bit(registers: Sequence[int]) -> Value:
            return bool(to_int(packed(registers))[0] & mask)

        return decode_bit

    if data_type == "bool":
        to_word = struct.Struct(">H").unpack

        def decode_bool(registers: Sequence[int]) -> Value:
            return bool(to_word(packed(registers))[0])

        return decode_bool

    if data_type == "string":

        def decode_string(registers: Sequence[int]) -> Value:
            return _text(packed(registers))

        return decode_string

    unpack = struct.Struct(">" + _FORMATS[data_type]).unpack

    def decode(registers: Sequence[int]) -> Value:
        value: int | float = unpack(packed(registers))[0]
        return value

    if data_type in ("int16", "uint16"):
        # One register: plain arithmetic instead of packing and unpacking bytes; anything
        # unusual (not exactly one int in range) takes the general path and its errors.
        signed = data_type == "int16"
        swap = swaps.swap_bytes

        def decode_word(registers: Sequence[int]) -> Value:
            if len(registers) == 1:
                word = registers[0]
                if type(word) is int and 0 <= word <= 0xFFFF:
                    if swap:
                        word = (word & 0xFF) << 8 | word >> 8
                    return word - 0x10000 if signed and word & 0x8000 else word
            return decode(registers)

        return decode_word

    return decode


def compile_register_encoder(
    data_type: DataType,
    order: ByteOrder | str = "ABCD",
    *,
    bit: int | None = None,
    length: int | None = None,
) -> RegisterEncoder:
    """The inverse of ``compile_register_decoder``: one value to its registers (for writes).

    Raises ``ValueError`` for a value of the wrong kind or out of range, and for a string
    longer than ``length`` registers (shorter strings are padded with NULs). A single bit
    inside a register cannot be encoded alone: writing it needs a read-modify-write.
    """
    if bit is not None:
        raise ValueError("a bit inside a register is written by read-modify-write of the "
                         "whole register, not encoded alone")
    swaps = parse_order(order)
    _check_order(data_type, swaps)
    count = register_count(data_type, length)
    words = struct.Struct(("<" if swaps.swap_bytes else ">") + f"{count}H")

    def registers(raw: bytes) -> list[int]:
        values = list(words.unpack(raw))
        if swaps.swap_words:
            values.reverse()
        return values

    if data_type == "bool":

        def encode_bool(value: Value) -> list[int]:
            if not isinstance(value, bool | int) or value not in (0, 1):
                raise ValueError(f"expected a bool, got {value!r}")
            return [1 if value else 0]

        return encode_bool

    if data_type == "string":
        size = 2 * count

        def encode_string(value: Value) -> list[int]:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            raw = value.encode("utf-8")
            if len(raw) > size:
                raise ValueError(f"string of {len(raw)} bytes does not fit in {count} registers")
            return registers(raw.ljust(size, b"\x00"))

        return encode_string

    pack = struct.Struct(">" + _FORMATS[data_type]).pack
    integer = data_type in _INTEGERS

    def encode(value: Value) -> list[int]:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        if integer and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{data_type} cannot hold {value!r}")
            value = int(value)
        try:
            return registers(pack(value))
        except (struct.error, OverflowError):
            raise ValueError(f"{value!r} is out of range for {data_type}") from None

    return encode


def compile_bytes_decoder(
    data_type: DataType,
    order: ByteOrder | str = "ABCD",
    *,
    length: int | None = None,
) -> BytesDecoder:
    """A decoder from a byte string to one value (binary MQTT/AMQP payloads).

    Numbers need exactly their size in bytes and follow ``order`` as registers would (the
    bytes read as big-endian 16-bit words). A ``bool`` is one byte, true when non-zero. A
    ``string``'s ``length`` is in bytes (``None``: any length) and the text ends at the first
    NUL; ``BADC`` swaps each byte pair of a string first.
    """
    swaps = parse_order(order)
    _check_order(data_type, swaps)
    if data_type == "bool":
        if length is not None:
            raise ValueError("length applies to strings only")

        def decode_bool(data: bytes) -> Value:
            if len(data) != 1:
                raise _wrong_length(data_type, 1, len(data), "byte")
            return data[0] != 0

        return decode_bool

    if data_type == "string":
        if length is not None and length < 1:
            raise ValueError("a string needs a length of at least 1 byte")

        def decode_string(data: bytes) -> Value:
            if length is not None and len(data) != length:
                raise _wrong_length(data_type, length, len(data), "bytes")
            if swaps.swap_bytes:
                if len(data) % 2:
                    raise DecodeError("a byte-swapped string needs an even number of bytes")
                swapped = bytearray(data)
                swapped[0::2], swapped[1::2] = data[1::2], data[0::2]
                data = bytes(swapped)
            return _text(data)

        return decode_string

    count = register_count(data_type, length)
    size = 2 * count
    to_registers = struct.Struct(f">{count}H").unpack
    decode_registers = compile_register_decoder(data_type, order)

    def decode(data: bytes) -> Value:
        if len(data) != size:
            raise _wrong_length(data_type, size, len(data), "bytes")
        return decode_registers(to_registers(data))

    return decode
