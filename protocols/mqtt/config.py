"""Configuration of MQTT connections (shared by the source, the sink and discovery), and of
sources: session and topic points."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from bridge.config.models import Duration, PlainText, StrictModel
from bridge.config.tls import ClientTls
from bridge.core.message_points import MessagePoint, MessageSourceBase
from bridge.core.templates import MQTT_TOPIC, AddressPattern

QoS = Literal[0, 1, 2]


def _version_text(value: Any) -> Any:
    # YAML reads `5` as a number and `3.1.1` as text; both name a version.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class MqttPoint(MessagePoint):
    """A point read from the messages published on a topic filter."""

    topic: str = Field(
        description="Topic filter to subscribe to; `+` and `#` wildcards, and `{name}` for a "
        "level whose value fills `{name}` in the point name and tags, e.g. "
        "`sensors/{site}/{device}/telemetry`.")
    qos: QoS | None = Field(
        default=None, description="QoS of this point's subscription; unset: the source's.")

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if "\x00" in value:  # MQTT forbids it: the broker would refuse the subscription
            raise ValueError("a topic filter must not contain a NUL character")
        AddressPattern.parse(value, MQTT_TOPIC)
        return value

    @model_validator(mode="after")
    def _placeholders(self) -> MqttPoint:
        self.check_variables(self.pattern().names)
        return self

    def pattern(self) -> AddressPattern:
        """The compiled topic filter."""
        return AddressPattern.parse(self.topic, MQTT_TOPIC)


class MqttBrokerSettings(StrictModel):
    """Where an MQTT broker is and how to log in: what a source, a sink and a discovery share."""

    host: PlainText = Field(min_length=1, description="Broker host name or address.")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Broker port; default 1883, 8883 with TLS.")
    mqtt_version: Annotated[Literal["3.1.1", "5"], BeforeValidator(_version_text)] = Field(
        default="3.1.1", description="MQTT protocol version: `3.1.1` or `5`.")
    username: PlainText | None = Field(default=None, description="User name, if the broker asks.")
    password: SecretStr | None = Field(default=None, description="Password; use ${ENV} or "
                                       "${file:...}.")
    tls: ClientTls | None = Field(default=None, description="Connect with TLS.")
    timeout: Duration = Field(
        default=10.0, gt=0, description="How long connecting and subscribing may take.")

    @model_validator(mode="after")
    def _password_needs_user(self) -> Self:
        if self.password is not None and self.username is None:
            raise ValueError("`password` needs `username`")
        return self

    @property
    def port_number(self) -> int:
        """The port, defaulted by TLS."""
        if self.port is not None:
            return self.port
        return 8883 if self.tls is not None else 1883

    def endpoint(self) -> str:
        """``mqtt://user@host:port`` without the password."""
        scheme = "mqtts" if self.tls is not None else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port_number}"


class MqttConnectionSettings(MqttBrokerSettings):
    """The connection of a source or a sink: the broker, and who the bridge is to it."""

    client_id: PlainText | None = Field(
        default=None, min_length=1, max_length=65535,
        description="Client identifier. Default: `fieldbridge-<bridge id>-<source id>` for a "
        "source with a persistent session (random with a clean session), "
        "`fieldbridge-<bridge id>-sink-<sink id>` for a sink.")
    keepalive: int = Field(default=60, ge=5, le=65535, description="Keepalive, in seconds.")


class MqttSourceConfig(MqttConnectionSettings, MessageSourceBase):
    """A connection to an MQTT broker and the points its topics carry."""

    protocol: Literal["mqtt"]
    clean_session: bool = Field(
        default=False, description="Start a new session on every connect. The default, a "
        "persistent session, has the broker keep QoS 1/2 messages that arrive while the "
        "bridge is away or that it has not acknowledged yet.")
    session_expiry: Duration = Field(
        default=86400.0, description="MQTT 5 only: how long the broker keeps a persistent "
        "session after a disconnect.")
    qos: QoS = Field(
        default=1, description="QoS of the subscriptions. 1 and 2: a message is acknowledged "
        "only once its events are stored.")
    share_group: PlainText | None = Field(
        default=None, min_length=1, pattern=r"^[^/+#]+$",
        description="Subscribe as a member of this shared-subscription group "
        "(`$share/<group>/<filter>`, MQTT 5, and 3.1.1 on Mosquitto, EMQX and HiveMQ): the "
        "broker spreads the messages over the group's members, other bridges or this "
        "source's worker processes. Default with `workers` above 1: "
        "`fieldbridge-<bridge id>-<source id>`.")
    points: Sequence[MqttPoint] = Field(min_length=1, description="The points to read.")

    def subscriptions(self, share_group: str | None = None) -> dict[str, int]:
        """Each topic filter to subscribe to, with the highest QoS a point asks of it; as a
        shared subscription of ``share_group`` when given."""
        prefix = f"$share/{share_group}/" if share_group else ""
        filters: dict[str, int] = {}
        for point in self.points:
            subscription = prefix + point.pattern().subscription
            qos = self.qos if point.qos is None else point.qos
            filters[subscription] = max(qos, filters.get(subscription, 0))
        return filters
