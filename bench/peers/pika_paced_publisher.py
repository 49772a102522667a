"""Baseline for S1's paced run: pika alone publishing event-shaped messages at a steady rate.

Publishes ``--rate`` persistent messages a second for ``--seconds`` to ``--exchange``, each an
event whose ``ts`` and ``received_at`` are the moment of publishing, so the bench consumer's
latency is what RabbitMQ and the consumer themselves add: the floor under the daemon's figure.
Prints the messages sent and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import time

import pika

from bench.peers.control import say
from bridge.core.model import isoformat


def main() -> None:
    """Publish paced, then report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--rate", type=float, default=4000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    options = parser.parse_args()
    connection = pika.BlockingConnection(pika.ConnectionParameters(options.host, options.port))
    channel = connection.channel()
    channel.exchange_declare(options.exchange, "topic", durable=True)
    properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    say({"ready": {}})
    count = int(options.rate * options.seconds)
    started = time.monotonic()
    for index in range(count):
        delay = started + index / options.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = isoformat(time.time())
        body = json.dumps({"point": f"dev{index % 100}.temperature", "value": 21.5,
                           "ts": now, "received_at": now})
        channel.basic_publish(options.exchange, f"bench.dev{index % 100}", body, properties)
        if index % 100 == 0:
            connection.process_data_events(0)  # heartbeats and flow control
    seconds = time.monotonic() - started
    connection.close()
    say({"sent": count, "seconds": seconds})


if __name__ == "__main__":
    main()
