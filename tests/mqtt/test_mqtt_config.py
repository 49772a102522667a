"""MQTT configuration, the shipped example, error categories and the source with a fake client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from aiomqtt.exceptions import MqttCodeError, MqttConnectError, MqttError
from helpers import free_port
from helpers.brokers import RecordingRouter, require_broker, write_config
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from bridge.core.model import Reading
from bridge.core.source import BuildContext, SourceContext
from bridge.core.status import EndpointStatus
from bridge.errors import ConfigError, ConnectorError, ErrorCategory
from bridge.registry import load_config
from protocols.mqtt import SPEC, MqttAcknowledger, MqttSource, MqttSourceConfig
from protocols.mqtt.connection import connector_error

EXAMPLE = Path(__file__).resolve().parents[2] / "mappings" / "mqtt-example.yaml"


def source_config(tmp_path: Path, **options: Any) -> MqttSourceConfig:
    """A loaded MQTT source configuration."""
    source = {"id": "m", "protocol": "mqtt", "host": "broker.local",
              "points": [{"name": "{d}.t", "topic": "s/{d}/t", "path": "t"}], **options}
    config = load_config(write_config(tmp_path / "config.yaml", source))
    (loaded,) = config.sources
    assert isinstance(loaded, MqttSourceConfig)
    return loaded


def test_example_mapping_validates() -> None:
    config = load_config(EXAMPLE)
    (source,) = config.sources
    assert isinstance(source, MqttSourceConfig)
    ids = [point.id for point in config.points[source.id]]
    assert "plant1.{site}.{device}.temperature" in ids
    assert source.subscriptions() == {
        "sensors/+/+/telemetry": 1, "meters/+/batch": 1, "lines/+/speed": 1,
        "lines/+/state": 1, "lines/+/pressure/raw": 1, "lines/+/frame": 1}


def test_subscriptions_take_the_highest_qos_per_filter(tmp_path: Path) -> None:
    config = source_config(tmp_path, qos=0, points=[
        {"name": "{d}.a", "topic": "s/{d}/t", "path": "a"},
        {"name": "{e}.b", "topic": "s/{e}/t", "path": "b", "qos": 2},
        {"name": "c", "topic": "c", "format": "text"},
    ])
    assert config.subscriptions() == {"s/+/t": 2, "c": 0}


def test_endpoint_never_shows_the_password(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTT_SECRET", "hunter2-secret")
    config = source_config(tmp_path, username="bridge", password="${MQTT_SECRET}",
                           tls={"verify_hostname": True})
    assert config.endpoint() == "mqtts://bridge@broker.local:8883"
    assert "hunter2" not in repr(config)


def test_version_five_may_be_written_as_a_number(tmp_path: Path) -> None:
    assert source_config(tmp_path, mqtt_version=5).mqtt_version == "5"


@pytest.mark.parametrize(("options", "message"), [
    ({"password": "x"}, "`password` needs `username`"),
    ({"mqtt_version": "4"}, "mqtt_version"),
    ({"qos": 3}, "qos"),
    ({"points": []}, "at least 1 item"),
    ({"tls": {"key": "/k.pem"}}, "go with `cert`"),
    ({"points": [{"name": "a", "topic": "a/#/b"}]}, "must be the last level"),
    ({"points": [{"name": "{x}", "topic": "a/+"}]}, "placeholder {x} is not known"),
    # Before: valid, and the source then sat in `connecting` with no error.
    ({"points": [{"name": "a", "topic": "a/\x00b"}]}, "must not contain a NUL character"),
    ({"brokr": "x"}, "unknown key"),
])
def test_config_errors(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        source_config(tmp_path, **options)
    assert message in str(caught.value)


def test_persistent_session_gets_a_stable_client_id(tmp_path: Path) -> None:
    config = source_config(tmp_path)
    unit = SPEC.source_unit(config, [], BuildContext("edge-1", tmp_path))
    assert isinstance(unit.source, MqttSource)
    assert unit.source.client_id == "fieldbridge-edge-1-m"
    clean = source_config(tmp_path, clean_session=True)
    unit = SPEC.source_unit(clean, [], BuildContext("edge-1", tmp_path))
    assert isinstance(unit.source, MqttSource)
    assert unit.source.client_id is None


@pytest.mark.parametrize(("error", "category"), [
    (MqttConnectError(4), ErrorCategory.AUTH),
    (MqttConnectError(5), ErrorCategory.AUTH),
    (MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=0x86)), ErrorCategory.AUTH),
    (MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=0x87)), ErrorCategory.AUTH),
    (MqttConnectError(2), ErrorCategory.CONFIG),
    (MqttConnectError(3), ErrorCategory.TRANSIENT),
    (MqttCodeError(7, "lost"), ErrorCategory.TRANSIENT),
    (MqttError("Operation timed out"), ErrorCategory.TRANSIENT),
])
def test_error_categories(error: MqttError, category: ErrorCategory) -> None:
    converted = connector_error("mqtt://h:1883", error)
    assert converted.category is category
    assert converted.endpoint == "mqtt://h:1883"


class FakePaho:
    """Counts what the source asks of the paho client."""

    def __init__(self) -> None:
        self.manual_ack = False
        self.acked: list[tuple[int, int]] = []
        self.connected = True

    def manual_ack_set(self, on: bool) -> None:
        self.manual_ack = on

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append((mid, qos))

    def is_connected(self) -> bool:
        return self.connected


class FakeMessage:
    """An aiomqtt message."""

    def __init__(self, topic: str, payload: bytes, qos: int, mid: int) -> None:
        self.topic = type("Topic", (), {"value": topic})()
        self.payload = payload
        self.qos = qos
        self.mid = mid
        self.retain = False


class FakeMessages:
    """Yields queued messages, then fails as a lost connection does."""

    def __init__(self, messages: list[FakeMessage]) -> None:
        self.queue = list(messages)

    def __len__(self) -> int:
        return len(self.queue)

    def __aiter__(self) -> AsyncIterator[FakeMessage]:
        return self

    async def __anext__(self) -> FakeMessage:
        if not self.queue:
            raise MqttError("Disconnected during message iteration")
        return self.queue.pop(0)


class FakeClient:
    """Enough of ``aiomqtt.Client`` for the source."""

    def __init__(self, granted: tuple[int, ...], messages: list[FakeMessage],
                 **arguments: Any) -> None:
        self.arguments = arguments
        self._client = FakePaho()
        self.manual_at_connect: bool | None = None
        self.granted = granted
        self.subscribed: list[tuple[str, int]] = []
        self.messages = FakeMessages(messages)

    async def __aenter__(self) -> FakeClient:
        self.manual_at_connect = self._client.manual_ack
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        return None

    async def subscribe(self, filters: list[tuple[str, int]], **options: Any) -> tuple[int, ...]:
        self.subscribed = filters
        return self.granted


def fake_source(tmp_path: Path, granted: tuple[int, ...], messages: list[FakeMessage],
                **options: Any) -> tuple[MqttSource, list[FakeClient]]:
    config = source_config(tmp_path, **options)
    unit = SPEC.source_unit(config, load_config(tmp_path / "config.yaml").points["m"],
                      BuildContext("b", tmp_path))
    assert isinstance(unit.source, MqttSource)
    clients: list[FakeClient] = []

    def factory(**arguments: Any) -> FakeClient:
        clients.append(FakeClient(granted, messages, **arguments))
        return clients[-1]

    source = MqttSource(config, client_id="c", client_factory=factory)  # type: ignore[arg-type]
    return source, clients


async def test_manual_ack_is_on_before_connecting_and_acks_follow_the_router(
    tmp_path: Path,
) -> None:
    messages = [FakeMessage("s/a/t", b'{"t": 1}', 1, 11), FakeMessage("s/b/t", b'{"t": 2}', 0, 0)]
    source, clients = fake_source(tmp_path, (1,), messages)
    status = EndpointStatus(name="m", kind="source", protocol="mqtt", endpoint="x")
    published: list[Reading] = []
    router = RecordingRouter(hold_acks=True)

    async def publish(readings: Any) -> None:
        published.extend(readings)
        await router.submit([], [(r.ack, None) for r in readings if r.ack is not None])

    with pytest.raises(ConnectorError, match="Disconnected") as caught:
        await source.run(SourceContext(status=status, publish=publish))
    assert caught.value.category is ErrorCategory.TRANSIENT
    (client,) = clients
    assert client.manual_at_connect is True
    assert client.subscribed == [("s/+/t", 1)]
    assert client.arguments["identifier"] == "c"
    assert client.arguments["clean_session"] is False
    assert [reading.address for reading in published] == ["s/a/t", "s/b/t"]
    assert published[1].ack is None  # QoS 0 has nothing to acknowledge
    assert client._client.acked == []
    await router.release()
    assert client._client.acked == [(11, 1)]


async def test_refused_subscription_is_an_auth_error(tmp_path: Path) -> None:
    source, _ = fake_source(tmp_path, (0x80,), [])
    status = EndpointStatus(name="m", kind="source", protocol="mqtt", endpoint="x")

    async def publish(readings: Any) -> None:
        raise AssertionError("nothing to publish")

    with pytest.raises(ConnectorError, match="refused the subscription to 's/\\+/t'") as caught:
        await source.run(SourceContext(status=status, publish=publish))
    assert caught.value.category is ErrorCategory.AUTH


async def test_version_five_asks_for_a_session_expiry(tmp_path: Path) -> None:
    source, clients = fake_source(tmp_path, (1,), [], mqtt_version=5, session_expiry="2h")
    status = EndpointStatus(name="m", kind="source", protocol="mqtt", endpoint="x")

    async def publish(readings: Any) -> None:
        return None

    with pytest.raises(ConnectorError):
        await source.run(SourceContext(status=status, publish=publish))
    arguments = clients[0].arguments
    assert arguments["clean_start"] is False
    assert arguments["properties"].SessionExpiryInterval == 7200
    assert "clean_session" not in arguments


async def test_missing_tls_files_are_a_config_error(tmp_path: Path) -> None:
    source, _ = fake_source(tmp_path, (1,), [], tls={"ca": str(tmp_path / "missing.pem")})
    status = EndpointStatus(name="m", kind="source", protocol="mqtt", endpoint="x")

    async def publish(readings: Any) -> None:
        return None

    with pytest.raises(ConnectorError, match="TLS setup failed") as caught:
        await source.run(SourceContext(status=status, publish=publish))
    assert caught.value.category is ErrorCategory.CONFIG


async def test_acknowledger_skips_a_lost_connection() -> None:
    paho = FakePaho()
    ack = MqttAcknowledger(paho, 5, 2)  # type: ignore[arg-type]
    await ack.reject("unmappable")
    assert paho.acked == [(5, 2)]
    paho.connected = False
    await ack.accept()
    assert paho.acked == [(5, 2)]


def test_missing_broker_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"127.0.0.1:{port}"):
        require_broker("Mosquitto", "127.0.0.1", port)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_broker("Mosquitto", "127.0.0.1", port)
