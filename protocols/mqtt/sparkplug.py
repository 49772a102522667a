"""A Sparkplug B 3.0 edge node, without its transport: the state and the messages.

``EdgeNode`` keeps what the edge node has told the host applications (which devices are born,
each metric's alias, datatype and last value) and builds every message it publishes:
NBIRTH and DBIRTH with every metric (name, alias, datatype, current value, timestamp, the unit
as the ``engUnit`` property and the quality as ``Quality``), NDATA and DDATA with the changes
by alias, DDEATH, and the NDEATH that is the connection's will. It numbers them (``seq``
0-255, wrapping; ``bdSeq`` per connection) and decodes the commands it receives (NCMD
``Node Control/Rebirth``, DCMD writes). The MQTT sink (``protocols.mqtt.sparkplug_sink``)
moves the bytes.

How Fieldbridge maps onto Sparkplug:

- the edge node is the bridge (``group_id``/``edge_node_id`` from the sink's configuration);
- a **device** is a Fieldbridge device, or a source without devices (its points then belong
  to the device named after the source);
- a **metric** is a point, named by its point id. Its datatype follows the point's value type,
  else its values (``protocols.mqtt.sparkplug_payload`` says how; 64-bit integers are Int64
  or UInt64, never rounded through a Double);
- **quality** is the property ``Quality`` (Int32), with the OPC DA codes Ignition and Eclipse
  Tahu use: 192 good, 64 uncertain, 0 bad. A bad value is sent as ``is_null``. Every
  configured point is in its device's birth, also one that has no value yet or reads bad
  (``is_null``, with its quality).

A point that appears after its device was born (a templated MQTT point seen for the first
time) or whose value no longer fits its datatype makes the device born again (a new DBIRTH)
before its value is sent: aliases only grow, so the ones already given stay valid.

The metrics are built and parsed by ``protocols.mqtt.sparkplug_payload``, with the protobuf
module compiled from the Eclipse Tahu schema (``sparkplug_b.proto``) at build time.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError as ProtobufDecodeError

from bridge.config.models import ValueType
from bridge.core.model import Event, Value
from bridge.core.sink import PointInfo
from protocols.mqtt.sparkplug_b_pb2 import DataType, Payload
from protocols.mqtt.sparkplug_payload import (
    UNTYPED,
    CommandError,
    Metric,
    birth_metric,
    command_value,
    datatype_of,
    fits,
    metric_label,
    milliseconds,
    set_properties,
    set_value,
)

NAMESPACE = "spBv1.0"
"""The first topic level of every Sparkplug B message."""
BD_SEQ = "bdSeq"
"""The NBIRTH and NDEATH metric that ties a birth to its death."""
REBIRTH = "Node Control/Rebirth"
"""The node metric a host application sets true (NCMD) to ask for a rebirth."""
_NODE_ALIASES = {BD_SEQ: 0, REBIRTH: 1}
"""The node's own metrics; points' aliases follow them."""


class MessageType(enum.StrEnum):
    """The Sparkplug message types an edge node publishes or receives."""

    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    NDATA = "NDATA"
    NCMD = "NCMD"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"
    DDATA = "DDATA"
    DCMD = "DCMD"


@dataclass(frozen=True, slots=True)
class Message:
    """One Sparkplug message to publish."""

    type: MessageType
    topic: str
    payload: bytes
    device: str | None = None
    """The device it is about (D* messages)."""


@dataclass(frozen=True, slots=True)
class Publication:
    """A message that carries some of the events handed to ``EdgeNode.update``."""

    message: Message
    events: tuple[int, ...]
    """Positions, in the events handed in, of those this message carries."""


@dataclass(frozen=True, slots=True)
class Update:
    """What a batch of events gives: the messages that carry them, in publishing order, and
    the events no message carries, by device (it is not born: its next birth has their
    values)."""

    publications: list[Publication]
    absorbed: dict[str, list[int]]


@dataclass(frozen=True, slots=True)
class Rebirth:
    """NCMD ``Node Control/Rebirth``: publish NBIRTH and every DBIRTH again."""


@dataclass(frozen=True, slots=True)
class Write:
    """One metric of a DCMD: write ``value`` to point ``point``."""

    point: str
    value: Value


@dataclass(frozen=True, slots=True)
class DeviceCommand:
    """A DCMD: writes to points of one device, in the order the command lists them."""

    device: str
    writes: tuple[Write, ...]


Command = Rebirth | DeviceCommand


@dataclass(slots=True)
class Device:
    """A Sparkplug device: its metrics by point id, and whether it is born."""

    id: str
    metrics: dict[str, Metric] = field(default_factory=dict)
    born: bool = False


def device_of(point: PointInfo | Event) -> str:
    """The Sparkplug device a point belongs to: its Fieldbridge device, else its source."""
    device = point.device if isinstance(point, PointInfo) else None
    return device if device is not None else point.source


class EdgeNode:
    """One Sparkplug B edge node's state and messages; see the module docstring."""

    def __init__(self, group_id: str, edge_node_id: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.group_id = group_id
        self.edge_node_id = edge_node_id
        self.clock = clock
        self.bd_seq = -1
        """The current connection's birth/death sequence number (0-255); -1 before the first."""
        self.seq = 0
        """The ``seq`` of the last message published in this session."""
        self.devices: dict[str, Device] = {}
        self._aliases: dict[str, int] = {}
        """Point id → alias, for the node's life: a point keeps its alias across rebirths."""
        self._points: dict[int, tuple[str, str]] = {}
        """Alias → (device, point id)."""

    # --- topics ---------------------------------------------------------------------------

    def topic(self, message_type: MessageType, device: str | None = None) -> str:
        """The topic of a message of this edge node (and ``device``, for D* messages)."""
        base = f"{NAMESPACE}/{self.group_id}/{message_type}/{self.edge_node_id}"
        return base if device is None else f"{base}/{device}"

    def command_filters(self) -> tuple[str, str]:
        """The topic filters of the commands for this edge node: NCMD and every DCMD."""
        return (self.topic(MessageType.NCMD), f"{self.topic(MessageType.DCMD)}/+")

    # --- the metrics ----------------------------------------------------------------------

    def load(self, points: Mapping[str, PointInfo], latest: Mapping[str, Event]) -> None:
        """Take the configured points and the latest values (at connect and at every rebirth):
        every point becomes a metric of its device, with a value or without one yet."""
        for point_id, point in points.items():
            event = latest.get(point_id)
            self._define(device_of(point), point_id, point.value_type, point.unit, event)
        for point_id, event in latest.items():
            if point_id not in points:
                self._define(event.source, point_id, None, event.unit, event)

    def _define(self, device_id: str, point_id: str, value_type: ValueType | None,
                unit: str | None, event: Event | None) -> Metric:
        value = event.value if event is not None else None
        device = self.devices.setdefault(device_id, Device(device_id))
        metric = device.metrics.get(point_id)
        if metric is None:
            datatype = datatype_of(value_type, value)
            metric = device.metrics[point_id] = Metric(
                point_id, self._alias(device_id, point_id),
                UNTYPED if datatype is None else datatype, unit)
        elif unit is not None:
            metric.unit = unit
        if event is not None:
            self._observe(metric, event)
        return metric

    def _alias(self, device: str, point_id: str) -> int:
        alias = self._aliases.get(point_id)
        if alias is None:
            alias = self._aliases[point_id] = len(_NODE_ALIASES) + len(self._aliases)
        self._points[alias] = (device, point_id)
        return alias

    @staticmethod
    def _observe(metric: Metric, event: Event) -> bool:
        """Take the event's value; ``False`` when it does not fit the metric's datatype, which
        then follows the value (the device must be born again)."""
        metric.value, metric.quality, metric.ts = event.value, event.quality, event.ts
        if event.unit is not None:
            metric.unit = event.unit
        if fits(metric.datatype, event.value):
            return True
        datatype = datatype_of(None, event.value)
        if datatype is not None:
            metric.datatype = datatype
        return False

    def has_values(self, device_id: str) -> bool:
        """Whether any metric of the device has had a value."""
        device = self.devices.get(device_id)
        return device is not None and any(metric.quality is not None
                                          for metric in device.metrics.values())

    # --- the session ----------------------------------------------------------------------

    def next_session(self) -> Message:
        """A new connection with the next ``bdSeq``: the NDEATH its will carries."""
        return self.start_session((self.bd_seq + 1) % 256)

    def start_session(self, bd_seq: int) -> Message:
        """A new connection with ``bdSeq`` ``bd_seq`` (0-255; the sink keeps it across
        restarts): no device is born yet; the NDEATH its will carries."""
        if not 0 <= bd_seq <= 255:
            raise ValueError(f"bdSeq {bd_seq} is not within 0-255")
        self.bd_seq = bd_seq
        for device in self.devices.values():
            device.born = False
        return self.death()

    def death(self) -> Message:
        """The NDEATH of the current connection (its will, or sent before disconnecting)."""
        payload = Payload(timestamp=milliseconds(self.clock()))
        payload.metrics.append(self._bd_seq_metric())
        return Message(MessageType.NDEATH, self.topic(MessageType.NDEATH),
                       payload.SerializeToString())

    def _bd_seq_metric(self) -> Payload.Metric:
        return Payload.Metric(name=BD_SEQ, alias=_NODE_ALIASES[BD_SEQ], datatype=DataType.Int64,
                              long_value=self.bd_seq, timestamp=milliseconds(self.clock()))

    def birth(self, alive: Set[str]) -> list[Message]:
        """NBIRTH (``seq`` 0) and a DBIRTH for every device in ``alive``: at connect and for a
        rebirth."""
        if self.bd_seq < 0:
            raise RuntimeError("birth before next_session: no bdSeq for the will yet")
        now = milliseconds(self.clock())
        payload = Payload(timestamp=now, seq=0)
        payload.metrics.append(self._bd_seq_metric())
        payload.metrics.append(Payload.Metric(
            name=REBIRTH, alias=_NODE_ALIASES[REBIRTH], datatype=DataType.Boolean,
            boolean_value=False, timestamp=now))
        self.seq = 0
        messages = [Message(MessageType.NBIRTH, self.topic(MessageType.NBIRTH),
                            payload.SerializeToString())]
        for device in self.devices.values():
            device.born = False
            if device.id in alive and device.metrics:
                messages.append(self._device_birth(device))
        return messages

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def _device_birth(self, device: Device) -> Message:
        device.born = True
        payload = Payload(timestamp=milliseconds(self.clock()), seq=self._next_seq())
        for metric in device.metrics.values():
            payload.metrics.append(birth_metric(metric))
        return Message(MessageType.DBIRTH, self.topic(MessageType.DBIRTH, device.id),
                       payload.SerializeToString(), device.id)

    def _device_death(self, device: Device) -> Message:
        device.born = False
        payload = Payload(timestamp=milliseconds(self.clock()), seq=self._next_seq())
        return Message(MessageType.DDEATH, self.topic(MessageType.DDEATH, device.id),
                       payload.SerializeToString(), device.id)

    def set_alive(self, alive: Set[str]) -> list[Message]:
        """The devices whose source or device is up now: a DDEATH for each born device that is
        not, a DBIRTH (with its latest values) for each device that is and was not born."""
        messages = []
        for device in self.devices.values():
            if device.born and device.id not in alive:
                messages.append(self._device_death(device))
            elif not device.born and device.id in alive and device.metrics:
                messages.append(self._device_birth(device))
        return messages

    # --- data -----------------------------------------------------------------------------

    def update(self, events: Sequence[Event], points: Mapping[str, PointInfo]) -> Update:
        """The messages for a batch of stored events, in order: per born device, a DDATA with
        its events (each value by alias), or a DBIRTH when one of its points is new or changed
        datatype. Events of devices that are not born only update the metrics."""
        carried: dict[str, list[int]] = {}
        reborn: set[str] = set()
        absorbed: dict[str, list[int]] = {}
        for position, event in enumerate(events):
            point = points.get(event.point)
            device_id = device_of(point) if point is not None else event.source
            device = self.devices.setdefault(device_id, Device(device_id))
            metric = device.metrics.get(event.point)
            if metric is None:
                self._define(device_id, event.point,
                             point.value_type if point is not None else None,
                             point.unit if point is not None else event.unit, event)
                reborn.add(device_id)
            elif not self._observe(metric, event):
                reborn.add(device_id)
            if device.born:
                carried.setdefault(device_id, []).append(position)
            else:
                absorbed.setdefault(device_id, []).append(position)
        publications = []
        for device_id, positions in carried.items():
            device = self.devices[device_id]
            if device_id in reborn:
                message = self._device_birth(device)
            else:
                message = self._device_data(device, [events[position] for position in positions])
            publications.append(Publication(message, tuple(positions)))
        return Update(publications, absorbed)

    def _device_data(self, device: Device, events: Iterable[Event]) -> Message:
        payload = Payload(timestamp=milliseconds(self.clock()), seq=self._next_seq())
        for event in events:
            metric = device.metrics[event.point]
            data = Payload.Metric(alias=metric.alias, timestamp=milliseconds(event.ts))
            set_value(data, metric.datatype, event.value)
            set_properties(data, None, event.quality)
            payload.metrics.append(data)
        return Message(MessageType.DDATA, self.topic(MessageType.DDATA, device.id),
                       payload.SerializeToString(), device.id)

    # --- commands -------------------------------------------------------------------------

    def command(self, topic: str, payload: bytes) -> Command:
        """What an NCMD or DCMD asks for; ``CommandError`` saying why when it cannot be
        carried out (a malformed payload, another node's topic, an unknown device or metric,
        a value of a type no point takes)."""
        levels = topic.split("/")
        node = [NAMESPACE, self.group_id]
        if levels[:2] != node or len(levels) < 4 or levels[3] != self.edge_node_id:
            raise CommandError(f"topic {topic!r} is not a command for this edge node")
        try:
            message = Payload.FromString(payload)
        except ProtobufDecodeError as exc:
            raise CommandError(f"payload is not a Sparkplug B payload: {exc}") from None
        if levels[2] == MessageType.NCMD and len(levels) == 4:
            return self._node_command(message)
        if levels[2] == MessageType.DCMD and len(levels) == 5:
            return self._device_command(levels[4], message)
        raise CommandError(f"topic {topic!r} is not an NCMD or DCMD topic")

    def _node_command(self, payload: Payload) -> Command:
        for metric in payload.metrics:
            if (metric.name == REBIRTH or (not metric.HasField("name")
                                           and metric.alias == _NODE_ALIASES[REBIRTH])):
                if metric.WhichOneof("value") == "boolean_value" and metric.boolean_value:
                    return Rebirth()
                raise CommandError(f"{REBIRTH} must be the boolean true")
            raise CommandError(f"unknown node metric {metric_label(metric)}")
        raise CommandError("NCMD without metrics")

    def _device_command(self, device_id: str, payload: Payload) -> Command:
        device = self.devices.get(device_id)
        if device is None:
            raise CommandError(f"unknown device {device_id!r}")
        if not payload.metrics:
            raise CommandError("DCMD without metrics")
        writes = []
        for data in payload.metrics:
            metric = None
            if data.HasField("name"):
                metric = device.metrics.get(data.name)
            elif data.HasField("alias"):
                owner = self._points.get(data.alias)
                if owner is not None and owner[0] == device_id:
                    metric = device.metrics.get(owner[1])
            if metric is None:
                raise CommandError(
                    f"device {device_id!r} has no metric {metric_label(data)}")
            datatype = data.datatype if data.HasField("datatype") else metric.datatype
            writes.append(Write(metric.point, command_value(data, datatype)))
        return DeviceCommand(device_id, tuple(writes))
