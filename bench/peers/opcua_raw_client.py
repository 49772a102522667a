"""Baseline for S3: asyncua alone subscribing to every variable and counting notifications.

The same subscription settings as the daemon's bench config (publishing interval 100 ms,
queue size 1, the async-iterator API); prints the time to subscribe all, then notifications
per second over ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from asyncua import Client, ua
from asyncua.common.subscription import DataChangeEvent

from bench.peers.control import say


async def main() -> None:
    """Subscribe, count, print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--variables", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    options = parser.parse_args()
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    client = Client(options.url, timeout=30)
    started = time.monotonic()
    async with client:
        parameters = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=100, RequestedLifetimeCount=600,
            RequestedMaxKeepAliveCount=50, MaxNotificationsPerPublish=0,
            PublishingEnabled=True, Priority=0)
        subscription = await client.create_subscription(parameters, None,
                                                        queue_maxsize=100_000)
        requests = [
            ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(NodeId=ua.NodeId(f"v{index:05d}", 2),
                                             AttributeId=ua.AttributeIds.Value),
                MonitoringMode=ua.MonitoringMode.Reporting,
                RequestedParameters=ua.MonitoringParameters(
                    ClientHandle=index + 1, SamplingInterval=-1, QueueSize=1,
                    DiscardOldest=True))
            for index in range(options.variables)
        ]
        for offset in range(0, len(requests), 1000):
            await subscription.create_monitored_items(requests[offset:offset + 1000])
        subscribed = time.monotonic() - started
        say({"ready": {"subscribe_seconds": subscribed}})
        count = 0
        window_start = time.monotonic() + options.warmup
        window_end = window_start + options.seconds
        counted = 0
        async for event in subscription:
            if isinstance(event, DataChangeEvent):
                now = time.monotonic()
                if now >= window_end:
                    break
                if now >= window_start:
                    counted += 1
                count += 1
        say({"subscribe_seconds": subscribed, "notifications": counted,
             "seconds": options.seconds})


if __name__ == "__main__":
    asyncio.run(main())
