"""S1M MQTT -> MQTT: S1's burst with the MQTT sink instead of RabbitMQ, on the same stock broker.

The same generator, source and mapping as S1 (``sensors/dev{0..99}/telemetry``, two events a
message), one daemon pinned like S1's headline; its sink publishes every event at QoS 1 (the
broker's PUBACK confirms it, through the durable outbox) to the sink's default topic tree,
``fieldbridge/{source}/{point}``, on the very broker the source reads. A subscriber of its
own (QoS 0, on the load core) counts the events. The figures stand beside S1's RabbitMQ figure
from the last S1 run in the same results.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from bench.figures import (
    S1_BURST,
    Figure,
    Options,
    ScenarioResult,
    Table,
    exactly,
    format_value,
)
from bench.harness import Daemon, Peer, pinned, workdir
from bench.scenarios.s1_mqtt_rabbitmq import (
    STOCK,
    burst,
    burst_setting,
    cpu_per_10k,
    lost_percent,
    mosquitto,
    no_broker,
    per_second,
    source,
)

NAME = "burst, one daemon (pinned), stock broker, MQTT sink (QoS 1)"
RABBITMQ_FIGURE = f"{S1_BURST}: events/s delivered into RabbitMQ (confirms, outbox)"


def config(port: int) -> dict[str, Any]:
    """S1's source, and an MQTT sink to the same broker."""
    return {"sources": [source(port, None)],
            "sinks": [{"id": "north", "protocol": "mqtt", "host": "127.0.0.1", "port": port,
                       "qos": 1}]}


def last_rabbitmq_figure(output: Path) -> float | None:
    """S1's headline events/s into RabbitMQ from the results stored in ``output``."""
    try:
        data = json.loads((output / "results.json").read_text())
    except (OSError, ValueError):
        return None
    for result in data.get("results", []):
        if result.get("key") != "S1":
            continue
        for figure in result.get("figures", []):
            if figure.get("name") == RABBITMQ_FIGURE:
                value = figure.get("value")
                return float(value) if isinstance(value, int | float) else None
    return None


def run(options: Options) -> ScenarioResult:
    """Run S1M."""
    result = ScenarioResult("S1M", "MQTT -> MQTT sink on the same stock broker")
    started = time.monotonic()
    if no_broker(result):
        return result
    count, unpinned_because, core, load_core = burst_setting(options)
    if unpinned_because:
        result.notes.append(f"**Not pinned** ({unpinned_because}): the daemon ran wherever "
                            "the scheduler put it.")
    with workdir("s1m") as directory, pinned(load_core), contextlib.ExitStack() as stack:
        port = stack.enter_context(mosquitto(directory, STOCK, load_core))
        if port is None:
            port = 1883
            result.notes.append("No `mosquitto` binary: the shared broker on 127.0.0.1:1883 "
                                "stands in for the stock broker.")
        consumer = stack.enter_context(Peer(
            "bench.peers.mqtt_event_consumer", "--port", str(port), log_dir=directory,
            cpus=load_core))
        consumer.wait_ready()
        daemon = stack.enter_context(Daemon(config(port), directory, name="daemon",
                                            cpus=core))
        measured = burst(directory, port, directory / f"mosquitto-{STOCK}.conf", [daemon],
                         consumer, count, load_core, None)
    report(result, measured, options, count, core)
    result.seconds = time.monotonic() - started
    return result


def report(result: ScenarioResult, measured: dict[str, Any], options: Options, count: int,
           core: int | None) -> None:
    """The figures, and a table beside S1's RabbitMQ figure."""
    delivered = measured["delivered"] or 0
    events = per_second(delivered, measured["delivered_seconds"])
    per_10k = cpu_per_10k(measured["cpu"], measured["received"])
    where = f"daemon on core {core}" if core is not None else "not pinned"
    result.figures += [
        Figure(f"{NAME}: lost at the broker", lost_percent(measured), "%",
               note=f"{measured['sent'] - measured['received']} of {measured['sent']} "
               "messages published never reached the daemon"),
        Figure(f"{NAME}: events/s delivered to a subscriber (PUBACK, outbox)", events,
               "events/s", note="first publish to last event counted"),
        exactly(f"{NAME}: events lost between the daemon and the subscriber",
                2 * measured["received"] - delivered, "events", 0,
                note="two events for every message the daemon read; the subscriber reads at "
                "QoS 0 from the same stock broker"),
        Figure(f"{NAME}: CPU s per 10,000 messages", per_10k, "s", note=where),
        Figure(f"{NAME}: peak RSS", measured["rss"], "MB", note="whole process tree"),
    ]
    rabbitmq = last_rabbitmq_figure(options.out_dir.parent)
    result.tables.append(Table(
        "Events/s delivered by one pinned daemon on the stock broker, by sink",
        ["sink", "events/s delivered", "confirmed by"],
        [["MQTT (this run)", format_value(events, "events/s"), "PUBACK (QoS 1)"],
         ["RabbitMQ (S1, last run)", format_value(rabbitmq, "events/s"), "publisher confirms"]],
        note="S1M and S1 run the same burst, source and mapping; S1's figure is read from "
        "the stored results, so it may come from another run."))
    if options.quick or options.messages:
        result.notes.append(f"Burst of {count:,} messages (a short run: smoke figures).")
