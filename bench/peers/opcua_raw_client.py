"""Baseline for S3: asyncua alone subscribing to every variable and counting notifications.

The same subscription settings as the daemon's bench config (publishing interval 100 ms,
queue size 1, the async-iterator API) and the daemon's connection check (a server-state read
every 5 s, its default ``keepalive``); prints the time to subscribe all, then notifications
per second over ``--seconds``.

Every wait is bounded. asyncua's connection check gives up when one read of the server state
takes longer than the check interval; without reconnecting, the client then marks itself
disconnected and the subscription's iterator never yields again. The peer notices the loss
(``connection_lost_callback``), stops counting and says so in its result (``error``) instead
of waiting for a notification that cannot come; ``--deadline`` bounds the whole run and the
disconnect is bounded too, so the peer always prints a result and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import DataChangeEvent, Subscription
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.uaerrors import UaError

from bench.peers.control import say

KEEPALIVE = 5.0
"""Seconds between checks of the connection: the daemon's default OPC-UA ``keepalive``."""
DISCONNECT_TIMEOUT = 10.0
POLL = 0.5
"""Longest wait for one notification before the loop looks at the clock and the connection."""


class Lost:
    """Set by asyncua's ``connection_lost_callback``: why the connection was given up."""

    def __init__(self) -> None:
        self.reason: str | None = None

    async def __call__(self, exc: Exception) -> None:
        self.reason = f"connection lost: {exc!r}"


async def subscribe(client: Client, variables: int) -> Subscription:
    """One subscription with a monitored item per variable, created 1,000 at a time."""
    parameters = ua.CreateSubscriptionParameters(
        RequestedPublishingInterval=100, RequestedLifetimeCount=600,
        RequestedMaxKeepAliveCount=50, MaxNotificationsPerPublish=0,
        PublishingEnabled=True, Priority=0)
    subscription = await client.create_subscription(parameters, None, queue_maxsize=100_000)
    requests = [
        ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(
                NodeId=ua.NodeId(ua.String(f"v{index:05d}"), ua.Int16(2)),
                AttributeId=AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(
                ClientHandle=index + 1, SamplingInterval=-1, QueueSize=1,
                DiscardOldest=True))
        for index in range(variables)
    ]
    for offset in range(0, len(requests), 1000):
        await subscription.create_monitored_items(requests[offset:offset + 1000])
    return subscription


async def count(subscription: Subscription, lost: Lost, warmup: float,
                seconds: float) -> tuple[int, str | None]:
    """Notifications received in the window after ``warmup``; and why counting stopped early,
    if it did."""
    window_start = time.monotonic() + warmup
    window_end = window_start + seconds
    counted = 0
    while True:
        now = time.monotonic()
        if now >= window_end:
            return counted, None
        if lost.reason is not None:
            return counted, lost.reason
        try:
            event = await subscription.next_event(timeout=min(POLL, window_end - now))
        except StopAsyncIteration:
            return counted, "the subscription was closed"
        if isinstance(event, DataChangeEvent) and time.monotonic() >= window_start:
            counted += 1


async def main() -> None:
    """Subscribe, count, print; always print a result and return."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--variables", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="seconds the connect, the subscription and the count may take "
                        "together")
    options = parser.parse_args()
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    lost = Lost()
    client = Client(options.url, timeout=30, watchdog_intervall=KEEPALIVE)
    client.connection_lost_callback = lost
    started = time.monotonic()
    result: dict[str, Any] = {"subscribe_seconds": None, "notifications": 0,
                              "seconds": options.seconds}
    try:
        async with asyncio.timeout(options.deadline):
            await client.connect()
            try:
                subscription = await subscribe(client, options.variables)
                result["subscribe_seconds"] = time.monotonic() - started
                say({"ready": {"subscribe_seconds": result["subscribe_seconds"]}})
                result["notifications"], error = await count(subscription, lost,
                                                             options.warmup, options.seconds)
                if error is not None:
                    result["error"] = error
            finally:
                await disconnect(client)
    except TimeoutError:
        result["error"] = f"not done within --deadline {options.deadline:g} s"
    except (OSError, UaError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    say(result)


async def disconnect(client: Client) -> None:
    """Close the session, the channel and the socket, or give up after a while: the result
    matters more than a tidy goodbye to a server that may have stopped answering."""
    try:
        async with asyncio.timeout(DISCONNECT_TIMEOUT):
            await client.disconnect()
    except (TimeoutError, OSError, UaError):
        client.disconnect_socket()


if __name__ == "__main__":
    asyncio.run(main())
