"""S1's paced run with the daemon in this process, timed at each stage of the flow.

MQTT (a stock Mosquitto the bench starts, or the shared one without the binary) → source →
router → store → outbox → AMQP sink → RabbitMQ → the bench consumer, at ``--rate`` messages
a second. Hooks on ``Router.submit``, ``Store.hold`` (the router's store write) and the
sink's ``publish`` record, per event, how long after the bridge received it (``received_at``)
the event was handed to the router and stored, how long store writes take and how large they
are, and how long after being stored it was published; the consumer adds the whole path.
Run: ``python -m bench.experiments.latency_stages.run [--commit-interval S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

from bench.harness import Peer, percentile, workdir
from bench.scenarios.s1_mqtt_rabbitmq import EXCHANGE, STOCK, config, mosquitto
from bridge.core.model import Event
from bridge.core.sink import OutboxRow
from bridge.core.status import ConnectionState
from bridge.pipeline.outbox import Admission
from bridge.pipeline.router import Router, Settlement
from bridge.pipeline.store import Store
from bridge.registry import load_config
from bridge.runtime import Runtime
from protocols.amqp.sink import AmqpSink

STAGES: dict[str, list[float]] = {
    "received -> handed to the router": [], "received -> stored": [],
    "store write (one batch)": [], "stored -> published to RabbitMQ": []}
BATCHES: list[float] = []


def _hook() -> None:
    submit, commit, publish = Router.submit, Store.commit, AmqpSink.publish

    async def timed_submit(self: Router, events: Sequence[Event],
                           settlements: Sequence[Settlement] = ()) -> None:
        now = time.time()
        STAGES["received -> handed to the router"].extend(now - e.received_at for e in events)
        await submit(self, events, settlements)

    async def timed_commit(self: Store, admission: Admission) -> None:
        started = time.perf_counter()
        await commit(self, admission)
        now = time.time()
        STAGES["store write (one batch)"].append(time.perf_counter() - started)
        BATCHES.append(len(admission.events))
        STAGES["received -> stored"].extend(now - e.received_at for e in admission.events)

    def timed_publish(self: AmqpSink, rows: Sequence[OutboxRow]) -> None:
        publish(self, rows)
        now = time.time()
        STAGES["stored -> published to RabbitMQ"].extend(now - row.created for row in rows)

    Router.submit = timed_submit  # type: ignore[method-assign]
    Store.commit = timed_commit  # type: ignore[method-assign]
    AmqpSink.publish = timed_publish  # type: ignore[method-assign]


async def main() -> None:
    """Run the paced load once and print the stages."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=2000, help="MQTT messages a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--commit-interval", type=float, default=None,
                        help="store.commit_interval (default: the daemon's)")
    parser.add_argument("--writer-checkpoints", action="store_true",
                        help="let the writer checkpoint (SQLite's default), not a thread")
    options = parser.parse_args()
    if options.writer_checkpoints:
        Store.CHECKPOINT_EVERY = None
    _hook()
    with workdir("latency") as directory, mosquitto(directory, STOCK, None) as own_port:
        port = 1883 if own_port is None else own_port
        document: dict[str, Any] = config(port, None, True)
        document["bridge"] = {"id": "bench", "state_dir": str(directory / "state")}
        document["api"] = {"enabled": False}
        if options.commit_interval is not None:
            document["store"] = {"commit_interval": options.commit_interval}
        path = directory / "config.yaml"
        path.write_text(json.dumps(document))
        runtime = Runtime(load_config(path))
        with Peer("bench.peers.amqp_consumer", "--exchange", EXCHANGE,
                  log_dir=directory) as consumer:
            consumer.wait_ready()
            task = asyncio.create_task(runtime.run())
            await runtime.ready.wait()
            statuses = [running.status for running in runtime.sources.values()]
            statuses += [running.status for running in runtime.sinks.values()]
            while any(status.state is not ConnectionState.UP for status in statuses):  # noqa: ASYNC110 - statuses have nothing to await
                await asyncio.sleep(0.05)
            for values in (*STAGES.values(), BATCHES):
                values.clear()
            consumer.ask("reset")
            with Peer("bench.peers.mqtt_publisher", "--port", str(port), "--count",
                      str(int(options.rate * options.seconds)), "--rate", str(options.rate),
                      log_dir=directory) as publisher:
                await asyncio.to_thread(publisher.wait_ready)
                await asyncio.to_thread(publisher.wait_result, options.seconds + 120)
            await asyncio.sleep(2)
            stats = consumer.ask("stats")
            runtime.stop()
            await task
    print(f"{options.rate} msg/s for {options.seconds:g} s, commit_interval "
          f"{runtime.config.store.commit_interval:g} s; milliseconds:")
    for name, values in STAGES.items():
        print(f"  {name:36s} p50 {1000 * percentile(values, 0.5):6.2f}  "
              f"p90 {1000 * percentile(values, 0.9):6.2f}  "
              f"p99 {1000 * percentile(values, 0.99):6.2f}  ({len(values)})")
    print(f"  {'events per store write':36s} p50 {percentile(BATCHES, 0.5):6.0f}  "
          f"p90 {percentile(BATCHES, 0.9):6.0f}  p99 {percentile(BATCHES, 0.99):6.0f}")
    inside, whole = stats["from_received_ms"], stats["latency_ms"]
    print(f"  {'received -> consumer':36s} p50 {inside['p50']:6.2f}  p99 {inside['p99']:6.2f}")
    print(f"  {'payload ts -> consumer':36s} p50 {whole['p50']:6.2f}  p99 {whole['p99']:6.2f}")


if __name__ == "__main__":
    asyncio.run(main())
