"""Configuration of AMQP (RabbitMQ) connections and sources: queue, dead-lettering, points."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal
from urllib.parse import SplitResult, quote, unquote, urlsplit

from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator

from bridge.config.models import Duration, PlainText, StrictModel
from bridge.config.tls import ClientTls
from bridge.config.validation import field_error
from bridge.core.message_points import MessagePoint, MessageSourceBase
from bridge.core.templates import AMQP_ROUTING_KEY, AddressPattern

ArgumentValue = str | int | float | bool
"""An AMQP queue or binding argument."""

METADATA_VARIABLES = ("routing_key", "exchange")
"""Placeholders every AMQP point may use, besides `{headers.NAME}` and routing-key levels."""


_ADDRESS_FIELDS = ("host", "hosts", "port", "virtual_host", "username", "password")
"""The fields `url` and `urls` replace."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where and as whom to connect to one broker node, from the fields or from a URL."""

    host: str
    port: int
    virtual_host: str
    username: str
    password: str = field(repr=False)
    tls: bool

    @property
    def node(self) -> str:
        """``host:port`` (``[v6]:port``): the node, as status and errors name it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self) -> str:
        """``amqp[s]://user@host:port/vhost``, without the password."""
        scheme = "amqps" if self.tls else "amqp"
        return (f"{scheme}://{self.username}@{self.node}/"
                f"{quote(self.virtual_host, safe='')}")


def _split_node(value: str) -> SplitResult:
    parts = urlsplit(f"//{value}")
    if not parts.hostname or parts.username is not None or parts.password is not None or (
            parts.path or parts.query or parts.fragment):
        raise ValueError("a node is `host` or `host:port` (`[v6 address]:port` for IPv6)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port of a node is a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("the port of a node is a number from 1 to 65535")
    return parts


def _check_node(value: str) -> str:
    _split_node(value)
    return value


def _url_problem(value: SecretStr) -> str | None:
    """What is wrong with a broker URL, without quoting it (it may hold a password)."""
    parts = urlsplit(value.get_secret_value())
    if parts.scheme not in ("amqp", "amqps"):
        return "must start with amqp:// or amqps://"
    try:
        _url_address(parts)
    except ValueError:
        return "is not of the form amqp[s]://user:password@host:port/vhost"
    return None


def _url_address(parts: SplitResult) -> BrokerAddress:
    tls = parts.scheme == "amqps"
    if not parts.hostname:
        raise ValueError("no host")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or (5671 if tls else 5672),  # ValueError for a bad port
        virtual_host=unquote(path) if path else "/",
        username=unquote(parts.username) if parts.username else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        tls=tls)


NodeAddress = Annotated[PlainText, AfterValidator(_check_node)]
"""A broker node of a cluster: ``host`` or ``host:port``."""


class AmqpConnectionSettings(StrictModel):
    """How to reach an AMQP 0-9-1 broker (RabbitMQ): the settings sources and sinks share."""

    host: PlainText = Field(default="127.0.0.1", min_length=1, description="Broker host.")
    hosts: list[NodeAddress] | None = Field(
        default=None, min_length=1, description="The nodes of a broker cluster instead of "
        "`host`, each `host` or `host:port` (`port` when not given), e.g. `[rabbit-1, "
        "rabbit-2:5673]`. The bridge uses one node at a time and, when it fails or refuses, "
        "connects to the next one in the list (round robin, with the usual backoff between "
        "full rounds). The nodes share `virtual_host`, `username`, `password` and `tls`.")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Broker port; default 5672, 5671 with TLS.")
    virtual_host: PlainText = Field(default="/", description="Virtual host.")
    username: PlainText = Field(default="guest", min_length=1, description="User name.")
    password: SecretStr = Field(
        default=SecretStr("guest"), description="Password; use ${ENV} or ${file:...}.")
    url: SecretStr | None = Field(
        default=None, description="The broker as one URL instead of host, port, virtual_host, "
        "username and password: `amqp://user:password@host:port/vhost`, or `amqps://...` for "
        "TLS (with `tls` for a CA or a client certificate). A secret: use ${ENV} or "
        "${file:...}.")
    urls: list[SecretStr] | None = Field(
        default=None, min_length=1, description="The nodes of a broker cluster as URLs (each "
        "as in `url`), instead of `url` or the address fields; the bridge fails over between "
        "them as with `hosts`. A secret: use ${ENV} or ${file:...}.")
    tls: ClientTls | None = Field(default=None, description="Connect with TLS.")
    heartbeat: Duration | None = Field(
        default=None, description="Heartbeat interval; unset: what the broker proposes.")
    timeout: Duration = Field(
        default=10.0, gt=0, description="How long connecting and each setup step may take.")

    @model_validator(mode="after")
    def _url_or_fields(self) -> AmqpConnectionSettings:
        if self.url is not None and self.urls is not None:
            raise ValueError("give `url` or `urls`, not both")
        if self.hosts is not None and "host" in self.model_fields_set:
            raise ValueError("give `host` or `hosts`, not both")
        urls = [self.url] if self.url is not None else self.urls
        if urls is not None:
            key = "`url`" if self.url is not None else "`urls`"
            given = [name for name in _ADDRESS_FIELDS if name in self.model_fields_set]
            if given:
                raise ValueError(f"give {key} or {', '.join(given)}, not both")
            for index, url in enumerate(urls):
                problem = _url_problem(url)
                if problem is not None:
                    raise field_error("url" if self.url is not None else ("urls", index),
                                      problem)
            if self.tls is not None and any(
                    urlsplit(url.get_secret_value()).scheme == "amqp" for url in urls):
                raise ValueError("`tls` needs an amqps:// url" if self.url is not None
                                 else "`tls` needs amqps:// urls")
        nodes = [address.node for address in self.addresses()]
        repeated = sorted({node for node in nodes if nodes.count(node) > 1})
        if repeated:
            raise ValueError(f"node {repeated[0]} is listed twice")
        return self

    def addresses(self) -> list[BrokerAddress]:
        """The broker nodes, in the order configured, with their credentials."""
        if self.url is not None:
            return [_url_address(urlsplit(self.url.get_secret_value()))]
        if self.urls is not None:
            return [_url_address(urlsplit(url.get_secret_value())) for url in self.urls]
        tls = self.tls is not None
        port = self.port or (5671 if tls else 5672)
        nodes = [(self.host, port)] if self.hosts is None else [
            (parts.hostname or "", parts.port or port)
            for parts in map(_split_node, self.hosts)]
        return [BrokerAddress(host=host, port=node_port, virtual_host=self.virtual_host,
                              username=self.username,
                              password=self.password.get_secret_value(), tls=tls)
                for host, node_port in nodes]

    def address(self) -> BrokerAddress:
        """The (first) broker node's address and credentials."""
        return self.addresses()[0]

    @property
    def port_number(self) -> int:
        """The port, defaulted by TLS."""
        return self.address().port

    def broker_url(self) -> str:
        """``amqp[s]://user@host:port/vhost``, without the password; for a cluster
        ``amqp[s]://user@host1:port1,host2:port2/vhost`` (the URLs of the nodes, comma
        separated, when they differ in more than host and port)."""
        addresses = self.addresses()
        first = addresses[0]
        if all((each.tls, each.username, each.virtual_host) == (
                first.tls, first.username, first.virtual_host) for each in addresses):
            scheme = "amqps" if first.tls else "amqp"
            nodes = ",".join(each.node for each in addresses)
            return f"{scheme}://{first.username}@{nodes}/{quote(first.virtual_host, safe='')}"
        return ",".join(each.url() for each in addresses)


class AmqpBinding(StrictModel):
    """Bind the queue to an exchange."""

    exchange: PlainText = Field(
        min_length=1, max_length=255, description="The exchange to bind to.")
    routing_key: str = Field(
        default="", max_length=255, description="Binding key, e.g. `sensors.*.telemetry` on a "
        "topic exchange; ignored by fanout exchanges.")
    arguments: dict[str, ArgumentValue] = Field(
        default_factory=dict, description="Binding arguments (headers exchanges: `x-match`...).")


class AmqpQueue(StrictModel):
    """The queue the source consumes from."""

    name: PlainText = Field(min_length=1, max_length=255, description="Queue name.")
    declare: bool = Field(
        default=False, description="Declare the queue (idempotent; a queue that exists with "
        "other settings is a config error). Unset: the queue must exist.")
    durable: bool = Field(default=True, description="Declared queue survives a broker restart.")
    auto_delete: bool = Field(
        default=False, description="Declared queue is deleted when its last consumer leaves.")
    arguments: dict[str, ArgumentValue] = Field(
        default_factory=dict, description="Declare arguments, e.g. `x-queue-type: quorum`.")
    bindings: list[AmqpBinding] = Field(
        default_factory=list, description="Bindings made on every connect (idempotent).")

    @field_validator("arguments")
    @classmethod
    def _no_dead_letter_arguments(
        cls, value: dict[str, ArgumentValue]
    ) -> dict[str, ArgumentValue]:
        for key in ("x-dead-letter-exchange", "x-dead-letter-routing-key"):
            if key in value:
                raise ValueError(f"set `dead_letter` on the source instead of `{key}`: the "
                                 "source must know whether rejected messages are kept")
        return value


class DeadLetter(StrictModel):
    """Where messages that cannot be mapped go, instead of being acknowledged and dropped."""

    exchange: PlainText = Field(min_length=1, max_length=255, description="Dead-letter exchange.")
    routing_key: str | None = Field(
        default=None, max_length=255, description="Routing key of dead-lettered messages; "
        "unset: their original routing key.")
    declare: bool = Field(
        default=True, description="Declare the exchange (durable) and `queue` if given.")
    exchange_type: Literal["fanout", "topic", "direct"] = Field(
        default="fanout", description="Type of the declared exchange.")
    queue: PlainText | None = Field(
        default=None, min_length=1, max_length=255,
        description="Declare this durable queue and bind it to the exchange, so rejected "
        "messages are kept for inspection.")

    @model_validator(mode="after")
    def _routable(self) -> DeadLetter:
        if self.queue is not None and self.exchange_type == "direct" and self.routing_key is None:
            raise ValueError("a direct dead-letter exchange needs `routing_key` to route "
                             "rejected messages to `queue`")
        return self

    @property
    def binding_key(self) -> str:
        """The key binding ``queue`` to the exchange so that it gets every rejected message."""
        if self.exchange_type == "topic":
            return self.routing_key if self.routing_key is not None else "#"
        return self.routing_key or ""


class AmqpPoint(MessagePoint):
    """A point read from the messages consumed from the source's queue."""

    routing_key: str = Field(
        default="#", description="Routing-key pattern of the messages this point reads: "
        "`*` one word, `#` any words, `{name}` one word whose value fills `{name}` in the "
        "name and tags, e.g. `sensors.{site}.{device}`. Besides level names, `{routing_key}`, "
        "`{exchange}` and `{headers.NAME}` may be used.")

    @field_validator("routing_key")
    @classmethod
    def _pattern(cls, value: str) -> str:
        AddressPattern.parse(value, AMQP_ROUTING_KEY)
        return value

    @model_validator(mode="after")
    def _placeholders(self) -> AmqpPoint:
        self.check_variables((*self.pattern().names, *METADATA_VARIABLES), ("headers.",))
        return self

    def pattern(self) -> AddressPattern:
        """The compiled routing-key pattern."""
        return AddressPattern.parse(self.routing_key, AMQP_ROUTING_KEY)


class AmqpSourceConfig(AmqpConnectionSettings, MessageSourceBase):
    """A queue on an AMQP 0-9-1 broker (RabbitMQ) and the points its messages carry."""

    protocol: Literal["amqp"]
    queue: AmqpQueue = Field(description="The queue to consume from.")
    dead_letter: DeadLetter | None = Field(
        default=None, description="Reject unmappable messages to this dead-letter exchange. "
        "With `queue.declare` the queue is declared with it; otherwise the existing queue must "
        "already dead-letter there (by argument or policy). Unset: unmappable messages are "
        "acknowledged, counted and dropped.")
    prefetch: int = Field(
        default=100, ge=1, le=65535, description="Messages delivered but not yet acknowledged, "
        "at most (basic.qos prefetch count).")
    points: Sequence[AmqpPoint] = Field(min_length=1, description="The points to read.")

    def endpoint(self) -> str:
        """``amqp://user@host:port/vhost?queue=name`` without the password."""
        return f"{self.broker_url()}?queue={quote(self.queue.name, safe='')}"

    def queue_arguments(self) -> dict[str, ArgumentValue]:
        """The declare arguments of the queue, dead-lettering included."""
        arguments = dict(self.queue.arguments)
        if self.dead_letter is not None:
            arguments["x-dead-letter-exchange"] = self.dead_letter.exchange
            if self.dead_letter.routing_key is not None:
                arguments["x-dead-letter-routing-key"] = self.dead_letter.routing_key
        return arguments
