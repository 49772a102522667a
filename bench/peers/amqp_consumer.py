"""S1 consumer: counts the events the daemon publishes to RabbitMQ and their latency.

Declares a server-named exclusive queue bound with ``#`` to ``--exchange`` (declared topic and
durable, as the sink declares it), consumes without acks in a thread, and keeps for every
message the latency from the event's ``ts`` (the payload timestamp) to its arrival here.

Commands: ``stats`` (received, p50/p99 latency in ms since the last ``reset``), ``reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from typing import Any

import pika

from bench.peers.control import say, serve_commands
from bench.peers.event_counts import EventCounts


class Consumer:
    """The consuming thread and its counters."""

    def __init__(self, host: str, port: int, exchange: str) -> None:
        self.counts = EventCounts()
        self.connection = pika.BlockingConnection(pika.ConnectionParameters(host, port))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(exchange, "topic", durable=True)
        queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.channel.queue_bind(queue, exchange, routing_key="#")
        self.channel.basic_qos(prefetch_count=2000)
        self.channel.basic_consume(queue, self._on_message, auto_ack=True)
        self.thread = threading.Thread(target=self.channel.start_consuming, daemon=True)

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.counts.add(body)

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
            return consumer.counts.reset()
        return consumer.counts.stats()

    try:
        await serve_commands(handle)
    finally:
        consumer.stop()


if __name__ == "__main__":
    asyncio.run(main())
