"""The OPC-UA server's configuration: the shipped example, secure defaults, and mistakes
refused with the file, the line and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.errors import ConfigError
from bridge.registry import load_config
from protocols.opcua.server_config import OpcuaServerConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "mappings" / "opcua-server-example.yaml"
HASH = "c4bbcb1fbec99d65bf59d85c8cb62ee2db963f0fe106f483d9afa73bd4e39a8a"


def load(tmp_path: Path, **server: Any) -> OpcuaServerConfig:
    """A configuration with one MQTT source and one OPC-UA server."""
    document = {
        "sources": [{"id": "plant", "protocol": "mqtt", "host": "127.0.0.1",
                     "points": [{"name": "t", "topic": "t", "format": "number"}]}],
        "servers": [{"id": "north", "protocol": "opcua", **server}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    (config,) = load_config(path).servers
    assert isinstance(config, OpcuaServerConfig)
    return config


def test_example_validates() -> None:
    (server,) = load_config(EXAMPLE).servers
    assert isinstance(server, OpcuaServerConfig)
    assert server.endpoint() == "opcua://127.0.0.1:4840"
    assert [(user.name, user.role) for user in server.users] == [
        ("historian", "read"), ("operator", "write")]
    assert server.serves("boiler.temperature")


def test_secure_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, users=[{"name": "viewer", "sha256": HASH}])
    assert (config.host, config.port, config.allow_none, config.anonymous) == (
        "127.0.0.1", 4840, False, False)
    assert config.policies == ["Basic256Sha256", "Aes256_Sha256_RsaPss"]
    assert config.modes == ["Sign", "SignAndEncrypt"]
    assert config.users[0].role == "read"


def test_a_server_nobody_could_log_in_to_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"servers\[0\]\.users: no client could log in"):
        load(tmp_path)


def test_no_policy_without_allow_none_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"servers\[0\]\.policies: no security policy"):
        load(tmp_path, anonymous=True, policies=[])


def test_a_pattern_matching_no_point_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"servers\[0\]\.points\[0\]: no configured point "
                       r"matches 'boiler\.\*'"):
        load(tmp_path, anonymous=True, points=["boiler.*"])


def test_a_password_in_clear_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"servers\[0\]\.users\[0\]\.sha256"):
        load(tmp_path, users=[{"name": "viewer", "sha256": "hunter2"}])


def test_unknown_policies_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"servers\[0\]\.policies\[0\]"):
        load(tmp_path, anonymous=True, policies=["Basic128Rsa15"])
