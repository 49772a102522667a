"""Configuration of the MQTT sink: the broker connection (shared with the source), the topic
template, QoS and retain, and the format: one JSON event per message, or a Sparkplug B edge
node."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from bridge.config.models import Duration, PlainText, SinkBase
from bridge.config.validation import field_error
from bridge.core.sink import check_address_template
from bridge.core.templates import Template
from protocols.mqtt.config import MqttConnectionSettings, QoS

_FORMAT_OF = {"retain": "json", "commands": "sparkplug_b"}
"""Switches that only one format has (Sparkplug B messages are never retained)."""
SPARKPLUG_ID_FORBIDDEN = ("+", "#", "/")
"""Characters a Sparkplug B group, edge node or device id may not hold: it is one topic level."""

DEFAULT_TOPIC = "fieldbridge/{source}/{point}"
WINDOW = 1000
"""Publishes awaiting acknowledgement at most, unless ``window`` says otherwise."""
QOS2_WINDOW = 20
"""The same for QoS 2 under MQTT 3.1.1, where the broker cannot say what it takes."""


class MqttSinkConfig(MqttConnectionSettings, SinkBase):
    """Publishes events to an MQTT broker: one JSON event per message, or as a Sparkplug B
    edge node; QoS 1 and 2 publishes are confirmed by the broker (PUBACK, PUBCOMP)."""

    protocol: Literal["mqtt"]
    format: Literal["json", "sparkplug_b"] = Field(
        default="json", description="`json`: each event is one message, the normalized "
        "event's JSON, on its `topic`. `sparkplug_b`: the bridge is a Sparkplug B edge node "
        "(`group_id`, `edge_node_id`) and publishes births, data and deaths on the "
        "`spBv1.0/...` topics.")
    topic: PlainText = Field(
        default=DEFAULT_TOPIC, min_length=1,
        description="Topic template (`json`): `{source}`, `{point}`, `{protocol}`, "
        "`{quality}`, `{bridge}`, `{unit}` and `{tags.NAME}` (empty when missing). Each value "
        "is one topic level: `%`, `/`, `+` and `#` in it are written `%25`, `%2F`, `%2B` and "
        "`%23`.")
    qos: QoS = Field(
        default=1, description="QoS of the publishes (`json`). 1 and 2: an event leaves the "
        "outbox once the broker acknowledged it (PUBACK, PUBCOMP); 0: once it was written to "
        "the connection, so an event in flight when the connection breaks may be lost. "
        "Sparkplug B fixes its own: births, data and device deaths QoS 0, the NDEATH will and "
        "the command subscriptions QoS 1 (only `qos: 0` is taken there).")
    retain: bool = Field(
        default=False, description="Publish retained (`json`): the broker keeps each topic's "
        "last event and hands it to every new subscriber.")
    group_id: PlainText | None = Field(
        default=None, min_length=1, validate_default=True,
        description="Sparkplug B group id; required with `format: sparkplug_b`.")
    edge_node_id: PlainText | None = Field(
        default=None, min_length=1, validate_default=True,
        description="Sparkplug B edge node id; required with `format: sparkplug_b`.")
    commands: bool = Field(
        default=False, description="Sparkplug B: take commands (NCMD, DCMD) that write to "
        "writable points.")
    primary_host: PlainText | None = Field(
        default=None, min_length=1, description="Sparkplug B: the host id of the primary host "
        "application. The edge node follows its `spBv1.0/STATE/<primary_host>` messages: it "
        "is born only while the host is online, and while it is offline the edge node "
        "disconnects (with its NDEATH) and events wait in the outbox, to be delivered after "
        "the births once the host is back.")
    rebirth_interval: Duration = Field(
        default=5.0, description="Sparkplug B: at most one rebirth (NCMD `Node Control/"
        "Rebirth`) this often; requests that come sooner are folded into one rebirth at the "
        "end of the interval. 0: each request at once.")
    window: int | None = Field(
        default=None, ge=1, le=65535, description="Publishes awaiting the broker's "
        "acknowledgement, at most (the pipeline depth). Unset: 1000, and 20 at QoS 2 under "
        "MQTT 3.1.1 (Mosquitto's `max_inflight_messages`: it drops 3.1.1 QoS 2 messages "
        "beyond it without telling). At QoS 1 and 2 never more than the broker's Receive "
        "Maximum (MQTT 5).")
    retry: Duration = Field(
        default=1.0, gt=0, description="MQTT 5: wait this long before publishing again messages "
        "the broker refused (a PUBACK with a failure reason code, e.g. not authorized), "
        "doubling up to a minute while it keeps refusing.")

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("format") == "sparkplug_b":
            raise ValueError("Sparkplug B publishes on its own topics (spBv1.0/<group_id>/...): "
                             "remove `topic`")
        check_address_template(value)
        template = Template.parse(value)
        literal = "".join(template.literals)
        if not literal and all(name == "unit" or name.startswith("tags.")
                               for name in template.names):
            raise ValueError("the topic would be empty for an event without that unit or tag: "
                             "add a level such as {source} or some text")
        for wildcard in ("+", "#"):
            if wildcard in literal:
                raise ValueError(f"a topic to publish to has no wildcards ({wildcard!r})")
        if value.startswith("$"):
            raise ValueError("topics starting with `$` are the broker's ($SYS, $share)")
        return value

    @field_validator("retain", "commands")
    @classmethod
    def _one_format(cls, value: bool, info: ValidationInfo) -> bool:
        only = _FORMAT_OF[str(info.field_name)]
        if value and info.data.get("format", only) != only:
            raise ValueError(f"`{info.field_name}` is for `format: {only}`")
        return value

    @field_validator("qos")
    @classmethod
    def _sparkplug_qos(cls, value: int, info: ValidationInfo) -> int:
        if value != 0 and info.data.get("format") == "sparkplug_b":
            raise ValueError("Sparkplug B fixes its QoS (births, data and device deaths 0; the "
                             "NDEATH will and the command subscriptions 1): remove `qos`")
        return value

    @field_validator("primary_host", mode="after")
    @classmethod
    def _primary_host(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("format") != "sparkplug_b":
            raise ValueError("`primary_host` is for `format: sparkplug_b`")
        if value is not None and any(char in value for char in SPARKPLUG_ID_FORBIDDEN):
            raise ValueError("a Sparkplug B host id is one topic level: no `+`, `#` or `/`")
        return value

    @field_validator("rebirth_interval")
    @classmethod
    def _rebirth_interval(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("format") != "sparkplug_b":
            raise ValueError("`rebirth_interval` is for `format: sparkplug_b`")
        return value

    @field_validator("group_id", "edge_node_id", mode="after")
    @classmethod
    def _sparkplug_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        sparkplug = info.data.get("format") == "sparkplug_b"
        if value is None and sparkplug:
            raise ValueError(f"`format: sparkplug_b` needs `{info.field_name}`")
        if value is not None and not sparkplug and "format" in info.data:
            raise ValueError(f"`{info.field_name}` is for `format: sparkplug_b`")
        if value is not None and any(char in value for char in SPARKPLUG_ID_FORBIDDEN):
            raise ValueError("a Sparkplug B id is one topic level: no `+`, `#` or `/`")
        return value

    @model_validator(mode="after")
    def _sparkplug_in_the_daemon(self) -> MqttSinkConfig:
        if self.format == "sparkplug_b" and self.workers:
            raise field_error("workers", "a Sparkplug B edge node follows the bridge's points "
                              "and states, so it runs in the daemon's process: remove "
                              "`workers`", self.workers)
        return self

    def pipeline(self, receive_maximum: int | None = None) -> int:
        """Publishes awaiting acknowledgement at most: ``window``, or its default for the QoS
        and version, within the broker's Receive Maximum (MQTT 5 CONNACK; ``None`` when it
        sent none) at QoS 1 and 2."""
        window = self.window
        if window is None:
            window = QOS2_WINDOW if self.qos == 2 and self.mqtt_version == "3.1.1" else WINDOW
        if receive_maximum is not None and self.qos > 0:
            window = min(window, receive_maximum)
        return window
