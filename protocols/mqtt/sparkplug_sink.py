"""The MQTT sink with ``format: sparkplug_b``: the bridge as a Sparkplug B 3.0 edge node.

``EdgeNode`` (``protocols.mqtt.sparkplug``) decides what to say; this subclass of the MQTT
sink says it over the sink's connection:

- every connection carries the NDEATH as its will (QoS 1) with the next ``bdSeq``; once the
  broker accepted it and the command subscriptions (NCMD, DCMD; QoS 1), the NBIRTH and the
  DBIRTH of every device whose source (and device) is up go out before the outbox is
  delivered. A clean close publishes the NDEATH itself before disconnecting;
- the outbox becomes DDATA, one message per device and batch, by alias (QoS 0, not retained,
  as Sparkplug requires: a row leaves the outbox once its message was written). Rows of a
  device that is not born are not sent: the device's next DBIRTH carries their values;
- a source or device going down gives its devices a DDEATH, its recovery a fresh DBIRTH, as
  the bridge's status changes (``BridgeView.watch``);
- NCMD ``Node Control/Rebirth`` publishes NBIRTH and the DBIRTHs again; a DCMD writes to
  writable points through the bridge's write path (``BridgeView.write``, audited as
  ``PUT /v1/points/{id}`` is) when the sink is configured with ``commands: true``. Commands
  that cannot be carried out are counted on the sink (``commands_rejected``,
  ``commands_refused``, ``writes_failed``) and ignored; the edge node stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import aiomqtt

from bridge.core.model import Event, Value
from bridge.core.sink import BridgeView, OutboxRow, PointInfo, SinkContext
from bridge.core.status import ConnectionState, EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory, NotWritableError, WriteError, excerpt
from protocols.mqtt.connection import ClientFactory
from protocols.mqtt.sink import MqttSink, OutgoingMessage
from protocols.mqtt.sink_config import MqttSinkConfig
from protocols.mqtt.source import PROTOCOL
from protocols.mqtt.sparkplug import (
    DeviceCommand,
    EdgeNode,
    Message,
    MessageType,
    Rebirth,
)
from protocols.mqtt.sparkplug_payload import CommandError

logger = logging.getLogger(__name__)
audit = logging.getLogger("bridge.audit")
"""Who changed what on a device; the writes themselves are audited by the bridge."""

_ALIVE = frozenset({ConnectionState.UP, ConnectionState.DEGRADED})
"""States in which a source or device serves values: its Sparkplug device is born."""
DATA_QOS = 0
"""Births, data and device deaths: Sparkplug B requires QoS 0."""
DEATH_QOS = 1
"""The NDEATH (will) and the command subscriptions: QoS 1."""
BIRTH_WAIT = 1.0
"""Seconds a device that came up waits for its first values to be stored before it is born
without them (a source reports a device up just before it hands in what it read)."""


def alive_devices(points: Mapping[str, PointInfo],
                  sources: Mapping[str, EndpointStatus]) -> set[str]:
    """The Sparkplug devices whose values are live: those of a source that is up (or
    degraded), and of a Fieldbridge device under it that is up (or degraded)."""
    alive = {source_id for source_id, status in sources.items() if status.state in _ALIVE}
    for point in points.values():
        if point.device is None or point.source not in alive:
            continue
        device = sources[point.source].children.get(point.device)
        if device is None or device.state in _ALIVE:
            alive.add(point.device)
    return alive


class SparkplugSink(MqttSink):
    """The bridge as a Sparkplug B edge node on the MQTT sink's connection."""

    def __init__(self, config: MqttSinkConfig, *, bridge_id: str,
                 client_factory: ClientFactory = aiomqtt.Client,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(config, bridge_id=bridge_id, client_factory=client_factory)
        if config.group_id is None or config.edge_node_id is None:  # the model requires both
            raise ConnectorError(self.endpoint, "Sparkplug B needs group_id and edge_node_id",
                                 ErrorCategory.CONFIG)
        self.node = EdgeNode(config.group_id, config.edge_node_id, clock=clock)
        self._bridge: BridgeView | None = None
        self._status: EndpointStatus | None = None
        self._points: Mapping[str, PointInfo] = {}
        """The configured points the sink takes (``_select_points``)."""
        self._configured: Mapping[str, PointInfo] | None = None
        """The bridge's points ``_points`` was selected from."""
        self._changed = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        self._unwatch: Callable[[], None] | None = None
        self._waiting: dict[str, float] = {}
        """Devices that came up and are not born yet, since when (monotonic seconds)."""
        self._recheck: asyncio.TimerHandle | None = None

    def address(self, event: Event) -> str:
        """The node's DDATA topic for the event's source; the device, and so the topic, is
        settled when the row is published."""
        return self.node.topic(MessageType.DDATA, event.source)

    def details(self) -> dict[str, object]:
        """The MQTT sink's figures, and the edge node's ``bdSeq`` and ``seq``."""
        return {**super().details(), "sparkplug": {
            "group_id": self.node.group_id, "edge_node_id": self.node.edge_node_id,
            "bd_seq": self.node.bd_seq, "seq": self.node.seq,
            "born_devices": sorted(device.id for device in self.node.devices.values()
                                   if device.born)}}

    async def run(self, context: SinkContext) -> None:
        """Take the bridge's view, then run as every MQTT sink does."""
        if context.bridge is None:
            raise ConnectorError(self.endpoint, "a Sparkplug B edge node needs the bridge's "
                                 "points and states: it cannot run in a worker process",
                                 ErrorCategory.CONFIG)
        self._bridge, self._status = context.bridge, context.status
        await super().run(context)

    @property
    def bridge(self) -> BridgeView:
        """The bridge this edge node mirrors (from ``run``)."""
        if self._bridge is None:
            raise ConnectorError(self.endpoint, "not running", ErrorCategory.CONFIG)
        return self._bridge

    def _count(self, counter: str, count: int = 1) -> None:
        if self._status is not None:
            self._status.counters[counter] += count

    # --- the MQTT sink's override points -------------------------------------------------

    def will(self) -> aiomqtt.Will:
        """The NDEATH of the coming connection, with its new ``bdSeq``."""
        death = self.node.next_session()
        return aiomqtt.Will(death.topic, death.payload, qos=DEATH_QOS, retain=False)

    def subscriptions(self) -> Sequence[tuple[str, int]]:
        """NCMD for the node and DCMD for every device of it."""
        return [(topic_filter, DEATH_QOS) for topic_filter in self.node.command_filters()]

    async def on_connected(self) -> None:
        """Publish the births, then follow the bridge's source and device states."""
        self._rebirth()
        self._unwatch = self.bridge.watch(self._changed.set)
        self._follower = asyncio.create_task(self._follow_states(),
                                             name=f"{PROTOCOL}[{self.id}].sparkplug-states")

    def messages(self, rows: Sequence[OutboxRow]) -> Iterable[OutgoingMessage]:
        """DDATA (or a DBIRTH for a device whose metrics changed) per born device of
        ``rows``; the DBIRTH of a device that came up, with these values; the DDEATH of one
        that went down."""
        self._select_points()
        update = self.node.update([Event.from_json(row.body) for row in rows], self._points)
        messages = [self._outgoing(publication.message,
                                   tuple(rows[position].seq for position in publication.events))
                    for publication in update.publications]
        absorbed = update.absorbed
        if not absorbed and not self._changed.is_set():
            return messages
        for message in self._follow(arrived=absorbed.keys()):
            # A device born now carries the rows of its values in this batch.
            carried = (absorbed.pop(message.device, []) if message.device is not None
                       and message.type is MessageType.DBIRTH else [])
            messages.append(self._outgoing(message, tuple(rows[position].seq
                                                          for position in carried)))
        if absorbed:
            self.settle([rows[position].seq for positions in absorbed.values()
                         for position in positions])
        return messages

    async def on_command(self, message: aiomqtt.Message) -> None:
        """Carry out an NCMD or DCMD; one that cannot be is counted and ignored."""
        payload = message.payload
        try:
            if not isinstance(payload, bytes | bytearray):
                raise CommandError("the payload is not binary")
            command = self.node.command(str(message.topic), bytes(payload))
        except CommandError as exc:
            self._count("commands_rejected")
            if self._status is not None:
                self._status.details["last_command_rejection"] = {
                    "topic": str(message.topic), "reason": exc.reason, "at": time.time()}
            logger.debug("sink %s: command on %s ignored: %s", self.id, message.topic,
                         exc.reason)
            return
        if isinstance(command, Rebirth):
            self._count("rebirths")
            self._rebirth()
        else:
            await self._write(command)

    async def on_closing(self) -> None:
        """Say the NDEATH before a clean disconnect, which keeps the broker from sending the
        will."""
        self._stop_following()
        death = self.node.death()
        await self.client.publish(death.topic, death.payload, qos=DEATH_QOS, retain=False)

    async def close(self) -> None:
        """Stop following the bridge's states, then close the connection."""
        self._stop_following()
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        await super().close()

    # --- births, deaths and commands -----------------------------------------------------

    def _outgoing(self, message: Message, seqs: tuple[int, ...] = ()) -> OutgoingMessage:
        return OutgoingMessage(message.topic, message.payload, DATA_QOS, False, seqs)

    def _rebirth(self) -> None:
        """NBIRTH and the DBIRTH of every live device, from the bridge's points and latest
        values as they are now."""
        bridge = self.bridge
        self._select_points()
        selected = self.selector
        self.node.load(self._points, {point_id: event for point_id, event
                                      in bridge.latest().items() if selected(event)})
        self._changed.clear()
        self._waiting.clear()
        alive = alive_devices(self._points, bridge.sources())
        # A device up without any value stored yet (the bridge just started) is born with its
        # first values rather than with nulls.
        ready = {device_id for device_id in alive if self.node.has_values(device_id)}
        for message in self.node.birth(ready):
            self.send(self._outgoing(message))
        self._wait_for(alive - ready)

    def _select_points(self) -> None:
        """Take the configured points the sink's ``sources`` and ``points`` take, again when
        a reload changed them."""
        points = self.bridge.points()
        if self._configured is not points:
            self._configured = points
            takes = self.selector.takes
            self._points = {point_id: point for point_id, point in points.items()
                            if takes(point.source, point_id)}

    def _follow(self, arrived: Iterable[str] = ()) -> list[Message]:
        """DDEATH for the born devices that went down; DBIRTH for those that came up, once
        their values were stored (``arrived``: a batch of events for them is being published)
        or after ``BIRTH_WAIT`` without any."""
        self._changed.clear()
        alive = alive_devices(self._points, self.bridge.sources())
        now = time.monotonic()
        born = {device.id for device in self.node.devices.values() if device.born}
        waiting = self._waiting
        for device_id in list(waiting):
            if device_id not in alive:
                del waiting[device_id]
        for device_id in alive - born:
            waiting.setdefault(device_id, now)
        ready = born & alive | alive & set(arrived) | {
            device_id for device_id, since in waiting.items() if now - since >= BIRTH_WAIT}
        for device_id in ready:
            waiting.pop(device_id, None)
        self._wait_for((), now)
        return self.node.set_alive(ready)

    def _wait_for(self, devices: Iterable[str], now: float | None = None) -> None:
        """Hold the births of ``devices`` until their values arrive, ``BIRTH_WAIT`` at most."""
        now = time.monotonic() if now is None else now
        for device_id in devices:
            self._waiting.setdefault(device_id, now)
        if self._waiting and self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(BIRTH_WAIT, self._wake)

    def _wake(self) -> None:
        self._recheck = None
        self._changed.set()

    async def _follow_states(self) -> None:
        while True:
            await self._changed.wait()
            for message in self._follow():
                self.send(self._outgoing(message))

    def _stop_following(self) -> None:
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        recheck, self._recheck = self._recheck, None
        if recheck is not None:
            recheck.cancel()
        self._waiting.clear()

    async def _write(self, command: DeviceCommand) -> None:
        who = f"Sparkplug sink {self.id} (DCMD to device {command.device})"
        for write in command.writes:
            if not self.config.commands:
                self._refuse(who, write.point, write.value, "commands are off "
                             "(`commands: false` on the sink)")
                continue
            try:
                await self.bridge.write(write.point, write.value, who)
            except KeyError:
                # Not configured (seen through a name template): the bridge has no write
                # path for it.
                self._refuse(who, write.point, write.value, "the point is not configured")
            except NotWritableError:
                self._count("commands_refused")  # the bridge audited it
            except WriteError:
                self._count("writes_failed")
            else:
                self._count("writes")

    def _refuse(self, who: str, point: str, value: Value, reason: str) -> None:
        self._count("commands_refused")
        audit.info("write refused: %s, point %s, value %s: %s", who, point, excerpt(value),
                   reason)
