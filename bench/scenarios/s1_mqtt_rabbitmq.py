"""S1 MQTT -> RabbitMQ: JSON telemetry in, two events per message out through the outbox.

A generator (its own process) publishes 100,000 messages ``{"temp": 21.5, "hum": 40, "ts": …}``
to ``sensors/dev{0..99}/telemetry`` at full speed, QoS 0. The daemon maps each to two events
(temperature, humidity; ``ts`` from the payload) and, once the RabbitMQ sink exists in this
tree, publishes them through the durable outbox with confirms to an exchange a consumer (its
own process) is bound to. Then a paced run: 2,000 msg/s for 20 s, latency from the payload
timestamp to the consumer.

The burst runs against a Mosquitto the bench starts on a free port with an unbounded
per-client queue: with Mosquitto's default (1,000 queued messages per client) a QoS 0 burst
loses messages at every subscriber slower than the publisher, aiomqtt alone included (the
baseline shows it on the default broker). Without a ``mosquitto`` binary the shared broker on
127.0.0.1:1883 is used.

Scaling to the second core, two ways: one daemon whose MQTT source runs in two worker
processes (``workers: 2``: a shared subscription spreads the messages over them; the daemon
keeps the one store and outbox), and two daemons, one for dev0..49 and one for dev50..99.

Baselines in the same run: aiomqtt alone counting the same burst, and pika alone publishing
event-sized persistent messages with confirms to the same exchange.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import (
    CpuMeter,
    Daemon,
    MachineCpu,
    Peer,
    free_port,
    pids_matching,
    port_open,
    py_spy_top,
    tree_peak_rss_mb,
    wait_until,
    workdir,
)
from bench.results import Figure, Options, ScenarioResult, at_least, at_most, exactly

MESSAGES = 100_000
DEVICES = 100
EXCHANGE = "fieldbridge.bench.s1"
PACED_RATE = 2000


def sink_available() -> str | None:
    """``None`` when this tree's daemon has the RabbitMQ sink, else why not."""
    from bridge.registry import root_model

    fields = root_model().model_fields
    if "sinks" not in fields:
        return ("sink not available: this tree's configuration has no `sinks:` section yet "
                "(the durable outbox + RabbitMQ sink is being built); ingest figures only")
    return None


@contextlib.contextmanager
def mosquitto(directory: Path) -> Iterator[int]:
    """A Mosquitto for the burst on a free port (unbounded queue); 1883 if none installed."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        yield 1883
        return
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                      "max_queued_messages 0\nmax_queued_bytes 0\n")
    log = open(directory / "mosquitto.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=log)
    try:
        if not wait_until(lambda: port_open("127.0.0.1", port), 10):
            raise RuntimeError(f"the bench's mosquitto did not start: see {log.name}")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def source(port: int, devices: range | None, workers: int = 0) -> dict[str, Any]:
    """The MQTT source: a templated point pair, or literal topics for a device range."""
    common = {"id": "telemetry", "protocol": "mqtt", "host": "127.0.0.1", "port": port,
              "qos": 0, "clean_session": True, "report": {"mode": "always"},
              "timestamp": {"path": "ts", "format": "epoch_ms"}, "workers": workers}
    if devices is None:
        points = [
            {"name": "{device}.temperature", "topic": "sensors/{device}/telemetry",
             "path": "temp", "unit": "degC"},
            {"name": "{device}.humidity", "topic": "sensors/{device}/telemetry",
             "path": "hum", "unit": "%"},
        ]
    else:
        points = [point for device in devices for point in (
            {"name": f"dev{device}.temperature", "topic": f"sensors/dev{device}/telemetry",
             "path": "temp", "unit": "degC"},
            {"name": f"dev{device}.humidity", "topic": f"sensors/dev{device}/telemetry",
             "path": "hum", "unit": "%"})]
    return {**common, "points": points}


def config(mqtt_port: int, devices: range | None, with_sink: bool,
           workers: int = 0, sink_workers: int = 0) -> dict[str, Any]:
    """The daemon's config."""
    document: dict[str, Any] = {"sources": [source(mqtt_port, devices, workers)]}
    if with_sink:
        document["sinks"] = [{"id": "rabbit", "protocol": "amqp", "host": "127.0.0.1",
                              "exchange": {"name": EXCHANGE}, "workers": sink_workers}]
    return document


class Progress:
    """Waits until a counter stops growing; remembers when it last grew."""

    def __init__(self, read: Any, target: int, idle: float = 3.0) -> None:
        self.read = read
        self.target = target
        self.idle = idle
        self.value = 0
        self.changed_at = time.monotonic()

    def wait(self, timeout: float) -> int:
        """Poll until ``target`` is reached or nothing moved for ``idle`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = int(self.read())
            if value != self.value:
                self.value, self.changed_at = value, time.monotonic()
            if value >= self.target or time.monotonic() - self.changed_at > self.idle:
                break
            time.sleep(0.1)
        return self.value


def burst(directory: Path, mqtt_port: int, daemons: list[Daemon], consumer: Peer | None,
          count: int, options: Options, profile_name: str | None) -> dict[str, Any]:
    """Publish ``count`` messages at full speed; wait until the daemons drained them."""
    for daemon in daemons:
        # The subscription must be in place before the burst starts.
        if not wait_until(lambda d=daemon: d.sources()[0]["state"] == "up", 20):
            raise RuntimeError(f"MQTT source not up: {daemon.sources()[0].get('last_error')}")
    if consumer is not None:
        consumer.ask("reset")
    before = sum(daemon.counters().get("readings", 0) for daemon in daemons)
    meters = [CpuMeter(daemon.pid).start() for daemon in daemons]
    # Who else uses the two cores meanwhile: the brokers and the consumer.
    machine = MachineCpu().start()
    others = {"RabbitMQ": [CpuMeter(pid).start() for pid in pids_matching("beam.smp")],
              "Mosquitto": [CpuMeter(pid).start()
                            for pid in pids_matching(str(directory / "mosquitto.conf"))],
              "consumer": [CpuMeter(consumer.pid).start()] if consumer is not None else []}
    started = time.monotonic()
    with Peer("bench.peers.mqtt_publisher", "--port", str(mqtt_port), "--count", str(count),
              log_dir=directory) as publisher:
        publisher.wait_ready()
        profiling = None
        if profile_name and options.profile:
            profiling = py_spy_top(daemons[0].pid, 3, options.out_dir / profile_name)
        sent = publisher.wait_result(timeout=300)
    readings = Progress(lambda: sum(d.counters().get("readings", 0) for d in daemons) - before,
                        count)
    received = readings.wait(timeout=300)
    ingest_seconds = readings.changed_at - started
    delivered = None
    delivered_seconds = float("nan")
    if consumer is not None:
        # The outbox may pause a few seconds (a full window, a reconnect): wait long enough.
        progress = Progress(lambda: consumer.ask("stats")["received"], 2 * count, idle=15.0)
        delivered = progress.wait(timeout=300)
        delivered_seconds = progress.changed_at - started
    for meter in meters:
        meter.stop()
    machine.stop()
    wall = machine.wall
    shares = {"daemon": sum(meter.seconds for meter in meters) / wall}
    for name, group in others.items():
        shares[name] = sum(meter.stop() for meter in group) / wall
    shares["whole machine (2 cores)"] = machine.seconds / wall
    return {
        "shares": shares,
        "sent": sent["sent"], "publish_seconds": sent["seconds"],
        "received": received, "ingest_seconds": ingest_seconds,
        "delivered": delivered, "delivered_seconds": delivered_seconds,
        "cpu": sum(meter.seconds for meter in meters),
        "rss": sum(tree_peak_rss_mb(daemon.pid) for daemon in daemons),
        "profile": profiling,
    }


ONE = "one daemon"
WORKERS = "one daemon, MQTT source in 2 worker processes"
ALL = "one daemon, MQTT source in 2 worker processes, sink in 1"
TWO = "two daemons (dev0-49, dev50-99)"
PACED = {ONE: "paced", ALL: "paced workers"}
"""The layouts that also get the paced run, and the key of its result."""


def paced(directory: Path, mqtt_port: int, daemon: Daemon, consumer: Peer, options: Options,
          result: ScenarioResult, profile_name: str) -> dict[str, Any]:
    """2,000 msg/s for 20 s: the consumer's latency from the payload timestamp. The profile is
    taken in a second, shorter paced run, so the sampler does not disturb the figures."""
    paced_seconds = options.seconds(20.0, 5.0)
    consumer.ask("reset")
    with Peer("bench.peers.mqtt_publisher", "--port", str(mqtt_port),
              "--count", str(int(PACED_RATE * paced_seconds)), "--rate",
              str(PACED_RATE), log_dir=directory) as publisher:
        publisher.wait_ready()
        publisher.wait_result(timeout=paced_seconds + 120)
    Progress(lambda: consumer.ask("stats")["received"],
             int(2 * PACED_RATE * paced_seconds)).wait(timeout=60)
    stats: dict[str, Any] = consumer.ask("stats")
    if options.profile:
        profile_seconds = 6.0
        with Peer("bench.peers.mqtt_publisher", "--port", str(mqtt_port),
                  "--count", str(int(PACED_RATE * profile_seconds)), "--rate",
                  str(PACED_RATE), log_dir=directory) as publisher:
            publisher.wait_ready()
            time.sleep(0.5)
            profile = py_spy_top(daemon.pid, profile_seconds - 1.5,
                                 options.out_dir / profile_name)
            if profile is not None:
                result.profiles.append(f"profiles/{profile.name}")
            publisher.wait_result(timeout=profile_seconds + 120)
    return stats


def run(options: Options) -> ScenarioResult:
    """Run S1."""
    result = ScenarioResult("S1", "MQTT -> RabbitMQ, 100,000 messages, two events each")
    started = time.monotonic()
    if not port_open("127.0.0.1", 1883) and shutil.which("mosquitto") is None:
        result.status, result.reason = "skipped", "no MQTT broker: apt-get install mosquitto"
        return result
    missing_sink = sink_available()
    rabbit = port_open("127.0.0.1", 5672)
    with_sink = missing_sink is None and rabbit
    count = 30_000 if options.quick else MESSAGES
    with workdir("s1") as directory, mosquitto(directory) as mqtt_port:
        # Baselines: the brokers with the protocol libraries alone.
        raw: dict[str, dict[str, Any]] = {}
        ports = {"bench broker (unbounded queue)": mqtt_port}
        if mqtt_port != 1883 and port_open("127.0.0.1", 1883):
            ports["shared broker, default 1,000-message queue"] = 1883
        for label, port in ports.items():
            with Peer("bench.peers.mqtt_raw_subscriber", "--port", str(port), "--expect",
                      str(count), log_dir=directory) as subscriber:
                subscriber.wait_ready()
                meter = CpuMeter(subscriber.pid).start()
                with Peer("bench.peers.mqtt_publisher", "--port", str(port), "--count",
                          str(count), log_dir=directory) as publisher:
                    publisher.wait_ready()
                    sent = publisher.wait_result(timeout=300)
                raw[label] = {**subscriber.wait_result(timeout=300), "sent": sent}
                meter.stop()
                raw[label]["cpu"] = meter.seconds
        for label, measured in raw.items():
            lost = count - measured["received"]
            result.baselines.append(Figure(
                f"aiomqtt alone, {label}: msg/s", measured["received"] / measured["seconds"]
                if measured["seconds"] else None, "msg/s",
                note=f"{lost} of {count} lost; publisher {count / measured['sent']['seconds']:.0f}"
                f" msg/s; {10_000 * measured['cpu'] / max(1, measured['received']):.2f} CPU s "
                "per 10k"))
        if rabbit:
            with Peer("bench.peers.amqp_consumer", "--exchange", EXCHANGE,
                      log_dir=directory) as consumer:
                consumer.wait_ready()
                with Peer("bench.peers.pika_confirm_publisher", "--count", str(2 * count // 4),
                          "--exchange", EXCHANGE, "--window", "5000",
                          log_dir=directory) as pika_alone:
                    pika_alone.wait_ready()
                    consumer_started = time.monotonic()
                    measured = pika_alone.wait_result(timeout=300)
                # How fast the consumer itself takes messages in: it counts what the daemon
                # delivers, so its rate caps every "delivered" figure below.
                draining = Progress(lambda: consumer.ask("stats")["received"],
                                    2 * count // 4, idle=5.0)
                drained = draining.wait(timeout=120)
                consumer_rate = drained / (draining.changed_at - consumer_started)
                # The latency floor: RabbitMQ and the consumer alone, at the paced run's rate
                # of events (two per message).
                consumer.ask("reset")
                with Peer("bench.peers.pika_paced_publisher", "--exchange", EXCHANGE,
                          "--rate", str(2 * PACED_RATE), "--seconds",
                          str(options.seconds(10.0, 5.0)), log_dir=directory) as paced_alone:
                    paced_alone.wait_ready()
                    paced_alone.wait_result(timeout=120)
                Progress(lambda: consumer.ask("stats")["received"],
                         int(2 * PACED_RATE * options.seconds(10.0, 5.0))).wait(timeout=30)
                floor = consumer.ask("stats")["latency_ms"]
            result.baselines.append(Figure(
                "pika alone: confirmed publishes/s (persistent, window 5,000)",
                measured["messages"] / measured["seconds"], "msg/s",
                note="to the same exchange, the bench consumer bound"))
            result.baselines.append(Figure(
                "the bench consumer alone: messages/s it takes in", consumer_rate, "msg/s",
                note=f"{drained} of {2 * count // 4} from pika alone, first to last; it "
                "counts every delivered figure, so these cannot exceed it"))
            result.baselines += [
                Figure(f"pika alone paced at {2 * PACED_RATE:,} msg/s: latency p50 to the "
                       "consumer", floor["p50"], "ms", note="RabbitMQ and the consumer alone"),
                Figure(f"pika alone paced at {2 * PACED_RATE:,} msg/s: latency p99 to the "
                       "consumer", floor["p99"], "ms", note="RabbitMQ and the consumer alone"),
            ]
        else:
            result.notes.append("RabbitMQ is not running on 127.0.0.1:5672: no AMQP baseline.")

        runs: dict[str, dict[str, Any]] = {}
        # label: (device range of each daemon, worker processes of its MQTT source, profile)
        # label: (device range of each daemon, source workers, sink workers, profile)
        layouts: dict[str, tuple[list[range | None], int, int, str]] = {
            ONE: ([None], 0, 0, "s1-mqtt-burst.txt"),
            WORKERS: ([None], 2, 0, ""),
            ALL: ([None], 2, 1, "s1-mqtt-burst-workers.txt"),
            TWO: ([range(0, DEVICES // 2), range(DEVICES // 2, DEVICES)], 0, 0, ""),
        }
        for label, (parts, workers, sink_workers, profile_name) in layouts.items():
            consumer_context: Any = (Peer("bench.peers.amqp_consumer", "--exchange", EXCHANGE,
                                          log_dir=directory) if with_sink
                                     else contextlib.nullcontext())
            with consumer_context as consumer, contextlib.ExitStack() as stack:
                if consumer is not None:
                    consumer.wait_ready()
                daemons = [stack.enter_context(Daemon(config(mqtt_port, part, with_sink, workers,
                                                             sink_workers),
                                                      directory, name=f"daemon-{index}"))
                           for index, part in enumerate(parts)]
                runs[label] = burst(directory, mqtt_port, daemons, consumer, count, options,
                                    profile_name or None)
                if label in PACED and with_sink and consumer is not None:
                    runs[PACED[label]] = paced(directory, mqtt_port, daemons[0], consumer,
                                               options, result,
                                               profile_name.replace("burst", "paced"))
    one, two = runs[ONE], runs[TWO]
    for label in (ONE, ALL):
        profile = runs[label].get("profile")
        if profile is not None:
            result.profiles.append(f"profiles/{profile.name}")
    for label, measured in (("one daemon", one), ("2 MQTT workers", runs[WORKERS]),
                            ("2 MQTT workers + sink worker", runs[ALL]), ("two daemons", two)):
        lost = count - measured["received"]
        ingest_rate = measured["received"] / measured["ingest_seconds"]
        result.figures += [
            exactly(f"{label}: messages lost by ingest", lost, "msg", 0,
                    note=f"{measured['received']} of {count} messages read"),
            Figure(f"{label}: ingest rate", ingest_rate, "msg/s",
                   note=f"{2 * ingest_rate:.0f} events/s mapped; publisher "
                   f"{count / measured['publish_seconds']:.0f} msg/s"),
            Figure(f"{label}: CPU per 10,000 messages", 10_000 * measured["cpu"]
                   / max(1, measured["received"]), "s"),
            Figure(f"{label}: peak RSS", measured["rss"], "MB"),
        ]
        if with_sink:
            delivered = measured["delivered"] or 0
            rate = delivered / measured["delivered_seconds"]
            result.figures += [
                at_least(f"{label}: events/s delivered into RabbitMQ (confirms, outbox)", rate,
                         "events/s", 20_000),
                exactly(f"{label}: events lost end to end", 2 * count - delivered, "events",
                        0),
            ]
            result.chart[f"S1 {label} events/s (>=20k)"] = rate / 20_000
            shares = measured["shares"]
            result.figures.append(Figure(
                f"{label}: CPU busy, burst to last delivery (2 cores = 200 %)",
                100 * shares["whole machine (2 cores)"], "%",
                note=", ".join(f"{name} {100 * share:.0f} %" for name, share in shares.items()
                               if name != "whole machine (2 cores)")))
        result.chart[f"S1 {label} ingest, no loss"] = (measured["received"] / count) ** 8
    if with_sink:
        for prefix, key in (("paced 2,000 msg/s", "paced"),
                            ("paced 2,000 msg/s, 2 MQTT workers + sink worker",
                             "paced workers")):
            latency = runs[key]["latency_ms"]
            inside = runs[key].get("from_received_ms", {})
            result.figures += [
                Figure(f"{prefix}: latency p50", latency["p50"], "ms",
                       note=f"from the bridge's receipt: {inside.get('p50', float('nan')):.1f}"
                       " ms"),
                at_most(f"{prefix}: latency p99 (payload ts to consumer)", latency["p99"],
                        "ms", 10, note="from the bridge's receipt: "
                        f"{inside.get('p99', float('nan')):.1f} ms"),
            ]
            result.chart[f"S1 {key} p99 latency (<10 ms)"] = 10 / max(1e-3, latency["p99"])
    else:
        reason = missing_sink or "RabbitMQ is not running on 127.0.0.1:5672"
        result.notes.insert(0, f"**{reason}.** The RabbitMQ figures (events/s delivered with "
                            "confirms through the outbox, end-to-end loss, paced latency "
                            "p50/p99) are not measured; the harness runs them as soon as "
                            "`sinks:` exists.")
        result.figures += [
            Figure("events/s delivered into RabbitMQ (confirms, outbox)", None, "events/s",
                   target=">= 20,000 events/s", note="sink not available"),
            Figure("paced 2,000 msg/s: latency p99", None, "ms", target="< 10 ms",
                   note="sink not available"),
        ]

    def ingest_rate_of(measured: dict[str, Any]) -> float:
        return float(measured["received"] / measured["ingest_seconds"])

    def delivered_rate_of(measured: dict[str, Any]) -> float:
        return float((measured["delivered"] or 0) / measured["delivered_seconds"])

    result.baselines += [
        Figure("2 MQTT workers / one daemon: ingest rate",
               ingest_rate_of(runs[WORKERS]) / ingest_rate_of(one), "x"),
        Figure("2 MQTT workers + sink worker / one daemon: ingest rate",
               ingest_rate_of(runs[ALL]) / ingest_rate_of(one), "x"),
        Figure("two daemons / one daemon: ingest rate",
               ingest_rate_of(two) / ingest_rate_of(one), "x"),
    ]
    if with_sink:
        result.baselines += [
            Figure("2 MQTT workers / one daemon: events/s delivered",
                   delivered_rate_of(runs[WORKERS]) / delivered_rate_of(one), "x"),
            Figure("2 MQTT workers + sink worker / one daemon: events/s delivered",
                   delivered_rate_of(runs[ALL]) / delivered_rate_of(one), "x"),
            Figure("two daemons / one daemon: events/s delivered",
                   delivered_rate_of(two) / delivered_rate_of(one), "x"),
        ]
    result.seconds = time.monotonic() - started
    return result


if __name__ == "__main__":
    from bench.suite import main

    raise SystemExit(main(["--only", "S1"]))
