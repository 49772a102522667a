"""S1 load: JSON telemetry to ``sensors/dev{0..99}/telemetry`` at QoS 0 (``--qos 1``: QoS 1).

``--count`` messages at full speed (``--rate 0``) or paced at ``--rate`` messages a second.
Each payload is ``{"temp": 21.5, "hum": 40, "ts": <epoch ms, fractional>}``, ``ts`` taken
just before the publish call. Prints one JSON line when done: messages sent and seconds.
At QoS 1 up to 1,000 messages await the broker's PUBACK and up to 10,000 wait in paho's
queue; past that the publisher waits for room (paho refuses a message whose packet id is
still in use, so an unbounded queue would lose messages once 65,535 were outstanding). It
ends once the broker has acknowledged the last one.
"""

from __future__ import annotations

import argparse
import json
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.peers.control import say

DEVICES = 100
IN_FLIGHT = 1000
QUEUED = 10_000
"""QoS 1: messages awaiting a PUBACK, and waiting behind them (QoS 0 is never queued)."""


def main() -> None:
    """Publish, then report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: full speed")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    options = parser.parse_args()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.max_queued_messages_set(QUEUED)
    client.max_inflight_messages_set(IN_FLIGHT)
    client.connect(options.host, options.port, keepalive=60)
    client.loop_start()
    say({"ready": {}})
    topics = [f"sensors/dev{device}/telemetry" for device in range(DEVICES)]
    started = time.monotonic()
    interval = 1.0 / options.rate if options.rate else 0.0
    publish = client.publish
    last: paho.MQTTMessageInfo | None = None
    for index in range(options.count):
        if interval:
            due = started + index * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        payload = json.dumps({"temp": 21.5, "hum": 40, "ts": time.time() * 1000})
        last = publish(topics[index % DEVICES], payload, qos=options.qos)
        while last.rc == paho.MQTT_ERR_QUEUE_SIZE:
            time.sleep(0.001)
            last = publish(topics[index % DEVICES], payload, qos=options.qos)
    seconds = time.monotonic() - started
    # Wait until the last message is out: written to the socket (QoS 0, which paho counts as
    # published) or acknowledged (QoS 1); paho sends in order, so every earlier one is too.
    if last is not None:
        last.wait_for_publish(timeout=30)
    client.disconnect()
    client.loop_stop()
    say({"sent": options.count, "seconds": seconds})


if __name__ == "__main__":
    main()
