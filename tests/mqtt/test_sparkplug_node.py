"""The Sparkplug B edge node without a broker: every message it builds is decoded back."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import pytest

from bridge.config.models import ValueType
from bridge.core.model import Event, Quality, Value
from bridge.core.sink import PointInfo
from protocols.mqtt.sparkplug import (
    BD_SEQ,
    REBIRTH,
    DeviceCommand,
    EdgeNode,
    Message,
    MessageType,
    Rebirth,
    Write,
)
from protocols.mqtt.sparkplug_b_pb2 import DataType, Payload
from protocols.mqtt.sparkplug_payload import CommandError

NOW = 1_780_000_000.0


def point(point_id: str, *, source: str = "plant", device: str | None = "boiler",
          unit: str | None = None, writable: bool = False,
          value_type: ValueType | None = "number") -> PointInfo:
    return PointInfo(point_id, source, device, unit, writable, value_type)


def event(point_id: str, value: Value, *, source: str = "plant", quality: Quality = Quality.GOOD,
          unit: str | None = None, ts: float = NOW - 1.0) -> Event:
    return Event(id=f"id-{point_id}-{value}", source=source, point=point_id, value=value,
                 unit=unit, quality=quality, ts=ts, received_at=ts, protocol="modbus",
                 bridge="edge-01")


POINTS: Mapping[str, PointInfo] = {
    "boiler.temp": point("boiler.temp", unit="degC"),
    "boiler.on": point("boiler.on", value_type="bool", writable=True),
    "boiler.count": point("boiler.count", value_type="integer", writable=True),
    "boiler.mode": point("boiler.mode", value_type="string"),
    "boiler.raw": point("boiler.raw", value_type=None),
    "pump.speed": point("pump.speed", device="pump", unit="rpm"),
}
LATEST = {
    "boiler.temp": event("boiler.temp", 64.5, unit="degC"),
    "boiler.on": event("boiler.on", True),
    "boiler.count": event("boiler.count", -3),
    "pump.speed": event("pump.speed", None, quality=Quality.BAD, unit="rpm"),
}


def decode(message: Message) -> Payload:
    return Payload.FromString(message.payload)


def metrics_by_name(payload: Payload) -> dict[str, Payload.Metric]:
    return {metric.name: metric for metric in payload.metrics}


def properties(metric: Payload.Metric) -> dict[str, Any]:
    values = {}
    for key, value in zip(metric.properties.keys, metric.properties.values, strict=True):
        values[key] = getattr(value, str(value.WhichOneof("value")))
    return values


def value_of(metric: Payload.Metric) -> Any:
    kind = metric.WhichOneof("value")
    return None if kind is None else getattr(metric, kind)


@pytest.fixture
def node() -> EdgeNode:
    edge = EdgeNode("plant-group", "edge-01", clock=lambda: NOW)
    edge.load(POINTS, LATEST)
    return edge


def born(node: EdgeNode, alive: set[str] | None = None) -> list[Message]:
    node.next_session()
    return node.birth({"boiler", "pump"} if alive is None else alive)


def test_the_will_is_an_ndeath_whose_bdseq_the_nbirth_repeats(node: EdgeNode) -> None:
    will = node.next_session()
    assert will.type is MessageType.NDEATH
    assert will.topic == "spBv1.0/plant-group/NDEATH/edge-01"
    death = decode(will)
    assert not death.HasField("seq")
    [bd_seq] = death.metrics
    assert (bd_seq.name, bd_seq.datatype, bd_seq.long_value) == (BD_SEQ, DataType.Int64, 0)

    nbirth, *_ = node.birth({"boiler"})
    assert nbirth.topic == "spBv1.0/plant-group/NBIRTH/edge-01"
    birth = decode(nbirth)
    assert birth.seq == 0
    metrics = metrics_by_name(birth)
    assert metrics[BD_SEQ].long_value == 0
    assert metrics[REBIRTH].datatype == DataType.Boolean
    assert metrics[REBIRTH].boolean_value is False


def test_a_session_starts_with_the_bdseq_it_is_given(node: EdgeNode) -> None:
    will = node.start_session(41)
    assert decode(will).metrics[0].long_value == 41
    assert decode(node.next_session()).metrics[0].long_value == 42
    with pytest.raises(ValueError, match="0-255"):
        node.start_session(256)


def test_bdseq_grows_with_each_connection_and_wraps_after_255(node: EdgeNode) -> None:
    seen = []
    for _ in range(258):
        seen.append(decode(node.next_session()).metrics[0].long_value)
    assert seen[:3] == [0, 1, 2]
    assert seen[255:] == [255, 0, 1]
    assert metrics_by_name(decode(node.birth(set())[0]))[BD_SEQ].long_value == 1


def test_dbirth_carries_every_metric_with_alias_datatype_value_time_unit_and_quality(
        node: EdgeNode) -> None:
    nbirth, boiler, pump = born(node)
    assert (boiler.type, boiler.topic) == (MessageType.DBIRTH,
                                          "spBv1.0/plant-group/DBIRTH/edge-01/boiler")
    assert pump.topic == "spBv1.0/plant-group/DBIRTH/edge-01/pump"
    payload = decode(boiler)
    assert payload.seq == 1
    metrics = metrics_by_name(payload)
    # Every configured point is born, boiler.raw too, with neither a declared type nor a
    # value yet: a null Double without a quality (nothing was read).
    assert set(metrics) == {"boiler.temp", "boiler.on", "boiler.count", "boiler.mode",
                            "boiler.raw"}
    raw = metrics["boiler.raw"]
    assert (raw.datatype, raw.is_null, properties(raw)) == (DataType.Double, True, {})
    temp = metrics["boiler.temp"]
    assert (temp.datatype, temp.double_value, temp.timestamp) == (
        DataType.Double, 64.5, (NOW - 1.0) * 1000)
    assert properties(temp) == {"engUnit": "degC", "Quality": 192}
    assert (metrics["boiler.on"].datatype, metrics["boiler.on"].boolean_value) == (
        DataType.Boolean, True)
    count = metrics["boiler.count"]
    assert count.datatype == DataType.Int64
    assert count.long_value == (1 << 64) - 3  # Int64 travels as its two's complement
    mode = metrics["boiler.mode"]
    assert (mode.datatype, mode.is_null, mode.HasField("timestamp")) == (
        DataType.String, True, False)
    assert properties(mode) == {}
    aliases = [metric.alias for metric in payload.metrics]
    assert len(set(aliases)) == len(aliases)
    [speed] = decode(pump).metrics
    assert speed.is_null
    assert properties(speed) == {"engUnit": "rpm", "Quality": 0}
    node_aliases = {metric.alias for metric in decode(nbirth).metrics}
    assert not node_aliases & set(aliases)
    assert speed.alias not in node_aliases | set(aliases)


def test_only_devices_that_are_up_are_born(node: EdgeNode) -> None:
    messages = born(node, {"pump"})
    assert [(message.type, message.device) for message in messages] == [
        (MessageType.NBIRTH, None), (MessageType.DBIRTH, "pump")]


def test_ddata_carries_changes_by_alias_with_their_quality(node: EdgeNode) -> None:
    _, boiler, _ = born(node)
    aliases = {metric.name: metric.alias for metric in decode(boiler).metrics}
    update = node.update([
        event("boiler.temp", 65.0, unit="degC", ts=NOW),
        event("pump.speed", 1450.0, unit="rpm"),
        event("boiler.temp", None, quality=Quality.BAD, ts=NOW + 1),
        event("boiler.on", False, quality=Quality.UNCERTAIN),
    ], POINTS)
    assert update.absorbed == {}
    [boiler_data, pump_data] = update.publications
    assert boiler_data.events == (0, 2, 3)
    assert pump_data.events == (1,)
    assert boiler_data.message.topic == "spBv1.0/plant-group/DDATA/edge-01/boiler"
    payload = decode(boiler_data.message)
    assert payload.seq == 3
    assert decode(pump_data.message).seq == 4
    first, second, third = payload.metrics
    assert not first.HasField("name")
    assert not first.HasField("datatype")
    assert (first.alias, first.double_value, first.timestamp) == (
        aliases["boiler.temp"], 65.0, NOW * 1000)
    assert properties(first) == {"Quality": 192}
    assert (second.alias, second.is_null, properties(second)) == (
        aliases["boiler.temp"], True, {"Quality": 0})
    assert (third.alias, third.boolean_value, properties(third)) == (
        aliases["boiler.on"], False, {"Quality": 64})


def test_seq_runs_to_255_and_wraps_to_0(node: EdgeNode) -> None:
    born(node)
    seqs = []
    for step in range(300):
        [publication] = node.update([event("boiler.temp", float(step))], POINTS).publications
        seqs.append(decode(publication.message).seq)
    assert seqs[0] == 3
    assert seqs[252:255] == [255, 0, 1]
    assert all((later - earlier) % 256 == 1 for earlier, later in itertools.pairwise(seqs))


def test_a_point_seen_after_the_birth_makes_its_device_born_again(node: EdgeNode) -> None:
    born(node)
    update = node.update([event("sensors.t1", 21.5, source="mqtt")], POINTS)
    assert update.publications == []
    assert update.absorbed == {"mqtt": [0]}  # never born: its source is not up
    [mqtt_birth] = node.set_alive({"boiler", "pump", "mqtt"})
    assert mqtt_birth.device == "mqtt"
    [t1] = decode(mqtt_birth).metrics
    assert (t1.datatype, t1.double_value) == (DataType.Double, 21.5)
    # A templated point seen for the first time: the device is born again, aliases kept.
    [reborn] = node.update([event("sensors.t2", 7, source="mqtt")], POINTS).publications
    assert reborn.message.type is MessageType.DBIRTH
    assert reborn.events == (0,)
    metrics = metrics_by_name(decode(reborn.message))
    assert metrics["sensors.t1"].alias == t1.alias
    assert metrics["sensors.t2"].datatype == DataType.Int64  # an integer is an integer
    assert metrics["sensors.t2"].long_value == 7


def test_a_value_that_no_longer_fits_its_datatype_makes_its_device_born_again(
        node: EdgeNode) -> None:
    born(node)
    [first] = node.update([event("boiler.raw", 7)], POINTS).publications
    assert first.message.type is MessageType.DDATA  # born a null Double: 7 is exact in one
    [again] = node.update([event("boiler.raw", "seven")], POINTS).publications
    assert again.message.type is MessageType.DBIRTH
    raw = metrics_by_name(decode(again.message))["boiler.raw"]
    assert (raw.datatype, raw.string_value) == (DataType.String, "seven")
    [data] = node.update([event("boiler.raw", "eight")], POINTS).publications
    assert data.message.type is MessageType.DDATA


def test_64_bit_integers_are_int64_and_uint64_never_rounded(node: EdgeNode) -> None:
    born(node)
    big = (1 << 53) + 1  # the first integer a Double cannot hold
    [reborn] = node.update([event("boiler.raw", big)], POINTS).publications
    assert reborn.message.type is MessageType.DBIRTH
    raw = metrics_by_name(decode(reborn.message))["boiler.raw"]
    assert (raw.datatype, raw.long_value) == (DataType.Int64, big)
    # A typed integer point: Int64 down to its minimum, UInt64 above the Int64 maximum.
    [low] = node.update([event("boiler.count", -(1 << 63))], POINTS).publications
    assert low.message.type is MessageType.DDATA
    assert decode(low.message).metrics[0].long_value == 1 << 63  # two's complement
    [high] = node.update([event("boiler.count", (1 << 64) - 1)], POINTS).publications
    assert high.message.type is MessageType.DBIRTH
    count = metrics_by_name(decode(high.message))["boiler.count"]
    assert (count.datatype, count.long_value) == (DataType.UInt64, (1 << 64) - 1)
    [next_high] = node.update([event("boiler.count", (1 << 63) + 5)], POINTS).publications
    assert next_high.message.type is MessageType.DDATA
    assert decode(next_high.message).metrics[0].long_value == (1 << 63) + 5
    # Untyped and above 2^63 - 1 from its first value on: born a UInt64.
    fresh = EdgeNode("plant-group", "edge-01", clock=lambda: NOW)
    fresh.load({"meter.total": point("meter.total", value_type=None)},
               {"meter.total": event("meter.total", (1 << 64) - 2)})
    fresh.next_session()
    _, meter = fresh.birth({"boiler"})
    [total] = decode(meter).metrics
    assert (total.datatype, total.long_value) == (DataType.UInt64, (1 << 64) - 2)


def test_a_point_bad_from_the_start_is_in_the_birth_null_with_its_quality() -> None:
    edge = EdgeNode("plant-group", "edge-01", clock=lambda: NOW)
    # An untyped point (an OPC-UA variable, say) that has only read bad so far.
    points = {"boiler.level": point("boiler.level", value_type=None, unit="m")}
    edge.load(points, {"boiler.level": event("boiler.level", None, quality=Quality.BAD)})
    edge.next_session()
    _, boiler = edge.birth({"boiler"})
    [level] = decode(boiler).metrics
    assert (level.name, level.datatype, level.is_null) == ("boiler.level", DataType.Double,
                                                           True)
    assert properties(level) == {"engUnit": "m", "Quality": 0}
    # Its first good value is data for the metric born.
    [data] = edge.update([event("boiler.level", 2.5)], points).publications
    assert data.message.type is MessageType.DDATA
    assert decode(data.message).metrics[0].alias == level.alias


def test_a_device_going_down_gets_a_ddeath_and_its_recovery_a_fresh_dbirth(
        node: EdgeNode) -> None:
    born(node)
    [death] = node.set_alive({"pump"})
    assert (death.type, death.topic) == (MessageType.DDEATH,
                                         "spBv1.0/plant-group/DDEATH/edge-01/boiler")
    assert decode(death).seq == 3
    assert decode(death).metrics == []
    assert node.set_alive({"pump"}) == []
    update = node.update([event("boiler.temp", None, quality=Quality.BAD),
                          event("boiler.temp", 70.0)], POINTS)
    assert update.publications == []
    assert update.absorbed == {"boiler": [0, 1]}
    [birth] = node.set_alive({"pump", "boiler"})
    assert birth.type is MessageType.DBIRTH
    payload = decode(birth)
    assert payload.seq == 4
    assert metrics_by_name(payload)["boiler.temp"].double_value == 70.0


def test_a_rebirth_starts_over_at_seq_0_with_the_same_bdseq(node: EdgeNode) -> None:
    born(node)
    node.update([event("boiler.temp", 1.0)], POINTS)
    nbirth, *births = node.birth({"boiler", "pump"})
    assert decode(nbirth).seq == 0
    assert metrics_by_name(decode(nbirth))[BD_SEQ].long_value == 0
    assert [decode(message).seq for message in births] == [1, 2]


def ncmd(*metrics: Payload.Metric) -> bytes:
    return Payload(metrics=list(metrics)).SerializeToString()


NCMD = "spBv1.0/plant-group/NCMD/edge-01"
DCMD = "spBv1.0/plant-group/DCMD/edge-01/boiler"


def test_ncmd_rebirth_by_name_or_by_alias(node: EdgeNode) -> None:
    nbirth, *_ = born(node)
    alias = metrics_by_name(decode(nbirth))[REBIRTH].alias
    assert node.command(NCMD, ncmd(Payload.Metric(name=REBIRTH, boolean_value=True))) == Rebirth()
    assert node.command(NCMD, ncmd(Payload.Metric(alias=alias, boolean_value=True))) == Rebirth()


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    (NCMD, b"\xff\xff\xff", "not a Sparkplug B payload"),
    (NCMD, ncmd(Payload.Metric(name=REBIRTH, boolean_value=False)), "boolean true"),
    (NCMD, ncmd(Payload.Metric(name=REBIRTH, string_value="yes")), "boolean true"),
    (NCMD, ncmd(Payload.Metric(name="Node Control/Reboot", boolean_value=True)),
     "unknown node metric"),
    (NCMD, ncmd(), "without metrics"),
    ("spBv1.0/plant-group/NCMD/edge-02", ncmd(), "not a command for this edge node"),
    ("spBv1.0/other/NCMD/edge-01", ncmd(), "not a command for this edge node"),
    ("spBv1.0/plant-group/DDATA/edge-01/boiler", ncmd(), "not an NCMD or DCMD"),
    ("spBv1.0/plant-group/DCMD/edge-01/kettle",
     ncmd(Payload.Metric(name="boiler.on", boolean_value=True)), "unknown device"),
    (DCMD, ncmd(Payload.Metric(name="pump.speed", double_value=1.0)), "has no metric"),
    (DCMD, ncmd(Payload.Metric(alias=4242, double_value=1.0)), "has no metric with alias"),
    (DCMD, ncmd(Payload.Metric(name="boiler.on", is_null=True)), "carries no value"),
    (DCMD, ncmd(Payload.Metric(name="boiler.on", string_value="on")),
     "a string value as datatype Boolean"),
    (DCMD, ncmd(Payload.Metric(name="boiler.temp", double_value=float("nan"))),
     "not a finite number"),
    (DCMD, ncmd(), "without metrics"),
])
def test_commands_that_cannot_be_carried_out_say_why(node: EdgeNode, topic: str,
                                                     payload: bytes, reason: str) -> None:
    born(node)
    with pytest.raises(CommandError, match=reason):
        node.command(topic, payload)


def test_dcmd_decodes_writes_by_name_and_alias(node: EdgeNode) -> None:
    _, boiler, _ = born(node)
    aliases = {metric.name: metric.alias for metric in decode(boiler).metrics}
    command = node.command(DCMD, ncmd(
        Payload.Metric(name="boiler.on", datatype=DataType.Boolean, boolean_value=False),
        Payload.Metric(alias=aliases["boiler.count"], long_value=(1 << 64) - 5),
        Payload.Metric(name="boiler.count", datatype=DataType.Int16, int_value=0xFFFE),
        Payload.Metric(name="boiler.count", datatype=DataType.UInt32, int_value=0xFFFE),
        Payload.Metric(name="boiler.temp", datatype=DataType.Float, float_value=55.5),
        Payload.Metric(name="boiler.mode", string_value="auto"),
    ))
    assert command == DeviceCommand("boiler", (
        Write("boiler.on", False), Write("boiler.count", -5), Write("boiler.count", -2),
        Write("boiler.count", 0xFFFE), Write("boiler.temp", 55.5), Write("boiler.mode", "auto"),
    ))


def test_a_dcmd_alias_of_another_device_is_not_taken(node: EdgeNode) -> None:
    _, _, pump = born(node)
    [speed] = decode(pump).metrics
    with pytest.raises(CommandError, match="has no metric with alias"):
        node.command(DCMD, ncmd(Payload.Metric(alias=speed.alias, double_value=1.0)))


def test_command_filters_cover_the_node_and_its_devices(node: EdgeNode) -> None:
    assert node.command_filters() == ("spBv1.0/plant-group/NCMD/edge-01",
                                      "spBv1.0/plant-group/DCMD/edge-01/+")


def test_a_birth_needs_a_session_first() -> None:
    with pytest.raises(RuntimeError, match="next_session"):
        EdgeNode("g", "n").birth(set())
