"""MQTT discovery against the local Mosquitto: topics of two shapes with nested JSON, a text
and a binary topic; the generated points run and map the sampled messages.

The sampled messages are retained, so they reach the discovery (and afterwards the source)
as soon as each subscribes: nothing waits on the clock. They are cleared at the end.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import pytest_asyncio
from helpers import free_port
from helpers.brokers import MQTT_HOST, MQTT_PORT, SourceRun, require_broker, unique, wait_until
from helpers.discovery import in_thread

from bridge import cli
from bridge.core.discovery import DiscoveryContext, StreamProgress
from bridge.core.model import Quality
from bridge.errors import ConnectorError, ErrorCategory
from bridge.registry import load_config
from protocols.mqtt.discover import MqttDiscoverRequest, discover, jmespath_of

pytestmark = pytest.mark.broker


def messages(prefix: str) -> dict[str, bytes]:
    """Topic → payload: sensors of two sites (one shape), meters (another), text, binary."""
    sensor = {("north", "boiler-1"): 61.5, ("north", "pump-2"): 40.25,
              ("south", "boiler-3"): 70.0}
    published = {
        f"{prefix}/sensors/{site}/{device}/telemetry": json.dumps(
            {"temp": temp, "env": {"humidity": 40, "ok": True}, "fw": "1.2"}).encode()
        for (site, device), temp in sensor.items()}
    for meter, power in (("m1", 3.5), ("m2", 4.0)):
        published[f"{prefix}/meters/{meter}/state"] = json.dumps(
            {"power": {"kw": power, "phase currents": [1, 2, 3]}, "status": "run"}).encode()
    published[f"{prefix}/gateway/mode"] = b"auto"
    published[f"{prefix}/gateway/frame"] = bytes([0, 255, 16, 1])
    return published


@pytest_asyncio.fixture
async def retained() -> AsyncIterator[tuple[str, dict[str, bytes]]]:
    """Retained messages under a unique prefix, cleared afterwards."""
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    prefix = unique("fbtest-discover-")
    published = messages(prefix)
    async with aiomqtt.Client(MQTT_HOST, MQTT_PORT, identifier=unique("fbtest-pub-")) as client:
        for topic, payload in published.items():
            await client.publish(topic, payload, qos=1, retain=True)
        try:
            yield prefix, published
        finally:
            for topic in published:
                await client.publish(topic, b"", qos=1, retain=True)


def _context() -> DiscoveryContext:
    return DiscoveryContext(progress=StreamProgress(io.StringIO(), tty=False))


async def test_sampled_topics_become_templated_points_that_map_the_messages(
    retained: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    prefix, published = retained
    result = await discover(MqttDiscoverRequest(
        host=MQTT_HOST, port=MQTT_PORT, filter=f"{prefix}/#", seconds=30,
        messages=len(published), source_id="field"), _context())
    assert not result.partial
    by_name = {item.name: item for item in result.items}
    stem = prefix
    sensors = f"{stem}.sensors.{{level3}}.{{level4}}.telemetry"
    meters = f"{stem}.meters.{{level3}}.state"
    assert set(by_name) == {
        f"{sensors}.temp", f"{sensors}.env.humidity", f"{sensors}.env.ok", f"{sensors}.fw",
        f"{meters}.power.kw", f"{meters}.status", f"{stem}.gateway.mode"}
    temp = by_name[f"{sensors}.temp"]
    assert temp.address == f"{prefix}/sensors/{{level3}}/{{level4}}/telemetry"
    assert (temp.type, temp.extra["path"], temp.extra["topics"]) == ("number", "temp", 3)
    assert by_name[f"{sensors}.env.ok"].type == "bool"
    assert by_name[f"{meters}.status"].type == "string"
    assert by_name[f"{stem}.gateway.mode"].extra["format"] == "text"
    assert any(f"{prefix}/gateway/frame: binary payload (4 bytes: 00 ff 10 01)" in warning
               for warning in result.warnings)
    assert "is a list (3 items)" in result.yaml
    assert "gateway/mode: not JSON (text, e.g. 'auto')" in result.yaml

    path = tmp_path / "mqtt.yaml"
    path.write_text(result.yaml, encoding="utf-8")
    assert load_config(path).sources[0].id == "field"
    expected: dict[str, Any] = {}
    for site, device, temp_value in (("north", "boiler-1", 61.5), ("north", "pump-2", 40.25),
                                     ("south", "boiler-3", 70.0)):
        base = f"{stem}.sensors.{site}.{device}.telemetry"
        expected |= {f"{base}.temp": temp_value, f"{base}.env.humidity": 40,
                     f"{base}.env.ok": True, f"{base}.fw": "1.2"}
    expected |= {f"{stem}.meters.m1.state.power.kw": 3.5, f"{stem}.meters.m2.state.status":
                 "run", f"{stem}.gateway.mode": "auto"}
    async with SourceRun(path) as run:
        def mapped() -> dict[str, Any]:
            return {event.point: event.value for event in run.events
                    if event.quality is Quality.GOOD}
        await wait_until(lambda: expected.items() <= mapped().items(),
                         what="the sampled messages mapped")
    assert not [event for event in run.events if event.quality is not Quality.GOOD]


async def test_an_idle_filter_says_so(tmp_path: Path) -> None:
    require_broker("Mosquitto", MQTT_HOST, MQTT_PORT)
    result = await discover(MqttDiscoverRequest(
        host=MQTT_HOST, port=MQTT_PORT, filter=f"{unique('fbtest-idle-')}/#", seconds=0.2),
        _context())
    assert result.items == []
    assert "No message arrived" in result.yaml


async def test_an_unreachable_broker_is_a_clear_error() -> None:
    with pytest.raises(ConnectorError) as caught:
        await discover(MqttDiscoverRequest(host="127.0.0.1", port=free_port(), seconds=1,
                                           timeout=2), _context())
    assert caught.value.category is ErrorCategory.TRANSIENT


async def test_the_command(retained: tuple[str, dict[str, bytes]], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    prefix, _ = retained
    output = tmp_path / "out.yaml"
    status = await in_thread(cli.main, [
        "discover", "mqtt", f"{MQTT_HOST}:{MQTT_PORT}", "--filter", f"{prefix}/meters/#",
        "--seconds", "30", "--messages", "2", "-o", str(output)])
    assert status == 0, capsys.readouterr().err
    assert f"topic: {prefix}/meters/{{level3}}/state" in output.read_text()
    assert await in_thread(cli.main, ["validate", str(output)]) == 0


def test_jmespath_quotes_keys_that_are_not_identifiers() -> None:
    assert jmespath_of(["power", "phase currents"]) == 'power."phase currents"'
    assert jmespath_of(["a", "b_2"]) == "a.b_2"
