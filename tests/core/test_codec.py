"""The shared value codec: registers and bytes to values and back."""

from __future__ import annotations

import math
import struct

import pytest

from bridge.core.codec import (
    BYTE_ORDERS,
    DataType,
    compile_bytes_decoder,
    compile_register_decoder,
    compile_register_encoder,
    register_count,
)
from bridge.core.model import Value
from bridge.errors import DecodeError

SAMPLES: dict[DataType, list[Value]] = {
    "bool": [True, False],
    "int16": [0, 1, -1, 32767, -32768, 0x1234],
    "uint16": [0, 1, 65535, 0x1234],
    "int32": [0, -1, 2**31 - 1, -(2**31), 0x12345678],
    "uint32": [0, 2**32 - 1, 0x12345678, 123456789],
    "int64": [0, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF0 - 2**63],
    "uint64": [0, 2**64 - 1, 0x0123456789ABCDEF],
    "float32": [0.0, 1.5, -2.25, 123.456, 3.4e38, math.inf],
    "float64": [0.0, 1.5, -2.25, 123.456, 1e300, -math.inf],
}
NUMERIC = [name for name in SAMPLES if name != "bool"]


def _same(decoded: Value, value: Value, data_type: str) -> bool:
    if data_type == "float32":
        assert isinstance(decoded, float)
        assert isinstance(value, float)
        return decoded == struct.unpack(">f", struct.pack(">f", value))[0]
    return decoded == value


@pytest.mark.parametrize("order", BYTE_ORDERS)
@pytest.mark.parametrize("data_type", list(SAMPLES))
def test_register_round_trip_every_type_and_order(data_type: DataType, order: str) -> None:
    encode = compile_register_encoder(data_type, order)
    decode = compile_register_decoder(data_type, order)
    for value in SAMPLES[data_type]:
        registers = encode(value)
        assert len(registers) == register_count(data_type)
        assert all(0 <= register <= 0xFFFF for register in registers)
        assert _same(decode(registers), value, data_type), (value, registers)


@pytest.mark.parametrize("order", BYTE_ORDERS)
@pytest.mark.parametrize("data_type", NUMERIC)
def test_bytes_decoder_agrees_with_registers(data_type: DataType, order: str) -> None:
    encode = compile_register_encoder(data_type, order)
    decode = compile_bytes_decoder(data_type, order)
    for value in SAMPLES[data_type]:
        raw = struct.pack(f">{register_count(data_type)}H", *encode(value))
        assert _same(decode(raw), value, data_type)


# float32 123.456 is 0x42F6E979; each order names the byte sequence on the wire.
@pytest.mark.parametrize(
    ("order", "registers"),
    [
        ("ABCD", [0x42F6, 0xE979]),
        ("CDAB", [0xE979, 0x42F6]),
        ("BADC", [0xF642, 0x79E9]),
        ("DCBA", [0x79E9, 0xF642]),
    ],
)
def test_float32_known_vectors(order: str, registers: list[int]) -> None:
    assert compile_register_decoder("float32", order)(registers) == pytest.approx(123.456)
    assert compile_register_encoder("float32", order)(123.456) == registers


@pytest.mark.parametrize(
    ("order", "registers"),
    [
        ("ABCDEFGH", [0x0102, 0x0304, 0x0506, 0x0708]),
        ("GHEFCDAB", [0x0708, 0x0506, 0x0304, 0x0102]),
        ("BADCFEHG", [0x0201, 0x0403, 0x0605, 0x0807]),
        ("HGFEDCBA", [0x0807, 0x0605, 0x0403, 0x0201]),
        # The 4-letter names mean the same swaps on 64-bit values.
        ("CDAB", [0x0708, 0x0506, 0x0304, 0x0102]),
        ("DCBA", [0x0807, 0x0605, 0x0403, 0x0201]),
    ],
)
def test_uint64_known_vectors(order: str, registers: list[int]) -> None:
    assert compile_register_decoder("uint64", order)(registers) == 0x0102030405060708


def test_uint32_cdab_energy_counter() -> None:
    # A meter's 1234567 Wh (0x0012D687), low word first.
    assert compile_register_decoder("uint32", "CDAB")([0xD687, 0x0012]) == 1234567


def test_16_bit_values_only_swap_bytes() -> None:
    assert compile_register_decoder("int16", "ABCD")([0xFFFE]) == -2
    assert compile_register_decoder("int16", "CDAB")([0xFFFE]) == -2
    assert compile_register_decoder("uint16", "BADC")([0x3412]) == 0x1234
    assert compile_register_decoder("uint16", "DCBA")([0x3412]) == 0x1234


def test_bits_in_a_register() -> None:
    status = [0b1000_0000_0000_0101]
    assert [compile_register_decoder("uint16", bit=bit)(status) for bit in range(16)] == [
        True, False, True] + [False] * 12 + [True]
    # Bits count from the least significant bit of the value after the byte order.
    assert compile_register_decoder("uint16", "BADC", bit=0)([0x0100]) is True
    assert compile_register_decoder("bool", bit=15)([0x8000]) is True
    with pytest.raises(ValueError, match="16-bit"):
        compile_register_decoder("float32", bit=1)
    with pytest.raises(ValueError, match=r"0\.\.15"):
        compile_register_decoder("uint16", bit=16)


def test_bool_register_is_non_zero() -> None:
    decode = compile_register_decoder("bool")
    assert decode([0]) is False
    assert decode([7]) is True


def test_string_decoding() -> None:
    decode = compile_register_decoder("string", length=4)
    assert decode([0x4142, 0x4344, 0x2020, 0x2020]) == "ABCD"
    assert decode([0x4142, 0x4300, 0x0000, 0x0000]) == "ABC"
    # The text ends at the first NUL even if the buffer holds leftovers after it.
    assert decode([0x4142, 0x0058, 0x5858, 0x5858]) == "AB"
    assert compile_register_decoder("string", "BADC", length=2)([0x4241, 0x0043]) == "ABC"
    assert decode([0xC3A9, 0x7465, 0, 0]) == "éte"


def test_string_utf8() -> None:
    decode = compile_register_decoder("string", length=3)
    assert decode(compile_register_encoder("string", length=3)("°C ok")) == "°C ok"
    with pytest.raises(DecodeError, match="UTF-8"):
        decode([0xFFFE, 0, 0])


def test_string_rejects_word_swaps_and_overflow() -> None:
    with pytest.raises(ValueError, match="ABCD or BADC"):
        compile_register_decoder("string", "CDAB", length=2)
    with pytest.raises(ValueError, match="does not fit"):
        compile_register_encoder("string", length=2)("too long")
    with pytest.raises(ValueError, match="length"):
        register_count("string")


def test_wrong_number_of_registers() -> None:
    with pytest.raises(DecodeError, match="float32 needs 2 registers, got 1"):
        compile_register_decoder("float32", "CDAB")([0x42F6])
    with pytest.raises(DecodeError, match="needs 4 registers, got 5"):
        compile_register_decoder("string", length=4)([0] * 5)
    with pytest.raises(DecodeError, match="float64 needs 8 bytes, got 7"):
        compile_bytes_decoder("float64")(b"\x00" * 7)


def test_register_out_of_range() -> None:
    with pytest.raises(DecodeError, match="out of range"):
        compile_register_decoder("uint32")([0x1_0000, 0])
    with pytest.raises(DecodeError, match="out of range"):
        compile_register_decoder("uint16")([-1])


def test_nan_passes_to_the_transform() -> None:
    nan = compile_register_decoder("float32")([0x7FC0, 0x0000])
    assert isinstance(nan, float)
    assert math.isnan(nan)


def test_encoder_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="out of range"):
        compile_register_encoder("uint16")(70000)
    with pytest.raises(ValueError, match="out of range"):
        compile_register_encoder("int16")(-40000)
    with pytest.raises(ValueError, match="cannot hold"):
        compile_register_encoder("int32")(1.5)
    assert compile_register_encoder("int32")(2.0) == [0, 2]
    with pytest.raises(ValueError, match="expected a number"):
        compile_register_encoder("float32")("1.5")
    with pytest.raises(ValueError, match="expected a number"):
        compile_register_encoder("uint16")(True)
    with pytest.raises(ValueError, match="read-modify-write"):
        compile_register_encoder("uint16", bit=3)


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown byte order"):
        compile_register_decoder("uint32", "ABDC")
    with pytest.raises(ValueError, match="unknown data type"):
        register_count("int8")  # type: ignore[arg-type]


def test_bytes_decoder_bool_and_strings() -> None:
    assert compile_bytes_decoder("bool")(b"\x01") is True
    assert compile_bytes_decoder("bool")(b"\x00") is False
    with pytest.raises(DecodeError, match="1 byte"):
        compile_bytes_decoder("bool")(b"\x00\x01")
    assert compile_bytes_decoder("string")(b"pump 1\x00\x00") == "pump 1"
    assert compile_bytes_decoder("string", "BADC")(b"BADC") == "ABCD"
    with pytest.raises(DecodeError, match="even"):
        compile_bytes_decoder("string", "BADC")(b"ABC")
    with pytest.raises(DecodeError, match="needs 4 bytes"):
        compile_bytes_decoder("string", length=4)(b"AB")
    # Fully little endian float, as many MQTT devices send it.
    assert compile_bytes_decoder("float32", "DCBA")(struct.pack("<f", 2.5)) == 2.5
