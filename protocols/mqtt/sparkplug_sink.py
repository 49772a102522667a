"""The MQTT sink with ``format: sparkplug_b``: the bridge as a Sparkplug B 3.0 edge node.

``EdgeNode`` (``protocols.mqtt.sparkplug``) decides what to say; this subclass of the MQTT
sink says it over the sink's connection:

- every connection carries the NDEATH as its will (QoS 1) with the next ``bdSeq``, kept in
  the state directory (``sparkplug/<sink id>.json``) before the connection is opened, so it
  goes on from the last one across restarts; a connection the broker never accepted (a
  refused TCP connect) does not use one up. Once the broker accepted it and the command
  subscriptions (NCMD, DCMD; QoS 1), the NBIRTH and the DBIRTH of every device whose source
  (and device) is up go out before the outbox is delivered. A clean close publishes the
  NDEATH itself before disconnecting;
- with ``primary_host``, the births wait until that host application's ``STATE`` says it is
  online; when it says offline, the connection ends (NDEATH, disconnect) and events wait in
  the outbox until a new connection finds the host online again and is born;
- the outbox becomes DDATA, one message per device and batch, by alias (QoS 0, not retained,
  as Sparkplug requires: a row leaves the outbox once its message was written). Rows of a
  device that is not born are not sent: the device's next DBIRTH carries their values;
- a source or device going down gives its devices a DDEATH, its recovery a fresh DBIRTH, as
  the bridge's status changes (``BridgeView.watch``);
- NCMD ``Node Control/Rebirth`` publishes NBIRTH and the DBIRTHs again, at most once per
  ``rebirth_interval`` (requests in between are folded into one rebirth at its end); a DCMD
  writes to writable points through the bridge's write path (``BridgeView.write_command``,
  one audit record per command) when the sink is configured with ``commands: true``. Each
  device has its own queue of commands (``COMMAND_BACKLOG`` at most), so a slow device holds
  up only its own later commands, in order. Commands that cannot be carried out are counted
  on the sink (``commands_rejected``, ``commands_refused``, ``commands_dropped``,
  ``writes_failed``) and ignored; the edge node stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import aiomqtt

from bridge.core.counters import (
    COMMANDS_DROPPED,
    COMMANDS_REFUSED,
    COMMANDS_REJECTED,
    REBIRTH_REQUESTS,
    REBIRTHS,
    REBIRTHS_FOLDED,
    WRITES,
    WRITES_FAILED,
    CounterSpec,
)
from bridge.core.model import Event, Value
from bridge.core.sink import BridgeView, OutboxRow, PointInfo, SinkContext
from bridge.core.status import EndpointStatus
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
from protocols.mqtt.sparkplug_session import (
    BdSeqFile,
    PrimaryHost,
    RebirthPacer,
    WatchedLink,
    alive_devices,
    parse_state,
)

logger = logging.getLogger(__name__)
audit = logging.getLogger("bridge.audit")
"""Who changed what on a device; the writes themselves are audited by the bridge."""

DATA_QOS = 0
"""Births, data and device deaths: Sparkplug B requires QoS 0."""
DEATH_QOS = 1
"""The NDEATH (will) and the command subscriptions: QoS 1."""
COMMAND_BACKLOG = 100
"""DCMDs waiting for their device, at most; one more is dropped and counted."""
BIRTH_WAIT = 1.0
"""Seconds a device that came up waits for its first values to be stored before it is born
without them (a source reports a device up just before it hands in what it read)."""


class SparkplugSink(MqttSink):
    """The bridge as a Sparkplug B edge node on the MQTT sink's connection."""

    def __init__(self, config: MqttSinkConfig, *, bridge_id: str,
                 client_factory: ClientFactory = aiomqtt.Client,
                 clock: Callable[[], float] = time.time,
                 state_dir: Path | None = None) -> None:
        super().__init__(config, bridge_id=bridge_id, client_factory=client_factory)
        if config.group_id is None or config.edge_node_id is None:  # the model requires both
            raise ConnectorError(self.endpoint, "Sparkplug B needs group_id and edge_node_id",
                                 ErrorCategory.CONFIG)
        self.node = EdgeNode(config.group_id, config.edge_node_id, clock=clock)
        self._bd_seq_file = (None if state_dir is None else BdSeqFile(
            state_dir / "sparkplug" / f"{config.id}.json", config.group_id,
            config.edge_node_id))
        last = self._bd_seq_file.load() if self._bd_seq_file is not None else None
        self._bd_seq = -1 if last is None else last
        """The ``bdSeq`` of the coming (or current) connection's will."""
        self._bd_seq_spent = True
        """Whether a broker took the will with ``_bd_seq``: the next connection takes the
        next one. A connection refused before the broker accepted it keeps it."""
        self.primary_host = (PrimaryHost(config.primary_host)
                             if config.primary_host is not None else None)
        self._pacer = RebirthPacer(config.rebirth_interval, self._rebirth_due)
        self._rebirth_wanted = False
        self._born = False
        """The NBIRTH of this connection went out: commands and STATE changes are live."""
        self._commands: dict[str, asyncio.Queue[DeviceCommand]] = {}
        self._command_workers: dict[str, asyncio.Task[None]] = {}
        self._link: WatchedLink | None = None
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
                                   if device.born),
            "primary_host": (self.primary_host.details()
                             if self.primary_host is not None else None)}}

    @property
    def bridge(self) -> BridgeView:
        """The bridge this edge node mirrors (from ``connect``)."""
        if self._bridge is None:
            raise ConnectorError(self.endpoint, "not running", ErrorCategory.CONFIG)
        return self._bridge

    def _count(self, counter: CounterSpec, count: int = 1) -> None:
        if self._status is not None:
            self._status.counters.add(counter, count)

    # --- the MQTT sink's override points -------------------------------------------------

    async def connect(self, context: SinkContext) -> None:
        """Take the bridge's view, keep the ``bdSeq`` of this connection's will (the next one,
        unless no broker took the last one), then connect as every MQTT sink does."""
        if context.bridge is None:
            raise ConnectorError(self.endpoint, "a Sparkplug B edge node needs the bridge's "
                                 "points and states: it cannot run in a worker process",
                                 ErrorCategory.CONFIG)
        self._bridge, self._status = context.bridge, context.status
        if self._bd_seq_spent:
            bd_seq = (self._bd_seq + 1) % 256
            if self._bd_seq_file is not None:
                try:
                    await asyncio.to_thread(self._bd_seq_file.save, bd_seq)
                except OSError as exc:
                    raise ConnectorError(self.endpoint, f"cannot keep the Sparkplug bdSeq in "
                                         f"{self._bd_seq_file.path}: {exc}",
                                         ErrorCategory.TRANSIENT) from exc
            self._bd_seq, self._bd_seq_spent = bd_seq, False
        watched = self._link = WatchedLink(context)
        try:
            await super().connect(watched)
        finally:
            self._bd_seq_spent = self._accepted()

    def _accepted(self) -> bool:
        """Whether the broker accepted the connection (and so holds its will)."""
        try:
            return self.client is not None
        except ConnectorError:
            return False

    def will(self) -> aiomqtt.Will:
        """The NDEATH of the coming connection, with its ``bdSeq``."""
        death = self.node.start_session(self._bd_seq)
        return aiomqtt.Will(death.topic, death.payload, qos=DEATH_QOS, retain=False)

    def subscriptions(self) -> Sequence[tuple[str, int]]:
        """NCMD for the node and DCMD for every device of it; the primary host's STATE."""
        filters = [(topic_filter, DEATH_QOS) for topic_filter in self.node.command_filters()]
        if self.primary_host is not None:
            filters.append((self.primary_host.topic, DEATH_QOS))
        return filters

    async def on_connected(self) -> None:
        """Wait for the primary host to be online (with ``primary_host``), publish the
        births, then follow the bridge's source and device states."""
        host = self.primary_host
        if host is not None and not host.online.is_set():
            if self._status is not None:
                self._status.degraded(f"waiting for the primary host application "
                                      f"{host.host_id!r} to be online (its STATE)",
                                      ErrorCategory.TRANSIENT)
            await self._until_online(host)
        self._rebirth()
        self._born = True
        self._unwatch = self.bridge.watch(self._changed.set)
        self._follower = asyncio.create_task(self._follow_states(),
                                             name=f"{PROTOCOL}[{self.id}].sparkplug-states")

    async def _until_online(self, host: PrimaryHost) -> None:
        """Wait for the host's STATE online; ``ConnectorError`` when the connection is lost
        first."""
        assert self._link is not None
        name = f"{PROTOCOL}[{self.id}]"
        waits = (asyncio.create_task(host.online.wait(), name=f"{name}.primary-host"),
                 asyncio.create_task(self._link.lost.wait(), name=f"{name}.lost"))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if not host.online.is_set():
            raise ConnectorError(self.endpoint, "the connection was lost while waiting for the "
                                 f"primary host application {host.host_id!r}",
                                 ErrorCategory.TRANSIENT)

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
        """Take a STATE of the primary host, or carry out an NCMD or DCMD; one that cannot
        be is counted and ignored. Never waits for a device: a DCMD joins its device's
        queue."""
        payload = message.payload
        topic = str(message.topic)
        try:
            if not isinstance(payload, bytes | bytearray):
                raise CommandError("the payload is not binary")
            if self.primary_host is not None and topic == self.primary_host.topic:
                self._host_state(bytes(payload))
                return
            command = self.node.command(topic, bytes(payload))
        except CommandError as exc:
            self._reject(topic, exc.reason)
            return
        if not self._born:
            self._reject(topic, "the edge node is not born yet")
        elif isinstance(command, Rebirth):
            self._count(REBIRTH_REQUESTS)
            if not self._pacer.request():
                self._count(REBIRTHS_FOLDED)
        else:
            self._queue(command)

    def _reject(self, topic: str, reason: str) -> None:
        self._count(COMMANDS_REJECTED)
        if self._status is not None:
            self._status.details["last_command_rejection"] = {
                "topic": topic, "reason": reason, "at": time.time()}
        logger.debug("sink %s: command on %s ignored: %s", self.id, topic, reason)

    def _host_state(self, payload: bytes) -> None:
        """A STATE of the primary host: while born, offline ends the connection."""
        host = self.primary_host
        assert host is not None
        try:
            state = parse_state(payload)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if host.take(state) and not state.online and self._born:
            raise ConnectorError(self.endpoint, f"the primary host application "
                                 f"{host.host_id!r} is offline: the events wait in the "
                                 "outbox until it is back", ErrorCategory.TRANSIENT)

    def _queue(self, command: DeviceCommand) -> None:
        queue = self._commands.get(command.device)
        if queue is None:
            queue = self._commands[command.device] = asyncio.Queue(COMMAND_BACKLOG)
            self._command_workers[command.device] = asyncio.create_task(
                self._carry_out(queue),
                name=f"{PROTOCOL}[{self.id}].dcmd[{command.device}]")
        try:
            queue.put_nowait(command)
        except asyncio.QueueFull:
            self._count(COMMANDS_DROPPED)
            self._reject(self.node.topic(MessageType.DCMD, command.device),
                         f"{COMMAND_BACKLOG} commands already wait for the device")

    async def _carry_out(self, queue: asyncio.Queue[DeviceCommand]) -> None:
        while True:
            command = await queue.get()
            await self._write(command)

    async def on_closing(self) -> None:
        """Say the NDEATH before a clean disconnect, which keeps the broker from sending the
        will."""
        self._stop_following()
        self._born = False
        death = self.node.death()
        await self.client.publish(death.topic, death.payload, qos=DEATH_QOS, retain=False)

    async def close(self) -> None:
        """Stop following the bridge's states and carrying out commands, then close the
        connection."""
        self._stop_following()
        self._born = False
        tasks = [task for task in (self._follower, *self._command_workers.values())
                 if task is not None]
        self._follower = None
        self._commands.clear()
        self._command_workers.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
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

    def _rebirth_due(self) -> None:
        """The rebirth pacer's turn: the follower publishes it."""
        self._rebirth_wanted = True
        self._changed.set()

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
            if self._rebirth_wanted:
                self._rebirth_wanted = False
                self._count(REBIRTHS)
                self._rebirth()
                continue
            for message in self._follow():
                self.send(self._outgoing(message))

    def _stop_following(self) -> None:
        self._pacer.cancel()
        self._rebirth_wanted = False
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        recheck, self._recheck = self._recheck, None
        if recheck is not None:
            recheck.cancel()
        self._waiting.clear()

    async def _write(self, command: DeviceCommand) -> None:
        """Carry out a DCMD's writes, in order: one audit record for the command."""
        who = f"Sparkplug sink {self.id} (DCMD to device {command.device})"
        writes = [(write.point, write.value) for write in command.writes]
        if not self.config.commands:
            self._count(COMMANDS_REFUSED, len(writes))
            points = ", ".join(point for point, _ in writes[:10])
            if len(writes) == 1:
                self._refuse(who, writes[0][0], writes[0][1], "commands are off "
                             "(`commands: false` on the sink)")
            else:
                audit.info("write refused: %s, %d points (%s%s): commands are off "
                           "(`commands: false` on the sink)", who, len(writes), points,
                           ", ..." if len(writes) > 10 else "")
            return
        if len(writes) == 1:
            outcomes = [await self._write_one(who, *writes[0])]
        else:
            outcomes = await self.bridge.write_command(writes, who)
        for outcome in outcomes:
            if outcome is None:
                self._count(WRITES)
            elif isinstance(outcome, KeyError | NotWritableError):
                self._count(COMMANDS_REFUSED)
            else:
                self._count(WRITES_FAILED)

    async def _write_one(self, who: str, point: str, value: Value) -> Exception | None:
        """One write, audited as ``PUT /v1/points/{id}`` is."""
        try:
            await self.bridge.write(point, value, who)
        except KeyError as exc:
            # Not configured (seen through a name template): the bridge has no write path
            # for it.
            audit.info("write refused: %s, point %s, value %s: %s", who, point,
                       excerpt(value), "the point is not configured")
            return exc
        except (NotWritableError, WriteError) as exc:  # the bridge audited it
            return exc
        return None

    def _refuse(self, who: str, point: str, value: Value, reason: str) -> None:
        audit.info("write refused: %s, point %s, value %s: %s", who, point, excerpt(value),
                   reason)
