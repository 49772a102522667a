"""AMQP configuration, the shipped example, metadata placeholders and acknowledgements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pika.exceptions
import pytest
from helpers.brokers import write_config

from bridge.core.message_mapper import MessageMapper
from bridge.core.model import Reading
from bridge.core.source import BuildContext
from bridge.errors import ConfigError, ConnectorError, DecodeError
from bridge.registry import load_config
from protocols.amqp import SPEC, AmqpAcknowledger, AmqpSourceConfig
from protocols.amqp.connection import closed_error, connection_parameters, open_error
from protocols.amqp.mapping import message_variables

EXAMPLE = Path(__file__).resolve().parents[2] / "mappings" / "amqp-example.yaml"


def source_document(**options: Any) -> dict[str, Any]:
    """An AMQP source configuration."""
    return {"id": "a", "protocol": "amqp", "queue": {"name": "q"},
            "points": [{"name": "{site}.t", "routing_key": "s.{site}", "path": "t"}], **options}


def source_config(tmp_path: Path, **options: Any) -> AmqpSourceConfig:
    """A loaded AMQP source configuration."""
    config = load_config(write_config(tmp_path / "config.yaml", source_document(**options)))
    (loaded,) = config.sources
    assert isinstance(loaded, AmqpSourceConfig)
    return loaded


def mapper_for(tmp_path: Path, **options: Any) -> MessageMapper:
    """The compiled mapping of one AMQP source."""
    config = load_config(write_config(tmp_path / "config.yaml", source_document(**options)))
    unit = SPEC.source_unit(config.sources[0], config.points["a"], BuildContext("b", tmp_path))
    assert isinstance(unit.mapper, MessageMapper)
    return unit.mapper


def test_example_mapping_validates() -> None:
    config = load_config(EXAMPLE)
    (source,) = config.sources
    assert isinstance(source, AmqpSourceConfig)
    assert source.queue_arguments() == {"x-queue-type": "quorum",
                                        "x-dead-letter-exchange": "fieldbridge.dlx"}
    assert config.points[source.id][0].id == (
        "plant1.{site}.{device}.temperature")


def test_endpoint_names_queue_but_not_password(tmp_path: Path) -> None:
    config = source_config(tmp_path, password="s3cret-value", virtual_host="/plant")
    assert config.endpoint() == "amqp://guest@127.0.0.1:5672/%2Fplant?queue=q"
    assert "s3cret" not in repr(config)


def test_url_gives_address_and_credentials(tmp_path: Path) -> None:
    config = source_config(tmp_path, url="amqps://reader:p%40ss@broker.example:5700/plant%2F1")
    address = config.address()
    assert (address.host, address.port, address.virtual_host) == ("broker.example", 5700,
                                                                   "plant/1")
    assert (address.username, address.password, address.tls) == ("reader", "p@ss", True)
    assert config.endpoint() == "amqps://reader@broker.example:5700/plant%2F1?queue=q"
    assert "p%40ss" not in repr(config)
    assert "p@ss" not in repr(address)
    plain = source_config(tmp_path, url="amqp://broker").address()
    assert (plain.port, plain.virtual_host, plain.username, plain.tls) == (5672, "/", "guest",
                                                                           False)


async def test_amqps_url_connects_with_tls_and_a_client_certificate(tmp_path: Path) -> None:
    config = source_config(tmp_path, url="amqps://u:pw@broker.example/")
    parameters = await connection_parameters(config, "e", "name")
    assert parameters.port == 5671
    assert parameters.ssl_options is not None
    assert parameters.ssl_options.server_hostname == "broker.example"
    assert parameters.credentials.password == "pw"
    missing = source_config(tmp_path, url="amqps://u:pw@broker.example/",
                            tls={"ca": str(tmp_path / "absent-ca.pem"),
                                 "cert": str(tmp_path / "client.pem")})
    with pytest.raises(ConnectorError) as caught:
        await connection_parameters(missing, "e", "name")
    assert caught.value.category == "config"
    assert "TLS setup failed" in caught.value.reason


@pytest.mark.parametrize(("options", "message"), [
    ({"url": "amqp://u:pw@h", "host": "other"}, "give `url` or host, not both"),
    ({"url": "http://u:pw@h"}, "must start with amqp:// or amqps://"),
    ({"url": "amqp://u:pw@h:notaport"}, "is not of the form"),
    ({"url": "amqp://u:pw@h", "tls": {}}, "`tls` needs an amqps:// url"),
])
def test_url_errors_never_quote_the_url(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        source_config(tmp_path, **options)
    assert message in str(caught.value)
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(("options", "message"), [
    ({"queue": {"name": "q", "arguments": {"x-dead-letter-exchange": "d"}}},
     "set `dead_letter` on the source"),
    ({"dead_letter": {"exchange": "d", "exchange_type": "direct", "queue": "dq"}},
     "needs `routing_key`"),
    ({"prefetch": 0}, "greater than or equal to 1"),
    ({"points": [{"name": "v", "routing_key": "a.#x"}]}, "whole level"),
    ({"points": [{"name": "{device}", "routing_key": "a.*"}]},
     "placeholder {device} is not known"),
    ({"queue": {"name": ""}}, "at least 1 character"),
])
def test_config_errors(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        source_config(tmp_path, **options)
    assert message in str(caught.value)


def test_dead_letter_binding_keys(tmp_path: Path) -> None:
    fanout = source_config(tmp_path, dead_letter={"exchange": "d", "queue": "dq"})
    assert fanout.dead_letter is not None
    assert fanout.dead_letter.binding_key == ""
    topic = source_config(tmp_path, dead_letter={"exchange": "d", "exchange_type": "topic",
                                                 "queue": "dq"})
    assert topic.dead_letter is not None
    assert topic.dead_letter.binding_key == "#"


def test_headers_exchange_and_routing_key_fill_placeholders(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, points=[{
        "name": "{exchange}.{headers.line}.{headers.unit_no}.{routing_key}",
        "routing_key": "s.#", "format": "number",
        "tags": {"line": "{headers.line}"}}])
    reading = Reading(source="a", address="s.x", value=b"3", received_at=1.0,
                      meta={"exchange": "amq.topic",
                            "headers": {"line": b"l7", "unit_no": 4, "skip": [1]}})
    (event,) = mapper.map(reading)
    assert event.point == "amq.topic.l7.4.s.x"
    assert event.tags == {"line": "l7"}


def test_message_id_makes_event_ids_stable_across_redelivery(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, points=[{"name": "v.{index}", "each": "v", "path": "@"}])

    def ids(message_id: str | None) -> list[str]:
        reading = Reading(source="a", address="s.x", value=b'{"v": [1, 2]}', received_at=1.0,
                          message_id=message_id)
        return [event.id for event in mapper.map(reading)]

    first = ids("m-1")
    assert first == ids("m-1")  # re-delivered: the same ids
    assert len(set(first)) == 2  # one per point
    assert set(first).isdisjoint(ids("m-2"))
    assert set(ids(None)).isdisjoint(ids(None))  # no upstream identity: fresh ids


def test_missing_header_drops_the_point_and_counts_it(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path, points=[{"name": "{headers.line}.v", "format": "number"}])
    reading = Reading(source="a", address="s.x", value=b"3", received_at=1.0,
                      meta={"exchange": "e", "headers": {}})
    assert mapper.map(reading) == []
    assert mapper.counters["dropped_points"] == 1
    assert "{headers.line}" in mapper.details["last_dropped_point"]["reason"]


def test_unknown_routing_key_is_rejected_naming_it(tmp_path: Path) -> None:
    mapper = mapper_for(tmp_path)
    with pytest.raises(DecodeError, match="routing key other: no configured point matches"):
        mapper.map(Reading(source="a", address="other", value=b"{}", received_at=1.0))


def test_message_variables_skip_undecodable_headers() -> None:
    reading = Reading(source="a", address="k", value=b"", received_at=1.0,
                      meta={"exchange": "e", "headers": {"bad": b"\xff", "flag": True}})
    assert message_variables(reading) == {"routing_key": "k", "exchange": "e",
                                          "headers.flag": "true"}


class FakeChannel:
    """Records settlements."""

    def __init__(self, is_open: bool = True) -> None:
        self.is_open = is_open
        self.calls: list[tuple[str, int, bool | None]] = []

    def basic_ack(self, delivery_tag: int) -> None:
        self.calls.append(("ack", delivery_tag, None))

    def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
        self.calls.append(("reject", delivery_tag, requeue))


async def test_reject_dead_letters_when_configured_else_acks() -> None:
    channel = FakeChannel()
    await AmqpAcknowledger(channel, 1, dead_letter=True).reject("bad json")
    await AmqpAcknowledger(channel, 2, dead_letter=False).reject("bad json")
    await AmqpAcknowledger(channel, 3, dead_letter=True).accept()
    assert channel.calls == [("reject", 1, False), ("ack", 2, None), ("ack", 3, None)]


async def test_settling_on_a_closed_channel_does_nothing() -> None:
    channel = FakeChannel(is_open=False)
    await AmqpAcknowledger(channel, 1, dead_letter=True).reject("x")
    await AmqpAcknowledger(channel, 2, dead_letter=True).accept()
    assert channel.calls == []


def test_close_reasons_map_to_categories() -> None:
    assert closed_error("e", "channel", pika.exceptions.ChannelClosedByBroker(
        404, "NOT_FOUND - no queue 'q'")).category == "config"
    assert closed_error("e", "channel", pika.exceptions.ChannelClosedByBroker(
        403, "ACCESS_REFUSED")).category == "auth"
    assert closed_error("e", "connection", pika.exceptions.ConnectionClosedByBroker(
        320, "CONNECTION_FORCED")).category == "transient"
    assert closed_error("e", "connection", pika.exceptions.StreamLostError(
        "lost")).category == "transient"
    assert open_error("e", pika.exceptions.ProbableAuthenticationError(
        "ACCESS_REFUSED")).category == "auth"
    assert open_error("e", OSError("refused")).category == "transient"
