"""The MQTT client candidates for the MQTT source, side by side on S1's load: aiomqtt (paho)
and gmqtt, each on asyncio's loop and on uvloop.

Each candidate is a subscriber process pinned to core 1 (``subscriber.py``: ``json.loads``
of every payload and a count, nothing else), against the stock Mosquitto on 127.0.0.1:1883;
the publisher (``bench.peers.mqtt_publisher``, paho, a burst of ``--messages`` JSON messages
``{"temp", "hum", "ts"}`` to ``sensors/dev{0..99}/telemetry``) and this driver run on core 0.
Three modes:

- **QoS 0 burst**: published and subscribed at QoS 0, as S1's headline burst.
- **QoS 1 at 2,000 msg/s** (S1's paced rate), **PUBACK after the commit**: published and
  subscribed at QoS 1; the subscriber sends each PUBACK only after the batch holding the
  message went through an awaited hand-off to a thread (``loop.run_in_executor``), as the
  daemon acknowledges after its store commit.
- **QoS 1, 8,000 msg/s asked** (the rate the issue measured at), acknowledged the same way.
  The table shows the rate the publisher reached: a paho QoS 1 publisher may not reach it on
  a busy core. The stock broker holds about 1,000 unacknowledged QoS 1 messages for a
  subscriber (``max_queued_messages``) and drops what comes beyond ("Outgoing messages are
  being dropped" in its log): a candidate that falls that far behind loses messages there.

A QoS 1 burst is not a mode: it measures the broker's queue overflowing more than the
client, and the publisher's speed decides how much.

At QoS 1 a sixth candidate, ``gmqtt-direct``, is gmqtt with its per-message task replaced
through a private hook (``subscriber.py`` says how): what gmqtt would cost if it let a
caller acknowledge by packet id.

Figures per run: the subscriber's CPU (user + system, all threads, ``resource.getrusage``)
per message read, messages read per second (first to last message) and the share of the
burst lost (at the broker: Mosquitto's queue holds 1,000 messages per client by default).
Each round runs every candidate once, in turn (the order reversed every other round); the
gain of a candidate is aiomqtt-on-asyncio's CPU per message divided by the candidate's, both
from the same round. Reported: the median and range over the rounds.

Run: ``.venv/bin/python -m bench.experiments.mqtt_clients.run`` (about 9 minutes); the table
is printed and written to ``bench/results/experiments/mqtt_clients/results.md``, which
``python -m bench --report-only`` puts into ``bench/results/RESULTS.md``; every run's figures
are kept in ``runs.json`` beside it (``--report-only`` renders ``results.md`` from them
again).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.figures import RESULTS
from bench.harness import DAEMON_CORE, LOAD_CORE, Peer, PeerError, workdir
from bench.report import machine

OUTPUT = RESULTS / "experiments" / "mqtt_clients"
"""Where the table and the runs go: with the bench's other generated output."""
RUNS = OUTPUT / "runs.json"
"""Every run of the last measurement, for ``--report-only``."""
CANDIDATES = (("aiomqtt", "asyncio"), ("aiomqtt", "uvloop"), ("gmqtt", "asyncio"),
              ("gmqtt", "uvloop"), ("gmqtt-direct", "asyncio"), ("gmqtt-direct", "uvloop"))
REFERENCE = ("aiomqtt", "asyncio")
DAEMON_TODAY = ("aiomqtt", "uvloop")
"""The daemon's client and loop today (uvloop is its default loop where installed)."""
PACED_RATE = 2000.0
"""S1's paced rate, messages/s."""
FAST_RATE = 8000.0
"""The rate the issue measured the clients at, messages/s."""


@dataclass(frozen=True)
class Mode:
    """How the messages are published and acknowledged."""

    qos: int
    rate: float
    """Messages/s asked of the publisher; 0: a burst at full speed."""

    @property
    def name(self) -> str:
        """As the table shows it."""
        if not self.rate:
            return f"QoS {self.qos} burst"
        return f"QoS {self.qos}, {self.rate:,.0f} msg/s asked, PUBACK after the commit"

    def clients(self) -> tuple[tuple[str, str], ...]:
        """The candidates measured in this mode (``gmqtt-direct`` differs only at QoS 1)."""
        return tuple(candidate for candidate in CANDIDATES
                     if self.qos or candidate[0] != "gmqtt-direct")


MODES = (Mode(0, 0.0), Mode(1, PACED_RATE), Mode(1, FAST_RATE))


@dataclass(frozen=True)
class Run:
    """One candidate's figures in one round."""

    client: str
    loop: str
    mode: Mode
    round: int
    sent: int
    published_seconds: float
    """The publisher's time to hand out every message (at QoS 1: until the broker's last
    PUBACK)."""
    received: int
    seconds: float
    cpu_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """For runs.json."""
        fields = asdict(self)
        fields["mode"] = asdict(self.mode)
        return fields

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Run:
        """From runs.json."""
        mode = Mode(qos=fields["mode"]["qos"], rate=fields["mode"]["rate"])
        return cls(**{**fields, "mode": mode})

    @property
    def cpu_us(self) -> float:
        """CPU µs per message read."""
        return self.cpu_seconds / max(1, self.received) * 1e6

    @property
    def rate(self) -> float:
        """Messages read per second, first to last."""
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def loss(self) -> float:
        """Share of the burst never read, %."""
        return 100 * (self.sent - self.received) / self.sent


def one(client: str, loop: str, mode: Mode, messages: int, commit_ms: float, round_: int,
        directory: Path) -> Run:
    """Run one candidate against one load."""
    name = f"{client}-{loop}-qos{mode.qos}-rate{mode.rate:g}-r{round_}"
    with Peer("bench.experiments.mqtt_clients.subscriber", "--client", client, "--loop", loop,
              "--qos", str(mode.qos), "--commit-ms", str(commit_ms), "--expect",
              str(messages), name=name, log_dir=directory, cpus=DAEMON_CORE) as subscriber:
        subscriber.wait_ready()
        with Peer("bench.peers.mqtt_publisher", "--count", str(messages), "--qos",
                  str(mode.qos), "--rate", str(mode.rate), name=f"publisher-{name}",
                  log_dir=directory, cpus=LOAD_CORE) as publisher:
            publisher.wait_ready()
            published = publisher.wait_result(timeout=300)
        sent = published["sent"]
        result = subscriber.wait_result(timeout=120)
    if result["received"] > sent:
        raise PeerError(f"{name} read {result['received']} of {sent} published: another "
                        f"publisher on the shared broker's topics?")
    return Run(client, loop, mode, round_, sent, published["seconds"], result["received"],
               result["seconds"], result["cpu_seconds"])


def _spread(values: list[float], digits: int) -> str:
    low, high = min(values), max(values)
    return f"{statistics.median(values):,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def _gain(ratios: list[float]) -> str:
    return f"{_spread(ratios, 2)}x" if ratios else ""


def table(runs: list[Run]) -> list[str]:
    """The markdown table: per mode and candidate, median (range) over the rounds."""
    lines = ["| mode | client, loop | CPU µs per message | gain over aiomqtt on asyncio | gain "
             "over aiomqtt on uvloop (the daemon today) | msgs/s read | msgs/s published | "
             "lost at the broker |", "|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        costs = {(run.client, run.loop, run.round): run.cpu_us for run in runs
                 if run.mode == mode}
        for client, loop in mode.clients():
            mine = [run for run in runs if (run.client, run.loop) == (client, loop)
                    and run.mode == mode]
            if not mine:
                continue
            gain, gain_today = (
                _gain([costs[(*reference, run.round)] / run.cpu_us for run in mine
                       if (*reference, run.round) in costs])
                for reference in (REFERENCE, DAEMON_TODAY))
            cpu = _spread([run.cpu_us for run in mine], 1)
            published = statistics.median(run.sent / run.published_seconds for run in mine)
            lines.append(f"| {mode.name} | {client}, {loop} | {cpu} | {gain} | {gain_today} | "
                         f"{_spread([run.rate for run in mine], 0)} | {published:,.0f} | "
                         f"{_spread([run.loss for run in mine], 1)} % |")
    return lines


def report(runs: list[Run], options: argparse.Namespace, info: dict[str, object]) -> str:
    """``results.md``: what was run, on what, and the table."""
    versions = {name: metadata.version(name) for name in ("aiomqtt", "paho-mqtt", "gmqtt",
                                                          "uvloop")}
    versions["mosquitto"] = info["versions"]["mosquitto"]  # type: ignore[index]
    rounds = max(run.round for run in runs)
    out = [
        "## Experiment: MQTT client candidates for the MQTT source",
        "",
        f"Generated by `python -m bench.experiments.mqtt_clients.run` on {info['date']} "
        f"(commit `{info['commit']}`), load average at start {info['load_average_at_start']}"
        f": {options.messages:,} messages a burst, {options.paced_seconds:g} s a paced load, "
        f"{rounds} rounds, simulated commit "
        f"{options.commit_ms:g} ms. Versions: "
        + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".",
        "",
        "Each candidate subscribes alone, pinned to core 1 (`taskset -c 1`), decoding each "
        "message with `json.loads`; the paho publisher and the driver run on core 0, the "
        "stock Mosquitto on 127.0.0.1:1883 (default configuration, MQTT 3.1.1; about 1,000 "
        "messages held for a subscriber that falls behind, the rest dropped) unpinned. CPU "
        "is the subscriber's user + "
        "system time (`getrusage`, every thread) per message read. Median (range) over the "
        "rounds; a gain is the reference's CPU per message over the candidate's, in the "
        "same round (aiomqtt on uvloop is what the daemon runs today). Measured while "
        "other work shared the machine: the ratios, not the absolute figures, are the "
        "result.",
        "",
        *table(runs),
        "",
        "Every run:",
        "",
        "| round | mode | client, loop | published | published msg/s | read | seconds, first "
        "to last | CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [f"| {run.round} | {run.mode.name} | {run.client}, {run.loop} | {run.sent:,} | "
            f"{run.sent / run.published_seconds:,.0f} | {run.received:,} | {run.seconds:.2f} | "
            f"{run.cpu_seconds:.2f} |" for run in runs]
    return "\n".join(out) + "\n"


def main() -> None:
    """Run every candidate in every mode, ``--rounds`` times; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000, help="a burst")
    parser.add_argument("--paced-seconds", type=float, default=10.0,
                        help="how long each paced load lasts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--commit-ms", type=float, default=0.0,
                        help="how long each simulated commit sleeps on its thread (QoS 1)")
    parser.add_argument("--output", type=Path, default=OUTPUT / "results.md")
    parser.add_argument("--report-only", action="store_true",
                        help="render the table again from the runs kept in runs.json")
    options = parser.parse_args()
    if options.report_only:
        data = json.loads(RUNS.read_text())
        runs = [Run.from_dict(run) for run in data["runs"]]
        options.output.write_text(report(runs, argparse.Namespace(**data["options"]),
                                         data["machine"]))
        return
    os.sched_setaffinity(0, {LOAD_CORE})
    info = machine()
    runs = []
    with workdir("mqtt-clients") as directory:
        for round_ in range(1, options.rounds + 1):
            for mode in MODES:
                order = mode.clients() if round_ % 2 else tuple(reversed(mode.clients()))
                messages = (round(mode.rate * options.paced_seconds) if mode.rate
                            else options.messages)
                for client, loop in order:
                    run = one(client, loop, mode, messages, options.commit_ms, round_,
                              directory)
                    print(f"round {round_} {mode.name:45} {client:12} {loop:7} "
                          f"{run.cpu_us:6.1f} µs/msg {run.rate:8,.0f} msg/s "
                          f"lost {run.loss:5.1f} %", file=sys.stderr, flush=True)
                    runs.append(run)
    RUNS.write_text(json.dumps({
        "machine": info,
        "options": {key: getattr(options, key)
                    for key in ("messages", "paced_seconds", "rounds", "commit_ms")},
        "runs": [run.to_dict() for run in runs]}, indent=1) + "\n")
    text = report(runs, options, info)
    options.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
