"""Simulated BACnet/IP devices for the BACnet tests: bacpypes3 applications on loopback, each
on a free UDP port, with an object of every type the connector maps.

A device can be stopped, restarted (on the same or another port, announcing itself with an
I-Am as a real controller does at start-up), and made to support or not support COV and
ReadPropertyMultiple.
"""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Any

from bacpypes3.app import Application
from bacpypes3.basetypes import ServicesSupported
from bacpypes3.errors import ExecutionError, UnrecognizedService
from bacpypes3.local.analog import AnalogInputObject, AnalogOutputObject, AnalogValueObject
from bacpypes3.local.binary import BinaryInputObject, BinaryOutputObject, BinaryValueObject
from bacpypes3.local.device import DeviceObject
from bacpypes3.local.multistate import (
    MultiStateInputObject,
    MultiStateOutputObject,
    MultiStateValueObject,
)
from bacpypes3.local.networkport import NetworkPortObject
from bacpypes3.local.object import Object as LocalObject
from bacpypes3.object import AccumulatorObject
from bacpypes3.pdu import Address


class LocalAccumulator(LocalObject, AccumulatorObject):  # type: ignore[misc]
    """An accumulator (bacpypes3 ships no local one)."""


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


FLAGS = [0, 0, 0, 0]
STATES = ["off", "on", "auto"]


def standard_objects() -> list[Any]:
    """One object of every mapped type, instance 1, with names, units and state texts."""
    return [
        AnalogInputObject(objectIdentifier=("analog-input", 1), objectName="zone-temp",
                          presentValue=21.5, units="degreesCelsius", statusFlags=FLAGS,
                          reliability="noFaultDetected", outOfService=False,
                          eventState="normal", covIncrement=0.1, description="Zone air"),
        AnalogOutputObject(objectIdentifier=("analog-output", 1), objectName="valve",
                           presentValue=0.0, units="percent", statusFlags=FLAGS,
                           outOfService=False, eventState="normal", relinquishDefault=0.0,
                           covIncrement=0.1),
        AnalogValueObject(objectIdentifier=("analog-value", 1), objectName="setpoint",
                          presentValue=20.0, units="degreesCelsius", statusFlags=FLAGS,
                          outOfService=False, eventState="normal", covIncrement=0.1),
        BinaryInputObject(objectIdentifier=("binary-input", 1), objectName="filter-alarm",
                          presentValue="inactive", statusFlags=FLAGS, outOfService=False,
                          eventState="normal", polarity="normal"),
        BinaryOutputObject(objectIdentifier=("binary-output", 1), objectName="fan",
                           presentValue="inactive", statusFlags=FLAGS, outOfService=False,
                           eventState="normal", polarity="normal",
                           relinquishDefault="inactive"),
        BinaryValueObject(objectIdentifier=("binary-value", 1), objectName="occupied",
                          presentValue="active", statusFlags=FLAGS, outOfService=False,
                          eventState="normal"),
        MultiStateInputObject(objectIdentifier=("multi-state-input", 1), objectName="status",
                              presentValue=1, numberOfStates=3, stateText=STATES,
                              statusFlags=FLAGS, outOfService=False, eventState="normal"),
        MultiStateOutputObject(objectIdentifier=("multi-state-output", 1), objectName="speed",
                               presentValue=1, numberOfStates=3, stateText=STATES,
                               statusFlags=FLAGS, outOfService=False, eventState="normal",
                               relinquishDefault=1),
        MultiStateValueObject(objectIdentifier=("multi-state-value", 1), objectName="mode",
                              presentValue=3, numberOfStates=3, stateText=STATES,
                              statusFlags=FLAGS, outOfService=False, eventState="normal"),
        LocalAccumulator(objectIdentifier=("accumulator", 1), objectName="energy",
                         presentValue=1234, units="kilowattHours", statusFlags=FLAGS,
                         outOfService=False, eventState="normal", scale=1.0,
                         maxPresValue=1000000, prescale=None),
    ]


class _LimitedApplication(Application):  # type: ignore[misc]
    """An application that may leave out COV and ReadPropertyMultiple."""

    cov = True
    multiple = True

    def get_services_supported(self) -> ServicesSupported:
        supported = super().get_services_supported()
        if not self.cov:
            supported[supported._bitstring_names["subscribe-cov"]] = 0
        if not self.multiple:
            supported[supported._bitstring_names["read-property-multiple"]] = 0
        return supported

    async def do_SubscribeCOVRequest(self, apdu: Any) -> None:  # noqa: N802 - bacpypes3's
        if not self.cov:
            raise UnrecognizedService("no COV here")
        if str(apdu.monitoredObjectIdentifier[0]).startswith("multi-state"):
            # bacpypes3's COV detection of multi-state objects fails (it wants a
            # cov-increment): refused as devices refuse COV on types they do not cover.
            raise ExecutionError(errorClass="services",
                                 errorCode="optional-functionality-not-supported")
        await super().do_SubscribeCOVRequest(apdu)

    async def do_ReadPropertyMultipleRequest(self, apdu: Any) -> None:  # noqa: N802
        if not self.multiple:
            raise UnrecognizedService("no ReadPropertyMultiple here")
        await super().do_ReadPropertyMultipleRequest(apdu)


class SimulatedDevice:
    """A BACnet device on ``127.0.0.1:port`` with ``standard_objects()``."""

    def __init__(self, instance: int, *, port: int | None = None, cov: bool = True,
                 multiple: bool = True, name: str | None = None,
                 objects: list[Any] | None = None, max_apdu: int = 1476,
                 segmentation: str = "segmented-both") -> None:
        self.instance = instance
        self.port = port or free_udp_port()
        self.cov = cov
        self.multiple = multiple
        self.name = name or f"ahu-{instance}"
        self.objects = objects if objects is not None else standard_objects()
        self.max_apdu = max_apdu
        self.segmentation = segmentation
        self.app: _LimitedApplication | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Bind and serve."""
        device = DeviceObject(
            objectIdentifier=("device", self.instance), objectName=self.name,
            vendorIdentifier=999, maxApduLengthAccepted=self.max_apdu,
            segmentationSupported=self.segmentation)
        port_object = NetworkPortObject(self.address, objectIdentifier=("network-port", 1),
                                        objectName="NetworkPort-1")
        app = _LimitedApplication.from_object_list([device, port_object, *self.objects])
        app.cov = self.cov
        app.multiple = self.multiple
        self.app = app

    def stop(self) -> None:
        """Close the socket: the device stops answering (its objects are kept)."""
        if self.app is not None:
            self.app.close()
            self.app = None

    def restart(self, *, port: int | None = None, announce_to: str | None = None) -> None:
        """Stop, start again (on ``port`` if given) and send an I-Am to ``announce_to``."""
        self.stop()
        if port is not None:
            self.port = port
        for obj in self.objects:
            obj._app = None
        self.start()
        if announce_to is not None:
            self.announce(announce_to)

    def announce(self, to: str) -> None:
        """Send an I-Am to ``to`` (``host:port``), as at start-up."""
        assert self.app is not None
        self.app.i_am(Address(to))

    def object(self, name: str) -> Any:
        """The local object named ``name``."""
        for obj in self.objects:
            if str(obj.objectName) == name:
                return obj
        raise KeyError(name)

    def __enter__(self) -> SimulatedDevice:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def source_yaml(**settings: Any) -> str:
    """A one-source BACnet config as YAML text: source ``bms`` on a free loopback port."""
    import yaml

    source = {"id": "bms", "protocol": "bacnet", "bind": f"127.0.0.1:{free_udp_port()}",
              "timeout": "300ms", "retries": 0, **settings}
    return yaml.safe_dump({"sources": [source]}, sort_keys=False)


def build_unit(tmp_path: Any, text: str) -> Any:
    """Load a one-source config written as YAML text and build its source and mapper."""
    from bridge.core.source import BuildContext
    from bridge.registry import load_config, protocols

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    source = config.sources[0]
    return protocols()["bacnet"].source_unit(
        source, config.points[source.id], BuildContext(bridge_id="test", state_dir=tmp_path))


def every_point(**extra: Any) -> list[dict[str, Any]]:
    """A point on every object of ``standard_objects()``, named after the object, each with
    the ``extra`` settings."""
    return [
        {"name": "zone_temp", "object": "analog-input,1", **extra},
        {"name": "valve", "object": "analog-output,1", "writable": True, **extra},
        {"name": "setpoint", "object": "analog-value,1", **extra},
        {"name": "filter_alarm", "object": "binary-input,1", **extra},
        {"name": "fan", "object": "binary-output,1", "writable": True, **extra},
        {"name": "occupied", "object": "binary-value,1", **extra},
        {"name": "status", "object": "multi-state-input,1", **extra},
        {"name": "speed", "object": "multi-state-output,1", "writable": True, **extra},
        {"name": "mode", "object": "multi-state-value,1", **extra},
        {"name": "energy", "object": "accumulator,1", **extra},
    ]
