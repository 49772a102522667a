"""An asyncua server with ``--variables`` Double variables changing at ``--rate`` changes/s.

Variables are ``ns=2;s=v00000`` ... under Objects/Bench/groupNNN, 100 a folder. Every 50 ms
the server writes the next slice of variables (round robin), so each changes at
``rate / variables`` Hz. Writes go through ``write_attribute_value`` (the address space
directly, which still triggers the data-change notifications of subscriptions). The achieved
rate is reported: a Python server may not keep up with what was asked.

Commands: ``stats`` (changes written, achieved rate since the last ``reset``), ``reset``,
``rate`` (change the rate).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from datetime import UTC
from typing import Any

from asyncua import ua
from asyncua.server.monitored_item_service import MonitoredItemValues
from asyncua.server.server import Server
from asyncua.ua.object_ids import ObjectIds

from bench.harness import free_port
from bench.peers.control import say, serve_commands

TICK = 0.05


def _keep_datavalue(self: MonitoredItemValues, value: ua.DataValue) -> None:
    # asyncua deep-copies every written DataValue per monitored item, in case the writer
    # mutates it later; half the server's time at 15,000 changes/s. This server writes a new
    # DataValue every time and never touches it again, so the copy is not needed: without
    # it the generator, not the daemon, stops being the limit.
    self.old_dvalue = self.current_dvalue
    self.current_dvalue = value


MonitoredItemValues.set_current_datavalue = _keep_datavalue  # type: ignore[method-assign,assignment]


class BenchServer:
    """The server, its variables and the change loop."""

    def __init__(self, variables: int, rate: float) -> None:
        self.count = variables
        self.rate = rate
        self.server = Server()
        self.node_ids: list[ua.NodeId] = []
        self.changes = 0
        self.since = time.monotonic()
        self.port = 0

    async def start(self) -> None:
        """Build the address space and start serving."""
        self.port = free_port()
        await self.server.init()
        self.server.set_endpoint(f"opc.tcp://127.0.0.1:{self.port}/")
        self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        namespace = await self.server.register_namespace("urn:fieldbridge:bench")
        root = await self.server.nodes.objects.add_folder(namespace, "Bench")
        # asyncua scans a parent's references on every add (quadratic): 100 per folder.
        folders = [await root.add_folder(namespace, f"group{group:03d}")
                   for group in range((self.count + 99) // 100)]
        items = []
        for index in range(self.count):
            folder = folders[index // 100]
            node_id = ua.NodeId(ua.String(f"v{index:05d}"), ua.Int16(namespace))
            item = ua.AddNodesItem()
            item.RequestedNewNodeId = node_id
            item.BrowseName = ua.QualifiedName(f"v{index:05d}", namespace)
            item.NodeClass = ua.NodeClass.Variable
            item.ParentNodeId = folder.nodeid
            item.ReferenceTypeId = ua.NodeId(ua.Int32(ObjectIds.HasComponent))
            item.TypeDefinition = ua.NodeId(ua.Int32(ObjectIds.BaseDataVariableType))
            attributes = ua.VariableAttributes()
            attributes.DisplayName = ua.LocalizedText(f"v{index:05d}")
            attributes.DataType = ua.NodeId(ua.Int32(ObjectIds.Double))
            attributes.Value = ua.Variant(0.0, ua.VariantType.Double)
            attributes.ValueRank = ua.ValueRank.Scalar
            attributes.AccessLevel = ua.AccessLevel.CurrentRead.mask
            attributes.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
            item.NodeAttributes = attributes
            items.append(item)
            self.node_ids.append(node_id)
        for result in await self.server.iserver.isession.add_nodes(items):
            result.StatusCode.check()
        await self.server.start()

    async def change(self) -> None:
        """Write ``rate`` changes a second, round robin over the variables."""
        position = 0
        value = 0.0
        carry = 0.0
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            next_tick += TICK
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            carry += self.rate * TICK
            batch = int(carry)
            carry -= batch
            value += 1.0
            stamp = ua.DateTime.now(UTC)
            for _ in range(batch):
                data = ua.DataValue(ua.Variant(value + position, ua.VariantType.Double),
                                    SourceTimestamp=stamp)
                await self.server.write_attribute_value(self.node_ids[position], data)
                position = (position + 1) % self.count
            self.changes += batch

    def stats(self) -> dict[str, Any]:
        """Changes written and the achieved rate since the last reset."""
        seconds = time.monotonic() - self.since
        return {"changes": self.changes, "seconds": seconds,
                "rate": self.changes / seconds if seconds else 0.0}

    def reset(self) -> dict[str, Any]:
        """Zero the counter."""
        self.changes = 0
        self.since = time.monotonic()
        return {"reset": True}


async def main() -> None:
    """Serve until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variables", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=20_000)
    options = parser.parse_args()
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    bench = BenchServer(options.variables, options.rate)
    await bench.start()
    changer = asyncio.create_task(bench.change())
    say({"ready": {"url": f"opc.tcp://127.0.0.1:{bench.port}/", "namespace": 2}})

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        if request["command"] == "reset":
            return bench.reset()
        if request["command"] == "rate":
            bench.rate = float(request["rate"])
            return {"rate": bench.rate}
        return bench.stats()

    try:
        await serve_commands(handle)
    finally:
        changer.cancel()
        await bench.server.stop()


if __name__ == "__main__":
    asyncio.run(main())
