"""The S7 data types as bytes: a location's bytes to a point value, and back.

Everything S7 is big endian. A STRING is its maximum length, its current length and
latin-1 characters; a WSTRING the same in 16-bit words with UTF-16 characters. A
DATE_AND_TIME is eight BCD bytes (1990-2089, milliseconds, weekday) and becomes ISO 8601
text (``2024-05-01T12:30:15.250``, the PLC's local time as it stands). A timer is its S5TIME
in seconds, a counter its three BCD digits.

Imports ``bridge.core.model``, ``bridge.errors`` and the S7 address module.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from datetime import datetime

from bridge.core.model import Value
from bridge.errors import DecodeError
from protocols.s7.address import Location

Decoder = Callable[[bytes], Value]
Encoder = Callable[[Value, bytes], bytes]
"""A raw value (and the bytes it replaces, for a bit) to the bytes to write."""

_NUMBERS = {"BYTE": ">B", "WORD": ">H", "DWORD": ">I", "INT": ">h", "DINT": ">i",
            "REAL": ">f", "LREAL": ">d"}
_TIME_BASES = (0.01, 0.1, 1.0, 10.0)


def _bcd(byte: int) -> int:
    high, low = byte >> 4, byte & 0x0F
    if high > 9 or low > 9:
        raise DecodeError(f"0x{byte:02X} is not a BCD byte")
    return high * 10 + low


def _to_bcd(number: int) -> int:
    return (number // 10) << 4 | number % 10


def decode_date_and_time(data: bytes) -> str:
    """Eight DATE_AND_TIME bytes as ISO 8601 text."""
    year = _bcd(data[0])
    year += 1900 if year >= 90 else 2000
    milliseconds = _bcd(data[6]) * 10 + (data[7] >> 4)
    try:
        moment = datetime(year, _bcd(data[1]), _bcd(data[2]), _bcd(data[3]), _bcd(data[4]),
                          _bcd(data[5]), milliseconds * 1000)
    except ValueError as exc:
        raise DecodeError(f"not a DATE_AND_TIME: {exc}") from None
    return moment.isoformat(timespec="milliseconds")


def encode_date_and_time(text: str) -> bytes:
    """ISO 8601 text as eight DATE_AND_TIME bytes; ``ValueError`` outside 1990-2089."""
    moment = datetime.fromisoformat(text)
    if not 1990 <= moment.year <= 2089:
        raise ValueError(f"DATE_AND_TIME holds the years 1990-2089, not {moment.year}")
    milliseconds = moment.microsecond // 1000
    weekday = moment.isoweekday() % 7 + 1  # S7: 1 = Sunday
    return bytes([_to_bcd(moment.year % 100), _to_bcd(moment.month), _to_bcd(moment.day),
                  _to_bcd(moment.hour), _to_bcd(moment.minute), _to_bcd(moment.second),
                  _to_bcd(milliseconds // 10), (milliseconds % 10) << 4 | weekday])


def _decode_timer(data: bytes) -> Value:
    word = int.from_bytes(data[:2], "big")
    base = _TIME_BASES[(word >> 12) & 0x03]
    value = _bcd((word >> 8) & 0x0F) * 100 + _bcd(word & 0xFF)
    return round(value * base, 2)


def _decode_counter(data: bytes) -> Value:
    word = int.from_bytes(data[:2], "big")
    return _bcd((word >> 8) & 0x0F) * 100 + _bcd(word & 0xFF)


def _number(value: Value) -> float | int:
    if not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number")
    return value


def _encode_counter(value: Value, current: bytes) -> bytes:
    number = int(_number(value))
    if not 0 <= number <= 999:
        raise ValueError(f"a counter holds 0-999, not {number}")
    return bytes([number // 100, _to_bcd(number % 100)])


def compile_decoder(location: Location) -> Decoder:
    """The callable turning the location's bytes into its value."""
    data_type = location.data_type
    if data_type == "BOOL":
        mask = 1 << (location.bit or 0)
        return lambda data: bool(data[0] & mask)
    if data_type in _NUMBERS:
        unpack = struct.Struct(_NUMBERS[data_type]).unpack
        if data_type in ("REAL", "LREAL"):

            def decode_float(data: bytes) -> Value:
                value = float(unpack(data)[0])
                if not math.isfinite(value):
                    raise DecodeError(f"value is {value}")
                return value

            return decode_float
        return lambda data: int(unpack(data)[0])
    if data_type == "STRING":
        limit = location.length or 0

        def decode_string(data: bytes) -> Value:
            count = min(data[1], limit)
            return data[2:2 + count].decode("latin-1")

        return decode_string
    if data_type == "WSTRING":
        limit = location.length or 0

        def decode_wstring(data: bytes) -> Value:
            count = min(int.from_bytes(data[2:4], "big"), limit)
            try:
                return data[4:4 + 2 * count].decode("utf-16-be")
            except UnicodeDecodeError as exc:
                raise DecodeError(f"not UTF-16 text: {exc.reason}") from None

        return decode_wstring
    if data_type == "DATE_AND_TIME":
        return decode_date_and_time
    if data_type == "TIMER":
        return _decode_timer
    return _decode_counter


def compile_encoder(location: Location) -> Encoder:
    """The callable turning a raw value into the location's bytes; ``ValueError`` for one
    that does not fit (out of range, too long)."""
    data_type = location.data_type
    if data_type == "BOOL":
        mask = 1 << (location.bit or 0)

        def encode_bit(value: Value, current: bytes) -> bytes:
            byte = current[0] | mask if value else current[0] & ~mask & 0xFF
            return bytes([byte])

        return encode_bit
    if data_type in _NUMBERS:
        pack = struct.Struct(_NUMBERS[data_type]).pack
        is_float = data_type in ("REAL", "LREAL")

        def encode_number(value: Value, current: bytes) -> bytes:
            try:
                return pack(float(_number(value)) if is_float else int(_number(value)))
            except struct.error:
                raise ValueError(f"{value} does not fit in a {data_type}") from None

        return encode_number
    if data_type in ("STRING", "WSTRING"):
        limit = location.length or 0
        wide = data_type == "WSTRING"

        def encode_text(value: Value, current: bytes) -> bytes:
            text = str(value)
            if len(text) > limit:
                raise ValueError(f"{len(text)} characters do not fit in {data_type}[{limit}]")
            if wide:
                body = text.encode("utf-16-be")
                return struct.pack(">HH", limit, len(body) // 2) + body.ljust(2 * limit, b"\0")
            try:
                body = text.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError("a STRING holds latin-1 characters only") from None
            return bytes([limit, len(body)]) + body.ljust(limit, b"\0")

        return encode_text
    if data_type == "DATE_AND_TIME":
        return lambda value, current: encode_date_and_time(str(value))
    if data_type == "COUNTER":
        return _encode_counter
    raise ValueError(f"{data_type} values are not written")
