"""BACnet polling of 1,000 objects on two devices: the connector beside bacpypes3 alone.

Two bacpypes3 devices on loopback UDP ports hold 500 analog values each. The connector polls
every present-value (with each object's status flags and reliability, which give the event's
quality) in ReadPropertyMultiple batches sized to the devices' max APDU, and maps the readings
into events; bacpypes3 alone does the same reads in the same batches and keeps the raw values.
Figures: points per second (each point read once per cycle, back to back) and requests per
cycle. Devices and clients share one process and one event loop, so the figures are the whole
exchange's CPU, both ends; the ratio is the result.
Run: ``python -m bench.experiments.bacnet_poll.run`` (``--objects``, ``--cycles``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bacpypes3.app import Application
from bacpypes3.local.analog import AnalogValueObject
from bacpypes3.local.device import DeviceObject
from bacpypes3.local.networkport import NetworkPortObject
from bacpypes3.pdu import Address
from bacpypes3.primitivedata import ObjectIdentifier, PropertyIdentifier

from bridge.config.models import ReportSpec, ResolvedPoint
from bridge.core.model import Reading
from bridge.core.source import SourceContext
from bridge.core.status import EndpointStatus
from protocols.bacnet.config import BacnetDevice, BacnetPoint, BacnetSourceConfig
from protocols.bacnet.mapping import BacnetMapper
from protocols.bacnet.reads import batch_size
from protocols.bacnet.source import BacnetSource

OUTPUT = Path(__file__).resolve().parents[2] / "results" / "experiments" / "bacnet_poll"
PROPERTIES = [PropertyIdentifier("present-value"), PropertyIdentifier("status-flags"),
              PropertyIdentifier("reliability")]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _device(instance: int, port: int, objects: int) -> Application:
    device = DeviceObject(objectIdentifier=("device", instance), objectName=f"dev-{instance}",
                          vendorIdentifier=999, maxApduLengthAccepted=1476,
                          segmentationSupported="segmented-both")
    network = NetworkPortObject(f"127.0.0.1:{port}", objectIdentifier=("network-port", 1),
                                objectName="NetworkPort-1")
    values = [AnalogValueObject(objectIdentifier=("analog-value", index),
                                objectName=f"value-{index}", presentValue=float(index),
                                units="percent", statusFlags=[0, 0, 0, 0],
                                outOfService=False, eventState="normal")
              for index in range(1, objects + 1)]
    return Application.from_object_list([device, network, *values])


async def _connector(ports: list[int], objects: int, cycles: int) -> dict[str, float]:
    devices = [BacnetDevice(id=f"dev{number}", instance=number, address=f"127.0.0.1:{port}",
                            interval=3600,
                            points=[BacnetPoint(name=f"v{index}", object=f"analog-value,{index}",
                                                mode="poll")
                                    for index in range(1, objects + 1)])
               for number, port in enumerate(ports, start=1)]
    config = BacnetSourceConfig(id="bench", protocol="bacnet",
                                bind=f"127.0.0.1:{_free_port()}", who_is=[], devices=devices)
    points = [ResolvedPoint(id=f"{device.id}.{point.name}", source="bench", device=device.id,
                            spec=point, tags={}, report=ReportSpec(),
                            path=("sources", 0, "devices", number, "points", index))
              for number, device in enumerate(devices) for index, point in enumerate(
                  device.points)]
    source = BacnetSource(config, points)
    mapper = BacnetMapper(points, bridge_id="bench")
    events = 0
    first = asyncio.Event()

    async def publish(readings: Any) -> None:
        nonlocal events
        for reading in readings:
            assert isinstance(reading, Reading)
            events += len(mapper.map(reading))
        if events >= len(points):
            first.set()

    status = EndpointStatus(name="bench", kind="source", protocol="bacnet", endpoint="")
    task = asyncio.create_task(source.run(SourceContext(status=status, publish=publish)),
                               name="bench-bacnet")
    try:
        await first.wait()
        reader = source.reader
        assert reader is not None
        states = source.devices
        requests_before = reader.requests
        started = time.perf_counter()
        for _ in range(cycles):
            for state in states:
                assert state.address is not None
                results = await reader.read(
                    state.address, state.poll_items(), multiple=True,
                    per_request=batch_size(state.max_apdu, state.segmentation))
                await publish(state.readings("bench", results, time.time()))
        elapsed = time.perf_counter() - started
        return {"points/s": len(points) * cycles / elapsed,
                "requests/cycle": (reader.requests - requests_before) / cycles}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _bacpypes_alone(ports: list[int], objects: int, cycles: int) -> dict[str, float]:
    device = DeviceObject(objectIdentifier=("device", 4194000), objectName="reader",
                          vendorIdentifier=999, maxApduLengthAccepted=1476,
                          segmentationSupported="segmented-both")
    network = NetworkPortObject(f"127.0.0.1:{_free_port()}",
                                objectIdentifier=("network-port", 1), objectName="np")
    app = Application.from_object_list([device, network])
    per_request = batch_size(1476, "segmented-both")
    items = [(ObjectIdentifier(("analog-value", index)), prop)
             for index in range(1, objects + 1) for prop in PROPERTIES]
    requests = 0
    kept: list[Any] = []
    try:
        started = time.perf_counter()
        for _ in range(cycles):
            for port in ports:
                address = Address(f"127.0.0.1:{port}")
                for start in range(0, len(items), per_request):
                    grouped: dict[ObjectIdentifier, list[PropertyIdentifier]] = {}
                    for object_id, prop in items[start:start + per_request]:
                        grouped.setdefault(object_id, []).append(prop)
                    parameters: list[Any] = []
                    for object_id, props in grouped.items():
                        parameters.extend((object_id, props))
                    kept = await app.read_property_multiple(address, parameters)
                    requests += 1
        elapsed = time.perf_counter() - started
    finally:
        app.close()
    assert kept
    return {"points/s": objects * len(ports) * cycles / elapsed,
            "requests/cycle": requests / cycles}


async def _run(objects: int, cycles: int) -> tuple[dict[str, float], dict[str, float]]:
    ports = [_free_port(), _free_port()]
    devices = [_device(number, port, objects) for number, port in enumerate(ports, start=1)]
    try:
        connector = await _connector(ports, objects, cycles)
        alone = await _bacpypes_alone(ports, objects, cycles)
    finally:
        for device in devices:
            device.close()
    return connector, alone


def main() -> None:
    """Run, print and write ``results.md``."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=500, help="objects per device (two)")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--output", type=Path, default=OUTPUT / "results.md")
    options = parser.parse_args()
    connector, alone = asyncio.run(_run(options.objects, options.cycles))
    moment = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Experiment: BACnet polling, the connector beside bacpypes3 alone",
        "",
        f"Generated by `python -m bench.experiments.bacnet_poll.run` on {moment}: "
        f"{2 * options.objects:,} analog values on two bacpypes3 devices (loopback, one "
        f"process), {options.cycles} cycles back to back; each point's present-value, "
        "status flags and reliability read by ReadPropertyMultiple in batches sized to a "
        "1476-byte segmented APDU. The connector also maps every reading into an event.",
        "",
        "| reader | points/s | requests per cycle |",
        "|---|---|---|",
        f"| Fieldbridge BACnet connector | {connector['points/s']:,.0f} | "
        f"{connector['requests/cycle']:g} |",
        f"| bacpypes3 alone (same batches) | {alone['points/s']:,.0f} | "
        f"{alone['requests/cycle']:g} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
