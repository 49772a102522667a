"""The bridge's own BACnet/IP device: a bacpypes3 application on one UDP socket, with the
I-Am and COV notifications it receives handed to the source.

The socket is bound here, without ``SO_REUSEPORT``, so that a port another program holds is
an error at once rather than a silent second listener. bacpypes3 values are turned into
event values here too: numbers, booleans, texts and names, lists as JSON text.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from bacpypes3.apdu import (
    ConfirmedCOVNotificationRequest,
    IAmRequest,
    SimpleAckPDU,
    UnconfirmedCOVNotificationRequest,
)
from bacpypes3.app import Application
from bacpypes3.basetypes import PropertyValue
from bacpypes3.constructeddata import Any as AnyValue
from bacpypes3.errors import ServicesError
from bacpypes3.ipv4.link import NormalLinkLayer
from bacpypes3.local.device import DeviceObject
from bacpypes3.pdu import Address, IPv4Address
from bacpypes3.primitivedata import (
    BitString,
    Boolean,
    CharacterString,
    Enumerated,
    Null,
    ObjectIdentifier,
    PropertyIdentifier,
)
from bacpypes3.vendor import get_vendor_info

from bridge.errors import ConnectorError, ErrorCategory
from protocols.bacnet.config import BINARY

IAmHandler = Callable[[int, Address, int, str, IAmRequest], Awaitable[None]]
"""Called with device instance, address, max APDU length, segmentation and the I-Am."""
CovHandler = Callable[[Address, int, ObjectIdentifier, list[PropertyValue]], Awaitable[bool]]
"""Called with source address, process id, object and values of a COV notification;
returns whether a subscription of ours expected it."""

VENDOR_ID = 999
"""The vendor identifier the bridge's device presents (a reserved test value of ASHRAE's list;
the bridge defines no proprietary objects)."""


class BridgeApplication(Application):  # type: ignore[misc]
    """A bacpypes3 application that reports every I-Am and COV notification it receives."""

    on_i_am: IAmHandler | None = None
    on_cov: CovHandler | None = None

    async def do_IAmRequest(self, apdu: IAmRequest) -> None:  # noqa: N802 - bacpypes3 dispatches by this name
        """Answer Who-Is futures as bacpypes3 does, and tell the source."""
        await super().do_IAmRequest(apdu)
        if self.on_i_am is not None and apdu.iAmDeviceIdentifier is not None:
            await self.on_i_am(int(apdu.iAmDeviceIdentifier[1]), apdu.pduSource,
                               int(apdu.maxAPDULengthAccepted or 0),
                               str(apdu.segmentationSupported), apdu)

    async def _notified(self, apdu: Any) -> bool:
        if self.on_cov is None:
            return False
        return await self.on_cov(apdu.pduSource, int(apdu.subscriberProcessIdentifier),
                           apdu.monitoredObjectIdentifier, list(apdu.listOfValues))

    async def do_ConfirmedCOVNotificationRequest(  # noqa: N802 - dispatched by name
            self, apdu: ConfirmedCOVNotificationRequest) -> None:
        """Acknowledge a notification of ours; refuse one nobody subscribed to."""
        if not await self._notified(apdu):
            raise ServicesError(errorCode="unknownSubscription")
        await self.response(SimpleAckPDU(context=apdu))

    async def do_UnconfirmedCOVNotificationRequest(  # noqa: N802 - dispatched by name
            self, apdu: UnconfirmedCOVNotificationRequest) -> None:
        """Hand on a notification of ours; the source counts and drops the others."""
        await self._notified(apdu)


def open_application(endpoint: str, host: str, port: int, *, instance: int, name: str,
                     timeout: float, retries: int) -> BridgeApplication:
    """The bridge's device bound to ``host:port``; ``ConnectorError`` when it cannot bind."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConnectorError(endpoint, f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                             ErrorCategory.CONFIG) from exc
    sock.setblocking(False)
    device = DeviceObject(
        objectIdentifier=("device", instance), objectName=name, vendorIdentifier=VENDOR_ID,
        maxApduLengthAccepted=1476, segmentationSupported="segmented-both",
        maxSegmentsAccepted=64, apduTimeout=max(1, round(timeout * 1000)),
        numberOfApduRetries=retries)
    app = BridgeApplication.from_object_list([device])
    address = IPv4Address(f"{host}:{sock.getsockname()[1]}")
    link_layer = NormalLinkLayer(address, bind_socket=sock)
    app.link_layers[ObjectIdentifier("network-port,1")] = link_layer
    app.nsap.bind(link_layer, address=address)
    return app  # type: ignore[no-any-return]


def property_type(object_id: ObjectIdentifier, property_id: PropertyIdentifier) -> Any:
    """The bacpypes3 class of a standard property of an object type, or ``None``."""
    object_class = get_vendor_info(0).get_object_class(object_id[0])
    if object_class is None:
        return None
    return object_class.get_property_type(property_id)


def cast_value(object_id: ObjectIdentifier, property_id: PropertyIdentifier,
               value: AnyValue) -> Any:
    """A value received as ``Any`` (in a COV notification) as its property's type."""
    kind = property_type(object_id, property_id)
    if kind is None:
        return value
    return value.cast_out(kind)


def plain(value: Any, object_type: str | None = None, property_name: str | None = None) -> Any:
    """A bacpypes3 value as an event value: a number, a boolean, a text, ``None`` for null.

    A binary object's present-value is a boolean (active is true); other enumerations are
    their names; status flags and other bit strings the names of the bits set, comma-joined;
    lists and arrays (a priority array, state texts) JSON text.
    """
    if value is None or isinstance(value, Null):
        return None
    if isinstance(value, Boolean):
        return bool(value)
    if isinstance(value, Enumerated):
        if object_type in BINARY and property_name in ("present-value", "relinquish-default"):
            return int(value) == 1
        return str(value)
    if isinstance(value, CharacterString):
        return str(value)
    if isinstance(value, BitString):
        return str(value).replace(";", ",")
    if isinstance(value, bool | int | float | str):
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        return str(value)
    if isinstance(value, list | tuple):
        return json.dumps([_json_element(element) for element in value])
    return str(value)


def _json_element(value: Any) -> Any:
    """One element of a list as JSON: a priority array slot is its value or null."""
    if value is None or isinstance(value, Null):
        return None
    if not isinstance(value, bool | int | float | str | bytes | list | tuple):
        if getattr(value, "null", None) is not None:
            return None
        for attribute in ("real", "double", "unsigned", "integer", "boolean", "enumerated",
                          "characterString"):
            inner = getattr(value, attribute, None)
            if inner is not None:
                return _json_element(inner)
    element = plain(value)
    return element if isinstance(element, bool | int | float | str) or element is None else str(
        value)
