"""OPC-UA values, status codes, timestamps and errors, turned into what the bridge carries."""

from __future__ import annotations

import logging
import socket
import uuid
from datetime import UTC, datetime

import pytest
from asyncua import ua
from asyncua.ua.uaerrors import BadIdentityTokenRejected, BadTimeout, UaError

from bridge.config.models import ReportSpec, ResolvedPoint
from bridge.core.inverse import compile_inverse_transform
from bridge.core.model import Quality, Reading
from bridge.errors import DecodeError, ErrorCategory, WriteError
from protocols.opcua import OpcuaMapper, OpcuaPoint
from protocols.opcua.mapping import normalize
from protocols.opcua.readings import UNAVAILABLE_STATUSES, quality_of, timestamp_of
from protocols.opcua.session import (
    CATEGORIZED_STATUSES,
    connect_url,
    describe,
    status_category,
)
from protocols.opcua.write import coerce


@pytest.mark.parametrize(("raw", "value"), [
    (21.5, 21.5),
    (7, 7),
    (True, True),
    ("auto", "auto"),
    (ua.VariantType.Int32, 6),
    (ua.LocalizedText("Running", "en"), "Running"),
    (datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC), "2026-01-02T03:04:05.678Z"),
    (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
    (ua.QualifiedName("Boiler", 2), "2:Boiler"),
])
def test_scalars_become_event_values(raw: object, value: object) -> None:
    assert normalize(raw) == value


@pytest.mark.parametrize(("raw", "reason"), [
    ([1.0, 2.0], "array"),
    (b"\x00\x01", "ByteString"),
    (ua.Argument(), "structure"),
    (None, "no value"),
    (float("nan"), "nan"),
])
def test_what_an_event_cannot_carry_is_refused(raw: object, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        normalize(raw)


def resolved(name: str, **spec: object) -> ResolvedPoint:
    point = OpcuaPoint.model_validate({"name": name, **spec})
    return ResolvedPoint(id=f"plc.{name}", source="plc", device=None, spec=point, tags={},
                         report=ReportSpec().merged(point.report), path=("sources", 0))


def reading(address: str, value: object, **fields: object) -> Reading:
    return Reading(source="plc", address=address, value=value, received_at=1000.0,
                   **fields)  # type: ignore[arg-type]


def test_one_node_feeds_every_point_on_it() -> None:
    mapper = OpcuaMapper([resolved("raw", node="ns=2;s=T"),
                          resolved("scaled", node="ns=2;s=T", scale=0.1)], bridge_id="b")
    events = mapper.map(reading("ns=2;s=T", 215, ts=999.5))
    assert [(event.point, event.value, event.ts) for event in events] == [
        ("plc.raw", 215, 999.5), ("plc.scaled", 21.5, 999.5)]
    assert mapper.addresses == ["ns=2;s=T"]


def test_quality_and_reason_are_carried() -> None:
    mapper = OpcuaMapper([resolved("t", path="2:Plant/2:T")], bridge_id="b")
    uncertain = mapper.map(reading("/2:Plant/2:T", 1.5, quality=Quality.UNCERTAIN,
                                   reason="UncertainLastUsableValue"))[0]
    assert (uncertain.value, uncertain.quality, uncertain.reason) == (
        1.5, Quality.UNCERTAIN, "UncertainLastUsableValue")
    bad = mapper.map(reading("/2:Plant/2:T", None, quality=Quality.BAD,
                             reason="BadSensorFailure"))[0]
    assert (bad.value, bad.quality, bad.reason) == (None, Quality.BAD, "BadSensorFailure")
    array = mapper.map(reading("/2:Plant/2:T", [1, 2]))[0]
    assert array.quality is Quality.BAD
    assert "array" in (array.reason or "")


def test_a_reading_for_no_point_is_rejected() -> None:
    mapper = OpcuaMapper([resolved("t", node="ns=2;s=T")], bridge_id="b")
    with pytest.raises(DecodeError, match="no point reads"):
        mapper.map(reading("ns=2;s=Other", 1))


@pytest.mark.parametrize(("code", "quality", "reason"), [
    (ua.StatusCodes.Good, Quality.GOOD, None),
    (ua.StatusCodes.GoodOverload, Quality.GOOD, None),
    (ua.StatusCodes.UncertainSensorNotAccurate, Quality.UNCERTAIN, "UncertainSensorNotAccurate"),
    (ua.StatusCodes.BadNodeIdUnknown, Quality.BAD, "BadNodeIdUnknown"),
])
def test_status_codes_map_to_quality(code: int, quality: Quality, reason: str | None) -> None:
    assert quality_of(ua.StatusCode(code)) == (quality, reason)


def test_timestamps() -> None:
    moment = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert timestamp_of(moment) == moment.timestamp()
    assert timestamp_of(moment.replace(tzinfo=None)) == moment.timestamp()
    assert timestamp_of(datetime(1601, 1, 1, tzinfo=UTC)) is None
    assert timestamp_of(None) is None


def test_errors_are_categorized() -> None:
    assert describe(BadIdentityTokenRejected())[1] is ErrorCategory.AUTH
    assert describe(BadTimeout())[1] is ErrorCategory.TRANSIENT
    assert describe(ConnectionRefusedError(111, "Connection refused")) == (
        "Connection refused", ErrorCategory.TRANSIENT)
    assert describe(OSError(111, "Connect call failed ('127.0.0.1', 1)"))[0] == (
        "Connection refused")
    assert describe(socket.gaierror(-2, "Name or service not known"))[0] == (
        "cannot resolve the host: Name or service not known")
    assert describe(ConnectionError("Connection is closed"))[0] == "Connection is closed"
    assert describe(TimeoutError()) == ("no answer in time", ErrorCategory.TRANSIENT)
    assert describe(UaError("No matching endpoints: x"))[1] is ErrorCategory.CONFIG
    assert status_category("BadCertificateUntrusted") is ErrorCategory.AUTH
    assert status_category("BadSecurityPolicyRejected") is ErrorCategory.CONFIG
    assert status_category("BadDecodingError") is ErrorCategory.PROTOCOL


def test_asyncua_noise_about_a_lost_connection_is_dropped() -> None:
    session = logging.getLogger("asyncua.client.ua_session.UaSession")

    def kept(message: str, exc: BaseException | None) -> bool:
        info = (type(exc), exc, None) if exc is not None else None
        record = session.makeRecord(session.name, logging.ERROR, __file__, 1, message, (),
                                    info)  # type: ignore[arg-type]
        return session.filter(record)

    assert not kept("Publish iteration crashed; retrying in 1s", ConnectionError("closed"))
    assert kept("Publish iteration crashed; retrying in 1s", ValueError("a bug"))
    assert not kept("close_session was called but connection is closed", None)
    assert kept("something else", None)


def test_every_listed_status_exists() -> None:
    listed = CATEGORIZED_STATUSES | UNAVAILABLE_STATUSES
    assert not [name for name in listed if not hasattr(ua.StatusCodes, name)]


@pytest.mark.parametrize(("url", "expected"), [
    ("opc.tcp://plc", "opc.tcp://plc:4840"),
    ("opc.tcp://plc/UA/Server", "opc.tcp://plc:4840/UA/Server"),
    ("opc.tcp://plc:48010/x", "opc.tcp://plc:48010/x"),
    ("opc.tcp://[::1]/x", "opc.tcp://[::1]:4840/x"),
    ("opc.tcp://[::1]:4841", "opc.tcp://[::1]:4841"),
])
def test_the_default_port_is_made_explicit(url: str, expected: str) -> None:
    assert connect_url(url) == expected


def test_writes_undo_the_point_transform_through_the_core() -> None:
    scaled = OpcuaPoint(name="s", node="i=1", scale=0.1, offset=-40)
    assert compile_inverse_transform("p", scaled)(21.5) == pytest.approx(615.0)
    labelled = OpcuaPoint(name="e", node="i=1", enum={0: "off", "1": "on"})
    assert compile_inverse_transform("p", labelled)("on") == 1
    with pytest.raises(WriteError, match="not one of the point's labels"):
        compile_inverse_transform("p", labelled)("maybe")
    with pytest.raises(WriteError, match="the point is scaled"):
        compile_inverse_transform("p", scaled)("warm")


@pytest.mark.parametrize(("value", "variant", "expected"), [
    (True, ua.VariantType.Boolean, True),
    (1, ua.VariantType.Boolean, True),
    (615.0000000001, ua.VariantType.Int16, 615),
    (3, ua.VariantType.Double, 3.0),
    ("x", ua.VariantType.String, "x"),
])
def test_values_are_coerced_to_the_node_type(
    value: object, variant: ua.VariantType, expected: object
) -> None:
    result = coerce("p", value, variant)  # type: ignore[arg-type]
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(("value", "variant", "message"), [
    (256, ua.VariantType.Byte, "outside the range"),
    (1.5, ua.VariantType.Int32, "cannot be written"),
    ("1", ua.VariantType.Double, "cannot be written"),
    (True, ua.VariantType.Float, "cannot be written"),
    (1, ua.VariantType.DateTime, "not supported"),
])
def test_values_the_node_cannot_take(value: object, variant: ua.VariantType,
                                     message: str) -> None:
    with pytest.raises(WriteError, match=message) as refused:
        coerce("p", value, variant)  # type: ignore[arg-type]
    assert refused.value.category is ErrorCategory.CONFIG
