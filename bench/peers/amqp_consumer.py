"""S1 consumer: counts the events the daemon publishes to RabbitMQ and their latency.

Declares a server-named exclusive queue bound with ``#`` to ``--exchange`` (declared topic and
durable, as the sink declares it), consumes without acks in a thread, and keeps for every
message the latency from the event's ``ts`` (the payload timestamp) to its arrival here.

Commands: ``stats`` (received, p50/p99 latency in ms since the last ``reset``), ``reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time
from datetime import datetime
from typing import Any

import pika

from bench.harness import percentile
from bench.peers.control import say, serve_commands

_STAMPS = re.compile(rb'"ts": ?"([^"]+)".*?"received_at": ?"([^"]+)"')
"""The event's two times; a regular expression instead of a JSON parse keeps the consumer's
own cost per message low (it has to keep up with the daemon to count it)."""
_seconds: dict[bytes, float] = {}


def _epoch(stamp: bytes) -> float | None:
    """``2026-11-21T10:15:02.125Z`` as POSIX seconds; the whole second parsed once."""
    whole, fraction = stamp[:19], stamp[19:].rstrip(b"Z")
    base = _seconds.get(whole)
    if base is None:
        try:
            base = datetime.fromisoformat(whole.decode() + "+00:00").timestamp()
        except ValueError:
            return None
        _seconds[whole] = base
    try:
        return base + (float(fraction) if fraction else 0.0)
    except ValueError:
        return None


class Consumer:
    """The consuming thread and its counters."""

    def __init__(self, host: str, port: int, exchange: str) -> None:
        self.received = 0
        self.latencies: list[float] = []
        self.in_bridge: list[float] = []
        """From the daemon's receipt (``received_at``) to here: the bridge and RabbitMQ."""
        self.connection = pika.BlockingConnection(pika.ConnectionParameters(host, port))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(exchange, "topic", durable=True)
        queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.channel.queue_bind(queue, exchange, routing_key="#")
        self.channel.basic_qos(prefetch_count=2000)
        self.channel.basic_consume(queue, self._on_message, auto_ack=True)
        self.thread = threading.Thread(target=self.channel.start_consuming, daemon=True)

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        arrived = time.time()
        self.received += 1
        found = _STAMPS.search(body)
        if found is None:
            return
        sent, received = _epoch(found[1]), _epoch(found[2])
        if sent is None or received is None:
            return
        self.latencies.append((arrived - sent) * 1000)
        self.in_bridge.append((arrived - received) * 1000)

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset."""
        latencies, in_bridge = list(self.latencies), list(self.in_bridge)
        return {"received": self.received, "latency_ms": {
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
            "samples": len(latencies)}, "from_received_ms": {
            "p50": percentile(in_bridge, 0.5), "p99": percentile(in_bridge, 0.99)}}

    def reset(self) -> dict[str, Any]:
        """Zero the counters."""
        self.received = 0
        self.latencies = []
        self.in_bridge = []
        return {"reset": True}

    def stop(self) -> None:
        """Stop consuming and close."""
        self.connection.add_callback_threadsafe(self.channel.stop_consuming)
        self.thread.join(timeout=10)
        self.connection.close()


async def main() -> None:
    """Consume until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--exchange", required=True)
    options = parser.parse_args()
    consumer = Consumer(options.host, options.port, options.exchange)
    consumer.thread.start()
    say({"ready": {}})

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        if request["command"] == "reset":
            return consumer.reset()
        return consumer.stats()

    try:
        await serve_commands(handle)
    finally:
        consumer.stop()


if __name__ == "__main__":
    asyncio.run(main())
