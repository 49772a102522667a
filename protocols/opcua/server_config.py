"""Configuration of the OPC-UA server: which points it serves, its security and its users."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, model_validator

from bridge.config.models import Identifier, PlainText, ResolvedPoint, ServerBase, StrictModel
from bridge.config.validation import field_error
from bridge.config.yamlsource import KeyPath

Policy = Literal["Basic256Sha256", "Aes256_Sha256_RsaPss"]
"""Security policies the server offers besides None."""
Mode = Literal["Sign", "SignAndEncrypt"]
"""Message security modes."""
_ALL_POLICIES: tuple[Policy, ...] = ("Basic256Sha256", "Aes256_Sha256_RsaPss")
_ALL_MODES: tuple[Mode, ...] = ("Sign", "SignAndEncrypt")


class OpcuaUser(StrictModel):
    """A user name and password, stored as the SHA-256 of the password."""

    name: Identifier = Field(description="The user name a client logs in with.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the password "
                        "(`fieldbridge hash-key` prints it); never the password.")
    role: Literal["read", "write"] = Field(
        default="read", description="`read` browses and reads; `write` may also write "
        "writable points (through the audited write path).")


class OpcuaServerConfig(ServerBase):
    """An OPC-UA server serving bridged points as variables, a folder per source and device."""

    protocol: Literal["opcua"] = Field(description="Always `opcua`.")
    port: int = Field(default=4840, ge=1, le=65535, description="Listen port.")
    path: PlainText = Field(
        default="fieldbridge", description="The endpoint's path: `opc.tcp://host:port/path`.")
    namespace: PlainText = Field(
        default="urn:fieldbridge:points", description="Namespace URI of the served variables; "
        "a variable's node id is `ns=<its index>;s=<point id>`.")
    points: list[PlainText] = Field(
        default_factory=lambda: ["*"], min_length=1, description="Serve the points whose id "
        "matches one of these patterns (`*` any characters, `?` one).")
    allow_none: bool = Field(
        default=False, description="Offer SecurityPolicy None as well: anyone who reaches the "
        "port reads unencrypted. Off unless explicitly allowed.")
    policies: list[Policy] = Field(
        default_factory=lambda: list(_ALL_POLICIES), description=
        "Security policies offered (each in every `modes`).")
    modes: list[Mode] = Field(
        default_factory=lambda: list(_ALL_MODES), min_length=1,
        description="Message security modes offered for each policy.")
    users: list[OpcuaUser] = Field(
        default_factory=list, description="User names and passwords clients log in with.")
    anonymous: bool = Field(
        default=False, description="Accept anonymous sessions, read-only.")

    @model_validator(mode="after")
    def _some_way_in(self) -> OpcuaServerConfig:
        if not self.policies and not self.allow_none:
            raise field_error("policies", "no security policy is offered: give one, or "
                              "`allow_none: true`", self.policies)
        if not self.users and not self.anonymous:
            raise field_error("users", "no client could log in: give `users`, or "
                              "`anonymous: true` for read-only anonymous sessions")
        names = [user.name for user in self.users]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise field_error(("users", index, "name"), f"user '{name}' is given twice",
                                  name)
        return self

    def serves(self, point_id: str) -> bool:
        """Whether the point is served."""
        return any(fnmatch.fnmatchcase(point_id, pattern) for pattern in self.points)


def check(server: ServerBase, points: Mapping[str, ResolvedPoint]) -> list[tuple[KeyPath, str]]:
    """Each pattern of ``points`` matches at least one configured point."""
    if not isinstance(server, OpcuaServerConfig):
        return []
    issues: list[tuple[KeyPath, str]] = []
    for index, pattern in enumerate(server.points):
        if not any(fnmatch.fnmatchcase(point_id, pattern) for point_id in points):
            issues.append((("points", index), f"no configured point matches '{pattern}'"))
    return issues
