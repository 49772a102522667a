"""Every status counter, declared once: its name, what it counts, its unit and its help text.

The inventory JSON (``counters`` of a source, device or sink), the worker processes' status
frames and ``/metrics`` all derive from these declarations; nothing else names a counter.
A status keeps its counts in a :class:`Counts`, which takes declared counters only: counting,
reading or mirroring a name nobody declared raises :class:`UndeclaredCounterError` at once.

The rule: every counter of the bridge and of the connectors shipped with it (Modbus, OPC-UA,
MQTT with Sparkplug B, AMQP) is declared below, in this one module, so that ``/metrics`` and
the README's counter table know all of them whichever protocols a daemon loads. Only a
connector installed as a plugin declares its own counters, with :func:`declare` when its
module is imported.

May import: the standard library only.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


class Owner(enum.StrEnum):
    """What keeps a counter: it is shown there in the inventory and in ``/metrics``."""

    SOURCE = "source"
    DEVICE = "device"
    SINK = "sink"
    ROUTER = "router"
    STREAM = "stream"
    SERVER = "server"


_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True, slots=True, eq=False)
class CounterSpec:
    """One declared counter. ``unit`` is what one count is (a reading, a message, a wait).

    Made by :func:`declare` only, once per name: two specs are the same counter when they
    are the same object.
    """

    name: str
    help: str
    unit: str
    owners: frozenset[Owner]

    def metric(self, prefix: str) -> str:
        """The Prometheus counter's name under ``prefix`` (``fieldbridge_source``)."""
        return f"{prefix}_{self.name}_total"


class UndeclaredCounterError(KeyError):
    """A counter name that no :func:`declare` call made."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"counter {self.name!r} is not declared (bridge.core.counters.declare)"


_DECLARED: dict[str, CounterSpec] = {}


def declare(name: str, help: str, *owners: Owner, unit: str) -> CounterSpec:
    """Declare a counter once; declaring the same name again with another meaning is an error
    (with the same meaning, more owners are added to the one declaration)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"counter name {name!r}: lower-case letters, digits and _ only")
    if not help.strip() or not unit.strip() or not owners:
        raise ValueError(f"counter {name!r} needs a help text, a unit and an owner")
    known = _DECLARED.get(name)
    if known is None:
        known = _DECLARED[name] = CounterSpec(name, help, unit, frozenset(owners))
        return known
    if known.help != help or known.unit != unit:
        raise ValueError(f"counter {name!r} is declared twice with different meanings")
    if not frozenset(owners) <= known.owners:
        # The one object stays: constants taken from the first declaration keep counting.
        object.__setattr__(known, "owners", known.owners | frozenset(owners))
    return known


def declared(name: str) -> CounterSpec:
    """The declaration of ``name``; :class:`UndeclaredCounterError` when there is none."""
    try:
        return _DECLARED[name]
    except KeyError:
        raise UndeclaredCounterError(name) from None


def declarations(owner: Owner | None = None) -> list[CounterSpec]:
    """Every declared counter (of ``owner``), by name."""
    return sorted((spec for spec in _DECLARED.values() if owner is None or owner in spec.owners),
                  key=lambda spec: spec.name)


def _checked(counter: CounterSpec | str) -> CounterSpec:
    if isinstance(counter, str):
        return declared(counter)
    if _DECLARED.get(counter.name) is not counter:
        raise UndeclaredCounterError(counter.name)
    return counter


TABLE_START = "<!-- counters:start (generated from bridge/core/counters.py) -->"
TABLE_END = "<!-- counters:end -->"


def markdown_table() -> str:
    """Every declared counter as the README's Markdown table, between its markers."""
    rows = [f"| `{spec.name}` | {', '.join(owner.value for owner in Owner if owner in spec.owners)}"
            f" | {spec.unit} | {spec.help} |" for spec in declarations()]
    return "\n".join([TABLE_START, "| counter | kept by | unit | what it counts |",
                      "|---|---|---|---|", *rows, TABLE_END])


class Counts:
    """The counts of one owner, by declared counter; reads by a declared name too."""

    __slots__ = ("_counts",)

    def __init__(self, values: Mapping[str, int] | None = None) -> None:
        self._counts: dict[CounterSpec, int] = {}
        if values:
            for name, value in values.items():
                self._counts[declared(name)] = int(value)

    def add(self, counter: CounterSpec, amount: int = 1) -> None:
        """Count ``amount`` more of ``counter``; :class:`UndeclaredCounterError` for a counter
        that :func:`declare` did not make."""
        if _DECLARED.get(counter.name) is not counter:
            raise UndeclaredCounterError(counter.name)
        self._counts[counter] = self._counts.get(counter, 0) + amount

    def get(self, counter: CounterSpec | str) -> int:
        """The count of ``counter`` (a declared name will do), 0 before the first."""
        return self._counts.get(_checked(counter), 0)

    __getitem__ = get

    def update(self, other: Counts) -> None:
        """Add every count of ``other``."""
        for counter, value in other.items():
            self.add(counter, value)

    def items(self) -> Iterator[tuple[CounterSpec, int]]:
        """Each counted counter with its count, by name."""
        return iter(sorted(self._counts.items(), key=lambda item: item[0].name))

    def to_dict(self) -> dict[str, int]:
        """Name → count, as the inventory and the status frame carry them."""
        return {counter.name: value for counter, value in self.items()}

    def __len__(self) -> int:
        return len(self._counts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Counts) and self._counts == other._counts

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Counts({self.to_dict()!r})"


_S, _D, _K, _R, _T, _V = (Owner.SOURCE, Owner.DEVICE, Owner.SINK, Owner.ROUTER, Owner.STREAM,
                          Owner.SERVER)

# --- sources and devices ---------------------------------------------------------------------
READINGS = declare("readings", "Raw readings received from the source.", _S, _D,
                   unit="readings")
EVENTS = declare("events", "Normalized events: mapped from a source's readings, stored by the "
                 "router, or queued for event stream clients.", _S, _D, _R, _T, unit="events")
REJECTED = declare("rejected", "Readings that could not be mapped at all (counted, logged, "
                   "never dropped silently).", _S, _D, unit="readings")
BAD_VALUES = declare("bad_values", "Values a mapping turned into a bad event (undecodable, out "
                     "of range, not finite).", _S, _D, unit="values")
DROPPED_POINTS = declare("dropped_points", "Points a message would have created beyond the "
                         "source's max_points or with an invalid id.", _S, unit="points")
ERRORS = declare("errors", "Connection or device errors recorded.", _S, _D, _K, unit="errors")
CONNECTS = declare("connects", "Connection attempts.", _S, _D, _K, unit="attempts")
RECONNECTS = declare("reconnects", "Connections made again after one was lost.", _S, _D, _K,
                     unit="connections")
CYCLES = declare("cycles", "Poll cycles run.", _S, _D, unit="cycles")
OVERRUNS = declare("overruns", "Poll cycles skipped because the previous one was still "
                   "running.", _S, _D, unit="cycles")
REQUESTS = declare("requests", "Requests: sent to a device by a source, or received from a "
                   "client by a northbound server.", _S, _D, _V, unit="requests")
RESPONSES = declare("responses", "Requests the device answered with data.", _S, _D,
                    unit="requests")
EXCEPTIONS = declare("exceptions", "Requests answered with an exception: by the device (a "
                     "source), or by the bridge (a northbound server).", _S, _D, _V,
                     unit="requests")
TIMEOUTS = declare("timeouts", "Requests the device did not answer in time.", _S, _D,
                   unit="requests")
PROTOCOL_ERRORS = declare("protocol_errors", "Answers that broke the protocol.", _S, _D,
                          unit="requests")
SETTLE_ERRORS = declare("settle_errors", "Upstream acknowledgements that failed (the message "
                        "comes again).", _R, _S, unit="acknowledgements")

# --- the router ------------------------------------------------------------------------------
BACKPRESSURE_WAITS = declare("backpressure_waits", "Times a source waited because too many "
                             "events were pending.", _R, unit="waits")
OUTBOX_FULL_WAITS = declare("outbox_full_waits", "Times the router waited for a sink to make "
                            "room in a full outbox (policy block).", _R, unit="waits")
STORE_FULL_WAITS = declare("store_full_waits", "Times the router waited because the disk was "
                           "full (store.min_free).", _R, unit="waits")
NOT_STORED = declare("not_stored", "Events given up unacknowledged at shutdown because the disk "
                     "was full.", _R, unit="events")

# --- sinks -----------------------------------------------------------------------------------
PUBLISHED = declare("published", "Messages published to the broker.", _K, unit="messages")
CONFIRMED = declare("confirmed", "Messages the broker confirmed (and deleted from the outbox).",
                    _K, unit="messages")
NACKED = declare("nacked", "Messages the broker refused (nack); they are published again.", _K,
                 unit="messages")
REPUBLISHED = declare("republished", "Messages published again after a nack or a lost "
                      "connection: consumers may see these twice.", _K, unit="messages")
UNROUTABLE = declare("unroutable", "Messages the broker returned because no queue was bound "
                     "for them.", _K, unit="messages")

# --- the Sparkplug B edge node (an MQTT sink) ------------------------------------------------
REBIRTH_REQUESTS = declare("rebirth_requests", "Rebirth requests received from a host (NCMD "
                           "Node Control/Rebirth).", _K, unit="requests")
REBIRTHS = declare("rebirths", "Rebirths carried out (NBIRTH and the DBIRTHs published "
                   "again).", _K, unit="rebirths")
REBIRTHS_FOLDED = declare("rebirths_folded", "Rebirth requests folded into one already "
                          "waiting.", _K, unit="requests")
COMMANDS_REJECTED = declare("commands_rejected", "Commands ignored because they could not be "
                            "carried out (not a Sparkplug payload, unknown device or metric, "
                            "wrong type).", _K, unit="commands")
COMMANDS_DROPPED = declare("commands_dropped", "Commands dropped because their device already "
                           "had too many waiting (also counted as rejected).", _K, unit="commands")
COMMANDS_REFUSED = declare("commands_refused", "Command writes refused (commands off, an "
                           "unknown point or one not writable).", _K, unit="writes")
WRITES = declare("writes", "Writes carried out on a point: Sparkplug B commands, or a "
                 "northbound server's clients.", _K, _V, unit="writes")
WRITES_FAILED = declare("writes_failed", "Writes (Sparkplug B commands, a northbound server's "
                        "clients) the source could not carry out.", _K, _V, unit="writes")

# --- BACnet devices --------------------------------------------------------------------------
COV_SUBSCRIPTIONS = declare("cov_subscriptions", "COV subscriptions made or renewed.", _D,
                            unit="subscriptions")
COV_NOTIFICATIONS = declare("cov_notifications", "COV notifications received.", _D,
                            unit="notifications")
ANNOUNCEMENTS = declare("announcements", "I-Am announcements of a configured device (a "
                        "restart: its subscriptions are made again).", _D, unit="announcements")
MOVES = declare("moves", "Times a device answered from a new address and was followed.", _D,
                unit="moves")
UNKNOWN_I_AM = declare("unknown_i_am", "I-Am announcements from devices nobody configured "
                       "(counted and dropped).", _S, unit="announcements")
UNKNOWN_COV = declare("unknown_cov", "COV notifications from devices nobody configured "
                      "(counted and dropped).", _S, unit="notifications")

# --- northbound servers ----------------------------------------------------------------------
EXCEPTION_02 = declare("exception_02", "Modbus requests answered with exception 02 (illegal data "
                       "address: outside the map, or a read-only entry written).", _V,
                       unit="requests")
EXCEPTION_03 = declare("exception_03", "Modbus requests answered with exception 03 (illegal data "
                       "value: a value the point cannot hold, part of a value written).", _V,
                       unit="requests")
EXCEPTION_04 = declare("exception_04", "Modbus requests answered with exception 04 (a point bad, "
                       "stale, or its source down; a device refusing a write).", _V,
                       unit="requests")
EXCEPTION_0B = declare("exception_0b", "Modbus requests for a unit id the server does not "
                       "serve (exception 0B).", _V, unit="requests")
CLIENTS = declare("clients", "Client connections accepted.", _V, unit="connections")
CLIENTS_REFUSED = declare("clients_refused", "Client connections refused (not in "
                          "allowed_networks, or over max_connections).", _V, unit="connections")
VALUE_UPDATES = declare("value_updates", "Values written into the served address space as "
                        "events were stored.", _V, unit="values")
CERTIFICATES_REJECTED = declare("certificates_rejected", "Client certificates refused because "
                                "they are not trusted (saved under pki/rejected).", _V,
                                unit="certificates")

# --- event streams ---------------------------------------------------------------------------
STREAMS = declare("streams", "Event streams opened.", _T, unit="streams")
_ENDED_HELP = ("Event streams ended, by reason (slow_consumer and stalled: the client was "
               "dropped).")
ENDED_SLOW_CONSUMER = declare("ended_slow_consumer", _ENDED_HELP, _T, unit="streams")
ENDED_STALLED = declare("ended_stalled", _ENDED_HELP, _T, unit="streams")
ENDED_CLOSING = declare("ended_closing", _ENDED_HELP, _T, unit="streams")
ENDED_DISCONNECTED = declare("ended_disconnected", _ENDED_HELP, _T, unit="streams")
ENDED_FINISHED = declare("ended_finished", _ENDED_HELP, _T, unit="streams")
