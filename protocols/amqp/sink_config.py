"""Configuration of the AMQP sink: connection, exchange, routing key and the topology the bridge
declares on every connect (exchanges, queues of type quorum, classic or stream, bindings)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote

from pydantic import ByteSize, Field, field_validator, model_validator

from bridge.config.models import Duration, PlainText, SinkBase, StrictModel
from bridge.core.sink import check_address_template
from protocols.amqp.config import AmqpConnectionSettings, ArgumentValue

ExchangeType = Literal["topic", "direct", "fanout", "headers"]

_TYPED_ARGUMENTS = {
    "x-queue-type": "type",
    "x-dead-letter-exchange": "dead_letter_exchange",
    "x-dead-letter-routing-key": "dead_letter_routing_key",
    "x-message-ttl": "message_ttl",
    "x-max-length": "max_length",
    "x-max-length-bytes": "max_length_bytes",
    "x-overflow": "overflow",
    "x-max-age": "max_age",
}
"""Queue arguments that have a field of their own."""


class SinkExchange(StrictModel):
    """The exchange the sink publishes every event to."""

    name: PlainText = Field(
        default="fieldbridge.events", min_length=1, max_length=255,
        description="Exchange name.")
    type: ExchangeType = Field(
        default="topic", description="Exchange type; `topic` lets consumers bind by routing-key "
        "pattern, `headers` by the `source`, `point` and `quality` headers.")
    durable: bool = Field(default=True, description="Survives a broker restart.")
    declare: bool = Field(
        default=True, description="Declare it on every connect; `false`: it must exist (as the "
        "built-in `amq.*` exchanges do).")
    arguments: dict[str, ArgumentValue] = Field(
        default_factory=dict, description="Declare arguments, e.g. `alternate-exchange`.")

    @model_validator(mode="after")
    def _declarable(self) -> SinkExchange:
        if self.declare and self.name.startswith("amq."):
            raise ValueError(f"'{self.name}' is built into the broker and cannot be declared: "
                             "set `declare: false`")
        return self


class TopologyExchange(StrictModel):
    """Another exchange the bridge declares: a dead-letter exchange, say."""

    name: PlainText = Field(min_length=1, max_length=255, description="Exchange name.")
    type: ExchangeType = Field(default="topic", description="Exchange type.")
    durable: bool = Field(default=True, description="Survives a broker restart.")
    arguments: dict[str, ArgumentValue] = Field(
        default_factory=dict, description="Declare arguments.")


class QueueBinding(StrictModel):
    """Bind a queue to an exchange."""

    exchange: PlainText | None = Field(
        default=None, min_length=1, max_length=255,
        description="The exchange to bind to; unset: the sink's exchange.")
    routing_key: str = Field(
        default="#", max_length=255, description="Binding key: on a topic exchange `*` matches "
        "one word and `#` any number, e.g. `plant.*`.")
    arguments: dict[str, ArgumentValue] = Field(
        default_factory=dict, description="Binding arguments (headers exchanges: `x-match`, "
        "`source`, `point`, ...).")


class TopologyQueue(StrictModel):
    """A queue the bridge declares and binds on every connect, for consumers to read."""

    name: PlainText = Field(min_length=1, max_length=255, description="Queue name.")
    type: Literal["quorum", "classic", "stream"] = Field(
        default="quorum", description="`quorum` (replicated, the default), `classic` or "
        "`stream` (an append-only log consumers read from any offset).")
    durable: bool = Field(
        default=True, description="Survives a broker restart; quorum queues and streams always "
        "do.")
    dead_letter_exchange: PlainText | None = Field(
        default=None, min_length=1, max_length=255,
        description="Where expired, rejected or (with `overflow: reject-publish-dlx`) refused "
        "messages go.")
    dead_letter_routing_key: str | None = Field(
        default=None, max_length=255,
        description="Routing key of dead-lettered messages; unset: their own.")
    message_ttl: Duration | None = Field(
        default=None, description="Messages older than this expire (dead-lettered if "
        "`dead_letter_exchange` is set). Not for streams.")
    max_length: int | None = Field(
        default=None, ge=0, description="At most this many messages ready; what happens beyond "
        "is `overflow`. Not for streams.")
    max_length_bytes: ByteSize | None = Field(
        default=None, description="At most this many bytes of message bodies (streams: of the "
        "whole log), e.g. `512MiB`.")
    overflow: Literal["drop-head", "reject-publish", "reject-publish-dlx"] | None = Field(
        default=None, description="When the queue is full: `drop-head` (the broker's default) "
        "discards the oldest messages; `reject-publish` refuses new ones, so the bridge keeps "
        "them in its outbox and retries (end-to-end backpressure); `reject-publish-dlx` (classic "
        "only) also dead-letters them.")
    max_age: Duration | None = Field(
        default=None, description="Streams: drop segments older than this.")
    arguments: dict[str, ArgumentValue] = Field(
        default_factory=dict, description="Further declare arguments, e.g. "
        "`x-quorum-initial-group-size`.")
    bindings: list[QueueBinding] | None = Field(
        default=None, description="Bindings made on every connect. Unset: bound to the sink's "
        "exchange with `#` (every event).")

    @model_validator(mode="after")
    def _consistent(self) -> TopologyQueue:
        for key, field_name in _TYPED_ARGUMENTS.items():
            if key in self.arguments:
                raise ValueError(f"set `{field_name}` instead of the argument `{key}`")
        if self.type != "classic" and not self.durable:
            raise ValueError(f"a {self.type} queue is always durable")
        if self.type == "stream":
            for name in ("dead_letter_exchange", "dead_letter_routing_key", "message_ttl",
                         "max_length", "overflow"):
                if getattr(self, name) is not None:
                    raise ValueError(f"a stream has no `{name}`; bound it with `max_age` and "
                                     "`max_length_bytes`")
        elif self.max_age is not None:
            raise ValueError("`max_age` is for streams; use `message_ttl`")
        if self.type == "quorum" and self.overflow == "reject-publish-dlx":
            raise ValueError("quorum queues support `drop-head` and `reject-publish`")
        if self.dead_letter_routing_key is not None and self.dead_letter_exchange is None:
            raise ValueError("`dead_letter_routing_key` needs `dead_letter_exchange`")
        return self

    def declare_arguments(self) -> dict[str, ArgumentValue]:
        """The ``x-`` arguments of ``queue.declare``."""
        arguments: dict[str, ArgumentValue] = {"x-queue-type": self.type}
        if self.dead_letter_exchange is not None:
            arguments["x-dead-letter-exchange"] = self.dead_letter_exchange
        if self.dead_letter_routing_key is not None:
            arguments["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        if self.message_ttl is not None:
            arguments["x-message-ttl"] = round(self.message_ttl * 1000)
        if self.max_length is not None:
            arguments["x-max-length"] = self.max_length
        if self.max_length_bytes is not None:
            arguments["x-max-length-bytes"] = int(self.max_length_bytes)
        if self.overflow is not None:
            arguments["x-overflow"] = self.overflow
        if self.max_age is not None:
            arguments["x-max-age"] = f"{max(1, round(self.max_age))}s"
        arguments.update(self.arguments)
        return arguments


class ExchangeBinding(StrictModel):
    """Route an exchange's messages into another exchange (exchange-to-exchange binding)."""

    source: PlainText = Field(min_length=1, max_length=255, description="The exchange messages "
                        "come from.")
    destination: PlainText = Field(min_length=1, max_length=255,
                             description="The exchange they are routed into.")
    routing_key: str = Field(default="#", max_length=255, description="Binding key.")
    arguments: dict[str, ArgumentValue] = Field(
        default_factory=dict, description="Binding arguments.")


class Topology(StrictModel):
    """What the bridge owns on the broker and declares on every connect (idempotent)."""

    exchanges: list[TopologyExchange] = Field(
        default_factory=list, description="Exchanges besides the sink's own.")
    queues: list[TopologyQueue] = Field(
        default_factory=list, description="Queues consumers read, with their bindings.")
    bindings: list[ExchangeBinding] = Field(
        default_factory=list, description="Exchange-to-exchange bindings.")


class AmqpSinkConfig(AmqpConnectionSettings, SinkBase):
    """Publishes events to an exchange of an AMQP 0-9-1 broker (RabbitMQ), confirmed."""

    protocol: Literal["amqp"]
    exchange: SinkExchange = Field(
        default_factory=SinkExchange, description="The exchange every event is published to.")
    routing_key: str = Field(
        default="{source}.{point}", max_length=255,
        description="Routing-key template: `{source}`, `{point}`, `{protocol}`, `{quality}`, "
        "`{bridge}`, `{unit}` and `{tags.NAME}` (empty when missing). Each value is one word: "
        "`%`, `.`, `*` and `#` in it are written `%25`, `%2E`, `%2A` and `%23`.")
    window: int = Field(
        default=1000, ge=1, le=65535, description="Publishes awaiting the broker's confirmation, "
        "at most (the pipeline depth).")
    retry: Duration = Field(
        default=1.0, gt=0, description="Wait this long before publishing again messages the "
        "broker refused (nack), doubling up to a minute while it keeps refusing.")
    topology: Topology = Field(
        default_factory=Topology, description="Exchanges, queues and bindings declared on every "
        "connect.")

    @field_validator("routing_key")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_address_template(value)

    def endpoint(self) -> str:
        """``amqp://user@host:port/vhost?exchange=name`` without the password."""
        return f"{self.broker_url()}?exchange={quote(self.exchange.name, safe='')}"
