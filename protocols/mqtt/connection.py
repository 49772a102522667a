"""What every aiomqtt connection of this connector shares (source, sink, discovery): the client's
arguments from the connection settings, subscribing with the broker's answer checked, and MQTT
errors as ``ConnectorError`` with their category."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.errors import ConnectorError, ErrorCategory
from protocols.mqtt.config import MqttBrokerSettings

ClientFactory = Callable[..., aiomqtt.Client]
"""Creates the client from keyword arguments; tests pass a fake."""

_AUTH_CODES = frozenset({4, 5, 0x86, 0x87, 0x8C})
"""3.1.1 bad user name or password / not authorized; 5: the same, and bad auth method."""
_CONFIG_CODES = frozenset({1, 2, 0x84, 0x85, 0x95})
"""Unacceptable protocol version, client id rejected, packet too large."""


async def client_arguments(
    settings: MqttBrokerSettings,
    *,
    client_id: str | None,
    clean_session: bool = True,
    session_expiry: float = 0.0,
    keepalive: int = 60,
    logger: logging.Logger,
) -> dict[str, Any]:
    """The keyword arguments of ``aiomqtt.Client`` for ``settings``: broker, credentials, TLS
    (its files read in a thread), protocol version and session.

    A persistent session (``clean_session`` false) lasts ``session_expiry`` seconds after a
    disconnect under MQTT 5; under 3.1.1 the broker decides. Raises ``ConnectorError``
    (``config``) when the TLS files cannot be read.
    """
    arguments: dict[str, Any] = {
        "hostname": settings.host,
        "port": settings.port_number,
        "identifier": client_id,
        "keepalive": keepalive,
        "timeout": settings.timeout,
        "logger": logger,
    }
    if settings.username is not None:
        arguments["username"] = settings.username
        if settings.password is not None:
            arguments["password"] = settings.password.get_secret_value()
    if settings.tls is not None:
        try:
            arguments["tls_context"] = await asyncio.to_thread(settings.tls.context)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectorError(settings.endpoint(), f"TLS setup failed: {exc}",
                                 ErrorCategory.CONFIG) from exc
        arguments["tls_insecure"] = not settings.tls.verify_hostname
    if settings.mqtt_version == "5":
        arguments["protocol"] = aiomqtt.ProtocolVersion.V5
        arguments["clean_start"] = clean_session
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0 if clean_session else int(session_expiry)
        arguments["properties"] = properties
    else:
        arguments["protocol"] = aiomqtt.ProtocolVersion.V311
        arguments["clean_session"] = clean_session
    return arguments


async def subscribe(client: aiomqtt.Client, filters: Sequence[tuple[str, int]],
                    settings: MqttBrokerSettings) -> None:
    """Subscribe to ``filters`` (topic filter, QoS) within ``settings.timeout``;
    ``ConnectorError`` (``auth``) when the broker refuses one of them."""
    granted = await client.subscribe(list(filters), timeout=settings.timeout)
    for (topic, _), code in zip(filters, granted, strict=False):
        value = reason_code(code)
        if value is not None and value >= 0x80:
            raise ConnectorError(settings.endpoint(), f"the broker refused the subscription "
                                 f"to {topic!r} (code {value:#x})", ErrorCategory.AUTH)


def connector_error(endpoint: str, exc: aiomqtt.MqttError) -> ConnectorError:
    """``exc`` as a ``ConnectorError``: a refused login is ``auth``, an unacceptable protocol
    version or client id ``config``, anything else ``transient``."""
    category = ErrorCategory.TRANSIENT
    if isinstance(exc, aiomqtt.MqttCodeError):
        code = reason_code(exc.rc)
        if isinstance(exc, MqttConnectError) and code in _AUTH_CODES:
            category = ErrorCategory.AUTH
        elif isinstance(exc, MqttConnectError) and code in _CONFIG_CODES:
            category = ErrorCategory.CONFIG
    reason = str(exc) or type(exc).__name__
    if exc.__cause__ is not None and str(exc.__cause__):
        reason = f"{reason}: {exc.__cause__}"
    return ConnectorError(endpoint, reason, category)


def reason_code(code: object) -> int | None:
    """The number of an MQTT 3.1.1 return code or MQTT 5 reason code."""
    if isinstance(code, ReasonCode):
        return code.value
    return code if isinstance(code, int) else None
