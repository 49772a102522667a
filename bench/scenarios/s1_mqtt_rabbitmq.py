"""S1 MQTT -> RabbitMQ: JSON telemetry in, two events per message out through the outbox.

A generator (its own process) publishes 100,000 messages ``{"temp": 21.5, "hum": 40, "ts": …}``
to ``sensors/dev{0..99}/telemetry`` at full speed, QoS 0. The daemon maps each to two events
(temperature, humidity; ``ts`` from the payload) and publishes them through the durable outbox
with confirms to an exchange a consumer (its own process) is bound to. Then a paced run:
2,000 msg/s for 20 s, latency from the payload timestamp to the consumer, and CPU.

The headline burst runs against a stock Mosquitto: a private instance on a free port whose
configuration sets only the listener and anonymous access, so every limit is the default
(1,000 queued messages per client), as users of a stock broker have it. A QoS 0 subscriber
slower than the publisher loses messages there, so loss at the broker is a figure, held
against aiomqtt alone on the same broker in the same run. A second private instance with an
unbounded queue (tuned) gives an extra row, which hides that loss. Without a ``mosquitto``
binary the shared broker on 127.0.0.1:1883 stands in.

Pinning (``taskset``, unless ``--no-pin`` or fewer than two cores): the one-daemon layout and
its baseline, aiomqtt alone, run on core 1, so they compare with single-threaded peers;
the load generator, the consumer, the bench's brokers and the harness run on core 0.

Scaling to the second core, unpinned, with the CPU of the whole process tree (daemon and
workers): one daemon whose MQTT source runs in two worker processes (``workers: 2``: a shared
subscription spreads the messages over them; the daemon keeps the one store and outbox), the
same with the sink in a worker too, and two daemons, one for dev0..49 and one for dev50..99.

Baselines in the same run: aiomqtt alone decoding (``json.loads``) and counting the same burst
on each broker, and pika alone publishing event-sized persistent messages with confirms to the
same exchange.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.figures import (
    S1_BURST,
    S1_PACED,
    S1_WORKERS,
    Figure,
    Options,
    ScenarioResult,
    Table,
    at_most,
    exactly,
    format_value,
    goal,
)
from bench.harness import (
    DAEMON_CORE,
    LOAD_CORE,
    CpuMeter,
    Daemon,
    MachineCpu,
    Peer,
    free_port,
    pids_matching,
    pinned,
    pinning_unavailable,
    port_open,
    py_spy_top,
    taskset,
    tree_peak_rss_mb,
    wait_until,
    workdir,
)

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


STOCK = "stock"
TUNED = "tuned"
BROKERS = {
    STOCK: "stock broker (default configuration: 1,000 queued messages per client)",
    TUNED: "tuned broker (unbounded per-client queue)",
}


@contextlib.contextmanager
def mosquitto(directory: Path, kind: str, cpus: int | None) -> Iterator[int | None]:
    """A private Mosquitto on a free port, pinned to ``cpus``; ``None`` when none is installed.

    ``stock``: a configuration that sets only the listener and anonymous access, so every
    limit is Mosquitto's default (``max_queued_messages 1000`` per client: a QoS 0 subscriber
    slower than the publisher loses what does not fit). ``tuned``: the same with unbounded
    queues, which hides that loss.
    """
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        yield None
        return
    port = free_port()
    config = directory / f"mosquitto-{kind}.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true"]
    if kind == TUNED:
        lines += ["max_queued_messages 0", "max_queued_bytes 0"]
    config.write_text("\n".join(lines) + "\n")
    log = open(directory / f"mosquitto-{kind}.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([*taskset(cpus), binary, "-c", str(config)], stdout=log,
                               stderr=log)
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

    def __init__(self, read: Callable[[], float], target: int, idle: float = 3.0,
                 tick: Callable[[], None] | None = None) -> None:
        self.read = read
        self.target = target
        self.idle = idle
        self.tick = tick
        """Called at every poll (CPU meters sample the process tree there)."""
        self.value = 0
        self.changed_at = time.monotonic()

    def wait(self, timeout: float) -> int:
        """Poll until ``target`` is reached or nothing moved for ``idle`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = int(self.read())
            if self.tick is not None:
                self.tick()
            if value != self.value:
                self.value, self.changed_at = value, time.monotonic()
            if value >= self.target or time.monotonic() - self.changed_at > self.idle:
                break
            time.sleep(0.1)
        return self.value


@dataclass(frozen=True)
class Layout:
    """One way to run the daemon(s) for the burst."""

    name: str
    """The figures' prefix after ``burst, ``."""
    broker: str
    """``STOCK`` or ``TUNED``."""
    parts: tuple[range | None, ...] = (None,)
    """The devices of each daemon (``None``: all, one templated source)."""
    workers: int = 0
    """Worker processes of the MQTT source."""
    sink_workers: int = 0
    """Worker processes of the RabbitMQ sink."""
    pinned: bool = False
    """The daemon on DAEMON_CORE alone (unpinned layouts report their whole process tree)."""
    profile: str = ""
    """py-spy profile file of the burst (and, with ``burst`` → ``paced``, of the paced run)."""
    paced: str = ""
    """The paced run's figure prefix; empty: no paced run."""


ONE = S1_BURST.removeprefix("burst, ")
TUNED_ONE = "one daemon (pinned), tuned broker"
WORKERS = S1_WORKERS.removeprefix("burst, ")
ALL = "workers: 2 + sink worker (unpinned), stock broker"
TWO = "two daemons, dev0-49 and dev50-99 (unpinned), stock broker"
LAYOUTS = (
    Layout(ONE, STOCK, pinned=True, profile="s1-mqtt-burst.txt", paced=S1_PACED),
    Layout(TUNED_ONE, TUNED, pinned=True),
    Layout(WORKERS, STOCK, workers=2),
    Layout(ALL, STOCK, workers=2, sink_workers=1, profile="s1-mqtt-burst-workers.txt",
           paced="paced 2,000 msg/s, workers: 2 + sink worker (unpinned)"),
    Layout(TWO, STOCK, parts=(range(0, DEVICES // 2), range(DEVICES // 2, DEVICES))),
)
SMOKE_LAYOUTS = (ONE, ALL)
"""A smoke run's layouts: the pinned daemon and the one with source and sink workers cover the
code paths of the others (which only run more daemons or fewer workers)."""


def burst(directory: Path, mqtt_port: int, broker_config: Path, daemons: list[Daemon],
          consumer: Peer | None, count: int, load_core: int | None,
          profile: Path | None) -> dict[str, Any]:
    """Publish ``count`` messages at full speed; wait until the daemons drained them. Times run
    from the publisher's start; CPU is the daemons' whole process trees."""
    for daemon in daemons:
        # The subscription must be in place before the burst starts.
        if not wait_until(lambda d=daemon: d.sources()[0]["state"] == "up", 20):
            raise RuntimeError(f"MQTT source not up: {daemon.sources()[0].get('last_error')}")
    if consumer is not None:
        consumer.ask("reset")
    before = sum(daemon.counters().get("readings", 0) for daemon in daemons)
    meters = [CpuMeter(daemon.pid).start() for daemon in daemons]

    def tick() -> None:
        for meter in meters:
            meter.sample()

    # Who else uses the two cores meanwhile: the brokers and the consumer.
    machine = MachineCpu().start()
    others = {"RabbitMQ": [CpuMeter(pid).start() for pid in pids_matching("beam.smp")],
              "Mosquitto": [CpuMeter(pid).start()
                            for pid in pids_matching(str(broker_config))],
              "consumer": [CpuMeter(consumer.pid).start()] if consumer is not None else []}
    with Peer("bench.peers.mqtt_publisher", "--port", str(mqtt_port), "--count", str(count),
              log_dir=directory, cpus=load_core) as publisher:
        publisher.wait_ready()
        started = time.monotonic()
        profiling = py_spy_top(daemons[0].pid, 3, profile) if profile is not None else None
        sent = publisher.wait_result(timeout=300)
    readings = Progress(lambda: sum(d.counters().get("readings", 0) for d in daemons) - before,
                        count, tick=tick)
    received = readings.wait(timeout=300)
    ingest_seconds = readings.changed_at - started
    delivered = None
    delivered_seconds = float("nan")
    if consumer is not None:
        # The outbox may pause a few seconds (a full window, a reconnect): wait long enough.
        progress = Progress(lambda: consumer.ask("stats")["received"], 2 * received,
                            idle=15.0, tick=tick)
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
        "processes": sum(meter.processes for meter in meters),
        "rss": sum(tree_peak_rss_mb(daemon.pid) for daemon in daemons),
        "profile": profiling,
    }


def paced(directory: Path, mqtt_port: int, daemon: Daemon, consumer: Peer, options: Options,
          load_core: int | None, result: ScenarioResult, profile_name: str) -> dict[str, Any]:
    """2,000 msg/s for 20 s: the consumer's latency from the payload timestamp, and the
    daemon's CPU (its whole process tree) from the publisher's start to the last delivery.
    The profile is taken in a second, shorter paced run, so the sampler does not disturb the
    figures."""
    paced_seconds = options.seconds(20.0, 3.0, 0.5)
    messages = int(PACED_RATE * paced_seconds)
    consumer.ask("reset")
    meter = CpuMeter(daemon.pid).start()
    with Peer("bench.peers.mqtt_publisher", "--port", str(mqtt_port),
              "--count", str(messages), "--rate", str(PACED_RATE), log_dir=directory,
              cpus=load_core) as publisher:
        publisher.wait_ready()
        publisher.wait_result(timeout=paced_seconds + 120)
    Progress(lambda: consumer.ask("stats")["received"], 2 * messages,
             tick=meter.sample).wait(timeout=60)
    meter.stop()
    stats: dict[str, Any] = consumer.ask("stats")
    stats.update(messages=messages, cpu=meter.seconds, processes=meter.processes)
    if options.profile and profile_name:
        profile_seconds = 6.0
        with Peer("bench.peers.mqtt_publisher", "--port", str(mqtt_port),
                  "--count", str(int(PACED_RATE * profile_seconds)), "--rate",
                  str(PACED_RATE), log_dir=directory, cpus=load_core) as publisher:
            publisher.wait_ready()
            time.sleep(0.5)
            profile = py_spy_top(daemon.pid, profile_seconds - 1.5,
                                 options.out_dir / profile_name)
            if profile is not None:
                result.profiles.append(f"profiles/{profile.name}")
            publisher.wait_result(timeout=profile_seconds + 120)
    return stats


def aiomqtt_alone(directory: Path, port: int, count: int, core: int | None,
                  load_core: int | None) -> dict[str, Any]:
    """The baseline: aiomqtt decoding and counting the same burst on the same broker, pinned
    like the daemon; timed from the publisher's start to the last message, as the daemon is."""
    with Peer("bench.peers.mqtt_raw_subscriber", "--port", str(port), "--expect", str(count),
              log_dir=directory, cpus=core) as subscriber:
        subscriber.wait_ready()
        meter = CpuMeter(subscriber.pid).start()
        with Peer("bench.peers.mqtt_publisher", "--port", str(port), "--count", str(count),
                  log_dir=directory, cpus=load_core) as publisher:
            publisher.wait_ready()
            started = time.monotonic()
            sent = publisher.wait_result(timeout=300)
        measured = subscriber.wait_result(timeout=300)
        meter.stop()
    received = int(measured["received"])
    return {"sent": sent["sent"], "publish_seconds": sent["seconds"], "received": received,
            "seconds": measured["last"] - started if received else float("nan"),
            "cpu": meter.seconds}


def per_second(count: float | None, seconds: float) -> float | None:
    """``count`` per second; ``None`` without a count or a duration."""
    if count is None or not seconds or math.isnan(seconds) or seconds <= 0:
        return None
    return count / seconds


def lost_percent(measured: dict[str, Any]) -> float:
    """Messages published that the reader never got, in percent."""
    return float(100 * (measured["sent"] - measured["received"]) / max(1, measured["sent"]))


def cpu_per_10k(cpu: float, messages: int) -> float | None:
    """CPU seconds per 10,000 messages; ``None`` without messages."""
    return 10_000 * cpu / messages if messages else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _text(value: float | None, unit: str) -> str:
    return format_value(value, unit)


def pika_baselines(directory: Path, count: int, options: Options, load_core: int | None,
                   result: ScenarioResult) -> None:
    """pika alone publishing with confirms, the bench consumer's own rate, and the latency
    floor of RabbitMQ and the consumer alone."""
    with Peer("bench.peers.amqp_consumer", "--exchange", EXCHANGE, log_dir=directory,
              cpus=load_core) as consumer:
        consumer.wait_ready()
        with Peer("bench.peers.pika_confirm_publisher", "--count", str(2 * count // 4),
                  "--exchange", EXCHANGE, "--window", "5000", log_dir=directory,
                  cpus=load_core) as pika_alone:
            pika_alone.wait_ready()
            consumer_started = time.monotonic()
            measured = pika_alone.wait_result(timeout=300)
        # How fast the consumer itself takes messages in: it counts what the daemon
        # delivers, so its rate caps every "delivered" figure below.
        draining = Progress(lambda: consumer.ask("stats")["received"], 2 * count // 4,
                            idle=5.0)
        drained = draining.wait(timeout=120)
        consumer_rate = drained / (draining.changed_at - consumer_started)
        # The latency floor: RabbitMQ and the consumer alone, at the paced run's rate of
        # events (two per message).
        consumer.ask("reset")
        floor_seconds = options.seconds(10.0, 3.0, 0.5)
        with Peer("bench.peers.pika_paced_publisher", "--exchange", EXCHANGE,
                  "--rate", str(2 * PACED_RATE), "--seconds", str(floor_seconds),
                  log_dir=directory, cpus=load_core) as paced_alone:
            paced_alone.wait_ready()
            paced_alone.wait_result(timeout=120)
        Progress(lambda: consumer.ask("stats")["received"],
                 int(2 * PACED_RATE * floor_seconds)).wait(timeout=30)
        floor = consumer.ask("stats")["latency_ms"]
    result.baselines += [
        Figure("pika alone: confirmed publishes/s (persistent, window 5,000)",
               measured["messages"] / measured["seconds"], "msg/s",
               note="to the same exchange, the bench consumer bound"),
        Figure("the bench consumer alone: messages/s it takes in", consumer_rate, "msg/s",
               note=f"{drained} of {2 * count // 4} from pika alone, first to last; it "
               "counts every delivered figure, so these cannot exceed it"),
        Figure(f"pika alone paced at {2 * PACED_RATE:,} msg/s: latency p50 to the consumer",
               floor["p50"], "ms", note="RabbitMQ and the consumer alone"),
        Figure(f"pika alone paced at {2 * PACED_RATE:,} msg/s: latency p99 to the consumer",
               floor["p99"], "ms", note="RabbitMQ and the consumer alone"),
    ]


def no_broker(result: ScenarioResult) -> bool:
    """Whether there is no MQTT broker to run on (``result`` then says it was skipped)."""
    if port_open("127.0.0.1", 1883) or shutil.which("mosquitto") is not None:
        return False
    result.status, result.reason = "skipped", "no MQTT broker: apt-get install mosquitto"
    return True


def burst_setting(options: Options) -> tuple[int, str | None, int | None, int | None]:
    """The burst's size, and where it runs: why not pinned (``None``: pinned), the daemon's
    core and the load's core (``None``: wherever the scheduler puts them)."""
    count = options.messages or options.size(MESSAGES, 30_000, 300)
    unpinned_because = (("a smoke run" if options.smoke else "--no-pin") if not options.pin
                        else pinning_unavailable())
    core = None if unpinned_because else DAEMON_CORE
    load_core = None if unpinned_because else LOAD_CORE
    return count, unpinned_because, core, load_core


def run(options: Options) -> ScenarioResult:
    """Run S1."""
    result = ScenarioResult("S1", "MQTT -> RabbitMQ, 100,000 messages, two events each")
    started = time.monotonic()
    if no_broker(result):
        return result
    missing_sink = sink_available()
    rabbit = port_open("127.0.0.1", 5672)
    with_sink = missing_sink is None and rabbit
    count, unpinned_because, core, load_core = burst_setting(options)
    if unpinned_because:
        result.notes.append(f"**Not pinned** ({unpinned_because}): the layouts named "
                            "\"pinned\" ran wherever the scheduler put them.")
    else:
        result.notes.append(
            f"Pinned layouts: the daemon (all its threads) and aiomqtt alone on core "
            f"{DAEMON_CORE} (`taskset -c {DAEMON_CORE}`). The load generator, the consumer, "
            f"the bench's Mosquitto and the harness itself on core {LOAD_CORE}; RabbitMQ, a "
            "shared service, wherever the scheduler puts it. Unpinned layouts: the daemon "
            "and its workers anywhere, their CPU summed over the whole process tree.")
    runs: dict[str, dict[str, Any]] = {}
    raw: dict[str, dict[str, Any]] = {}
    with workdir("s1") as directory, pinned(load_core), contextlib.ExitStack() as brokers:
        ports: dict[str, int] = {}
        # A smoke run leaves out the tuned broker: the same code paths as the stock one.
        for kind in (STOCK,) if options.smoke else (STOCK, TUNED):
            port = brokers.enter_context(mosquitto(directory, kind, load_core))
            if port is not None:
                ports[kind] = port
        if not ports:
            ports[STOCK] = 1883
            result.notes.append("No `mosquitto` binary: the shared broker on 127.0.0.1:1883 "
                                "stands in for the stock broker (its configuration is not "
                                "checked), and the tuned-broker rows are not measured.")
        # Baselines: aiomqtt alone on each broker, pinned like the daemon; pika alone.
        for kind, port in ports.items():
            raw[kind] = aiomqtt_alone(directory, port, count, core, load_core)
        if rabbit:
            pika_baselines(directory, count, options, load_core, result)
        else:
            result.notes.append("RabbitMQ is not running on 127.0.0.1:5672: no AMQP baseline.")

        for layout in LAYOUTS:
            if layout.broker not in ports or (options.smoke
                                              and layout.name not in SMOKE_LAYOUTS):
                continue
            port = ports[layout.broker]
            consumer_context: Any = (Peer("bench.peers.amqp_consumer", "--exchange", EXCHANGE,
                                          log_dir=directory, cpus=load_core) if with_sink
                                     else contextlib.nullcontext())
            with consumer_context as consumer, contextlib.ExitStack() as stack:
                if consumer is not None:
                    consumer.wait_ready()
                daemons = [stack.enter_context(Daemon(
                    config(port, part, with_sink, layout.workers, layout.sink_workers),
                    directory, name=f"daemon-{index}",
                    cpus=core if layout.pinned else None))
                    for index, part in enumerate(layout.parts)]
                profile = (options.out_dir / layout.profile
                           if layout.profile and options.profile else None)
                runs[layout.name] = burst(directory, port,
                                          directory / f"mosquitto-{layout.broker}.conf",
                                          daemons, consumer, count, load_core, profile)
                if runs[layout.name]["profile"] is not None:
                    result.profiles.append(f"profiles/{runs[layout.name]['profile'].name}")
                if layout.paced and with_sink and consumer is not None:
                    runs[layout.paced] = paced(directory, port, daemons[0], consumer, options,
                                               load_core, result,
                                               layout.profile.replace("burst", "paced"))
    report(result, options, count, raw, runs, with_sink, core)
    if not with_sink:
        reason = missing_sink or "RabbitMQ is not running on 127.0.0.1:5672"
        result.notes.insert(0, f"**{reason}.** The RabbitMQ figures (events/s delivered with "
                            "confirms through the outbox, end-to-end loss, paced latency "
                            "p50/p99) are not measured; the harness runs them as soon as "
                            "`sinks:` exists.")
    result.seconds = time.monotonic() - started
    return result


def report(result: ScenarioResult, options: Options, count: int,
           raw: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]], with_sink: bool,
           core: int | None) -> None:
    """Turn the measurements into figures, baselines, the side-by-side table and the chart."""
    rows: list[list[str]] = []
    pinned_text = f"core {core}" if core is not None else "not pinned"

    def through(measured: dict[str, Any]) -> float | None:
        """Messages all the way through per second: delivered events / 2 for the daemon."""
        if "delivered" not in measured:  # aiomqtt alone: received is through
            return per_second(measured["received"], measured["seconds"])
        if measured["delivered"] is None:
            return per_second(measured["received"], measured["ingest_seconds"])
        return per_second(measured["delivered"] / 2, measured["delivered_seconds"])

    for kind, baseline in raw.items():
        alone_rate = through(baseline)
        per_10k = cpu_per_10k(baseline["cpu"], baseline["received"])
        label = f"aiomqtt alone (json.loads + count), {kind} broker"
        result.baselines += [
            Figure(f"{label}: messages/s", alone_rate, "msg/s",
                   note=f"{pinned_text}; publisher "
                   f"{baseline['sent'] / baseline['publish_seconds']:.0f} msg/s; first "
                   "publish to last message"),
            Figure(f"{label}: lost at the broker", lost_percent(baseline), "%",
                   note=f"{baseline['sent'] - baseline['received']} of {baseline['sent']}"),
            Figure(f"{label}: CPU s per 10,000 messages", per_10k, "s"),
        ]
        rows.append([f"aiomqtt alone, {kind} broker", pinned_text,
                     _text(alone_rate, "msg/s"),
                     f"({_text(2 * alone_rate if alone_rate else None, 'events/s')} at two a "
                     "message)",
                     _text(lost_percent(baseline), "%"), _text(per_10k, "s")])
        daemon_name = ONE if kind == STOCK else TUNED_ONE
        if daemon_name not in runs:
            continue
        measured = runs[daemon_name]
        daemon_rate = through(measured)
        daemon_per_10k = cpu_per_10k(measured["cpu"], measured["received"])
        events = per_second(measured["delivered"], measured["delivered_seconds"])
        rows.append([f"{daemon_name.split(',')[0]}, {kind} broker", pinned_text,
                     _text(daemon_rate, "msg/s"), _text(events, "events/s"),
                     _text(lost_percent(measured), "%"), _text(daemon_per_10k, "s")])
        loss_gap = lost_percent(measured) - lost_percent(baseline)
        rows.append([f"ratio daemon / aiomqtt alone, {kind} broker", "",
                     _text(_ratio(daemon_rate, alone_rate), "x"),
                     _text(_ratio(events, 2 * alone_rate if alone_rate else None), "x"),
                     f"{loss_gap:+.2f} points", _text(_ratio(daemon_per_10k, per_10k), "x")])
        result.baselines += [
            Figure(f"one daemon / aiomqtt alone, {kind} broker: messages/s through",
                   _ratio(daemon_rate, alone_rate), "x",
                   note="the daemon's messages delivered into RabbitMQ (events / 2) against "
                   "aiomqtt's messages counted, both from the first publish"),
            Figure(f"one daemon / aiomqtt alone, {kind} broker: CPU per 10,000 messages",
                   _ratio(daemon_per_10k, per_10k), "x"),
            Figure(f"one daemon - aiomqtt alone, {kind} broker: lost at the broker",
                   loss_gap, "points"),
        ]
    for layout in LAYOUTS:
        if layout.name not in runs:
            continue
        name, measured = layout.name, runs[layout.name]
        burst_name = f"burst, {name}"
        is_pinned = layout.pinned
        cpu_note = (f"daemon on {pinned_text}" if is_pinned else
                    f"whole process tree: {measured['processes']} processes (daemons, "
                    "workers, helpers)")
        lost = lost_percent(measured)
        lost_note = (f"{measured['sent'] - measured['received']} of {measured['sent']} "
                     "messages published never reached the daemon")
        if name == ONE and STOCK in raw:
            lost_figure = goal("S1", f"{burst_name}: lost at the broker").figure(
                lost, lost_note, bound=lost_percent(raw[STOCK]),
                target=f"<= {lost_percent(raw[STOCK]):.2f} % (aiomqtt alone, same run)")
        elif name == WORKERS:
            lost_figure = goal("S1", f"{burst_name}: lost at the broker").figure(lost, lost_note)
        elif name == ALL:
            lost_figure = exactly(f"{burst_name}: lost at the broker", lost, "%", 0,
                                  note=lost_note)
        else:
            lost_figure = Figure(f"{burst_name}: lost at the broker", lost, "%",
                                 note=lost_note)
        ingest_rate = per_second(measured["received"], measured["ingest_seconds"])
        per_10k = cpu_per_10k(measured["cpu"], measured["received"])
        cpu_name = f"{burst_name}: CPU s per 10,000 messages"
        result.figures += [
            lost_figure,
            Figure(f"{burst_name}: ingest rate", ingest_rate, "msg/s",
                   note=f"first publish to last reading; publisher "
                   f"{measured['sent'] / measured['publish_seconds']:.0f} msg/s"),
            goal("S1", cpu_name).figure(per_10k, cpu_note) if name == ONE
            else Figure(cpu_name, per_10k, "s", note=cpu_note),
            Figure(f"{burst_name}: peak RSS", measured["rss"], "MB",
                   note="whole process tree"),
        ]
        if with_sink:
            delivered = measured["delivered"] or 0
            events = per_second(delivered, measured["delivered_seconds"])
            events_name = f"{burst_name}: events/s delivered into RabbitMQ (confirms, outbox)"
            result.figures += [
                goal("S1", events_name).figure(events, "first publish to last delivery")
                if name == ONE else Figure(events_name, events, "events/s"),
                exactly(f"{burst_name}: events lost between the daemon and RabbitMQ",
                        2 * measured["received"] - delivered, "events", 0,
                        note="two events for every message the daemon read"),
            ]
            shares = measured["shares"]
            result.figures.append(Figure(
                f"{burst_name}: CPU busy, burst to last delivery (2 cores = 200 %)",
                100 * shares["whole machine (2 cores)"], "%",
                note=", ".join(f"{key} {100 * share:.0f} %" for key, share in shares.items()
                               if key != "whole machine (2 cores)")))
            if name == ONE and events is not None:
                result.chart["S1 burst events/s (>=15k)"] = events / 15_000
        if name == ONE and per_10k:
            result.chart["S1 burst CPU/10k (<=1.0 s)"] = 1.0 / per_10k
        if name == WORKERS:
            result.chart["S1 workers: 2, no loss"] = (measured["received"]
                                                      / max(1, measured["sent"])) ** 8
        if not layout.pinned:
            rows.append([name, "not pinned", _text(through(measured), "msg/s"),
                         _text(per_second(measured["delivered"], measured["delivered_seconds"]),
                               "events/s"), _text(lost, "%"), _text(per_10k, "s")
                         + f" ({measured['processes']} processes)"])
    result.tables.append(Table(
        f"Burst of {count:,} messages, same run: the daemon beside aiomqtt alone",
        ["", "core", "messages/s through", "events/s delivered", "lost at the broker",
         "CPU s / 10k messages"], rows,
        note="Messages/s through: from the first publish to the last message counted "
        "(aiomqtt) or the last event delivered into RabbitMQ (the daemon, events / 2). "
        "CPU per 10,000 messages read. The stock broker is the headline; the tuned broker "
        "(unbounded per-client queue) is the extra row that hides loss at the broker."))
    for layout in LAYOUTS:
        if not layout.paced or layout.paced not in runs:
            continue
        measured = runs[layout.paced]
        latency, inside = measured["latency_ms"], measured.get("from_received_ms", {})
        per_10k = cpu_per_10k(measured["cpu"], measured["messages"])
        is_headline = layout.paced == S1_PACED
        p99_name = f"{layout.paced}: latency p99 (payload ts to consumer)"
        cpu_name = f"{layout.paced}: CPU s per 10,000 messages"
        receipt = f"from the bridge's receipt: {inside.get('p99', float('nan')):.1f} ms"
        cpu_note = (f"daemon on {pinned_text}" if layout.pinned else
                    f"whole process tree: {measured['processes']} processes")
        result.figures += [
            Figure(f"{layout.paced}: latency p50 (payload ts to consumer)", latency["p50"],
                   "ms", note=f"from the bridge's receipt: {inside.get('p50', float('nan')):.1f}"
                   " ms"),
            goal("S1", p99_name).figure(latency["p99"], receipt) if is_headline
            else at_most(p99_name, latency["p99"], "ms", 10, note=receipt),
            goal("S1", cpu_name).figure(per_10k, cpu_note) if is_headline
            else Figure(cpu_name, per_10k, "s", note=cpu_note),
        ]
        if is_headline:
            result.chart["S1 paced p99 (<10 ms)"] = 10 / max(1e-3, latency["p99"])
            if per_10k:
                result.chart["S1 paced CPU/10k (<=1.6 s)"] = 1.6 / per_10k
    if not with_sink:
        result.figures += [
            goal("S1", f"{S1_BURST}: events/s delivered into RabbitMQ (confirms, outbox)")
            .figure(None, "sink not available"),
            goal("S1", f"{S1_PACED}: latency p99 (payload ts to consumer)")
            .figure(None, "sink not available"),
        ]
    if options.quick or options.messages:
        result.notes.append(f"Burst of {count:,} messages (a short run: smoke figures).")


if __name__ == "__main__":
    from bench.suite import main

    raise SystemExit(main(["--only", "S1"]))
