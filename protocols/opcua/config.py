"""Configuration of OPC-UA sources: connection, security, user identity and points.

A point names its node either by NodeId (``ns=2;s=Boiler.Temperature``, ``ns=3;i=1002``,
``nsu=urn:vendor:plc;s=Temp``) or by a browse path from the Objects folder
(``2:Plant/2:Boiler/2:Temperature``). Both are checked for syntax at load; whether the node
exists is only known once connected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from asyncua import ua
from asyncua.ua.uaerrors import UaError
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from bridge.config.models import (
    Duration,
    PlainText,
    PointBase,
    ReportSpec,
    ResolvedPoint,
    SourceBase,
    StrictModel,
)
from bridge.config.validation import field_error
from bridge.config.yamlsource import KeyPath

PROTOCOL = "opcua"

SecurityPolicyName = Literal[
    "None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
"""Security policies offered; the deprecated Basic128Rsa15 and Basic256 are not."""

SecurityModeName = Literal["None", "Sign", "SignAndEncrypt"]


def parse_node_id(text: str) -> ua.NodeId:
    """A NodeId from its string form; raises ``ValueError`` saying what is wrong."""
    try:
        node = ua.NodeId.from_string(text)
    except (UaError, ValueError) as exc:
        raise ValueError(f"'{text}' is not a NodeId; expected e.g. ns=2;s=Boiler.Temperature "
                         "or ns=3;i=1002") from exc
    if isinstance(node, ua.ExpandedNodeId) and node.ServerIndex:
        raise ValueError(f"'{text}' points to another server (srv=); give a local NodeId")
    return node


def parse_browse_path(text: str) -> ua.RelativePath:
    """A relative path from Objects in the OPC-UA text format, at least one element long."""
    try:
        path = ua.RelativePath.from_string(text)
    except (UaError, ValueError) as exc:
        raise ValueError(f"'{text}' is not a browse path; expected e.g. "
                         "2:Plant/2:Boiler/2:Temperature") from exc
    if not path.Elements:
        raise ValueError("a browse path needs at least one element, e.g. 2:Plant/2:Temperature")
    if any(element.TargetName is None or not element.TargetName.Name
           for element in path.Elements):
        raise ValueError(f"'{text}' has an empty element; expected e.g. "
                         "2:Plant/2:Boiler/2:Temperature")
    return path


def redact_url(url: str) -> str:
    """``url`` with any password in it replaced by ``***``."""
    parts = urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    name, colon, _ = user.partition(":")
    return parts._replace(netloc=f"{name}{':***' if colon else ''}@{host}").geturl()


class Deadband(StrictModel):
    """A data-change filter the server applies before it notifies (subscribe mode)."""

    type: Literal["absolute", "percent"] = Field(
        description="`absolute`: in the node's units. `percent`: of the node's EURange, which "
        "the server must know (else the point is `bad` with the server's refusal).")
    value: float = Field(ge=0, description="Changes smaller than this are not sent.")

    @model_validator(mode="after")
    def _percent_range(self) -> Deadband:
        if self.type == "percent" and self.value > 100:
            raise field_error("value", "a percent deadband is between 0 and 100", self.value)
        return self


class SecurityConfig(StrictModel):
    """How the secure channel is protected, and with which application certificate."""

    policy: SecurityPolicyName = Field(
        default="None", description="`None`, `Basic256Sha256`, `Aes128_Sha256_RsaOaep` or "
        "`Aes256_Sha256_RsaPss`.")
    mode: SecurityModeName = Field(
        default="None", description="`None`, `Sign` or `SignAndEncrypt`; `None` exactly when "
        "the policy is `None`.")
    server_certificate: Path | None = Field(
        default=None, description="Pin the server's certificate (PEM or DER); unset, the "
        "certificate the server presents is accepted.")
    client_certificate: Path | None = Field(
        default=None, description="This client's application certificate (PEM or DER). Unset, "
        "one is generated once into `<state_dir>/opcua/<source id>/` and reused.")
    private_key: Path | None = Field(
        default=None, description="The private key of `client_certificate` (PEM or DER).")
    private_key_password: SecretStr | None = Field(
        default=None, description="Password of an encrypted `private_key`.")
    application_uri: PlainText | None = Field(
        default=None, min_length=1, description="The client's ApplicationUri. Default: the URI "
        "in `client_certificate`, else `urn:fieldbridge:<bridge id>:<source id>`.")

    @model_validator(mode="after")
    def _consistent(self) -> SecurityConfig:
        if (self.policy == "None") != (self.mode == "None"):
            key = "mode" if self.policy != "None" else "policy"
            raise field_error(key, "policy None goes with mode None, and a policy other than None "
                        "with mode Sign or SignAndEncrypt", getattr(self, key))
        if (self.client_certificate is None) != (self.private_key is None):
            key = "private_key" if self.private_key is None else "client_certificate"
            raise field_error(key, "give client_certificate and private_key together", None)
        if self.private_key_password is not None and self.private_key is None:
            raise field_error("private_key_password", "a key password needs private_key", None)
        if self.policy == "None" and (self.client_certificate or self.server_certificate):
            raise field_error("policy", "certificates are used with a security policy other than "
                        "None", self.policy)
        return self


class AuthConfig(StrictModel):
    """The user identity: anonymous (nothing set), username and password, or a certificate."""

    username: PlainText | None = Field(default=None, min_length=1, description="User name.")
    password: SecretStr | None = Field(
        default=None, description="Password; write `${ENV_VAR}` or `${file:/path}` to keep it "
        "out of the file.")
    certificate: Path | None = Field(
        default=None, description="X.509 user certificate (PEM or DER) for certificate "
        "identity. It may be the application certificate.")
    private_key: Path | None = Field(
        default=None, description="Private key of the user certificate (PEM or DER).")
    private_key_password: SecretStr | None = Field(
        default=None, description="Password of an encrypted user `private_key`.")

    @property
    def kind(self) -> Literal["anonymous", "username", "certificate"]:
        """Which identity token is sent."""
        if self.username is not None:
            return "username"
        if self.certificate is not None:
            return "certificate"
        return "anonymous"

    @model_validator(mode="after")
    def _one_identity(self) -> AuthConfig:
        if self.username is not None and self.certificate is not None:
            raise field_error("certificate", "give username/password or certificate/private_key, "
                        "not both", None)
        if self.password is not None and self.username is None:
            raise field_error("username", "a password needs a username", None)
        if self.username is not None and self.password is None:
            raise field_error("password", "a username needs a password (use ${ENV_VAR} or "
                        "${file:/path} to keep it out of the file)", None)
        if (self.certificate is None) != (self.private_key is None):
            key = "private_key" if self.private_key is None else "certificate"
            raise field_error(key, "give certificate and private_key together", None)
        if self.private_key_password is not None and self.private_key is None:
            raise field_error("private_key_password", "a key password needs private_key", None)
        return self


class OpcuaPoint(PointBase):
    """One OPC-UA variable, by NodeId or by browse path, with its subscription settings."""

    node: str | None = Field(
        default=None, description="NodeId, e.g. `ns=2;s=Boiler.Temperature`, `ns=3;i=1002`, "
        "or with a namespace URI `nsu=urn:vendor:plc;s=Temperature`.")
    path: str | None = Field(
        default=None, description="Browse path from the Objects folder, e.g. "
        "`2:Plant/2:Boiler/2:Temperature` (`ns:BrowseName` per element; `&` escapes `/`).")
    sampling_interval: Duration | None = Field(
        default=None, description="Overrides the source's sampling interval (subscribe mode).")
    queue_size: int | None = Field(
        default=None, ge=1, description="Overrides the source's queue size (subscribe mode).")
    deadband: Deadband | None = Field(
        default=None, description="Overrides the source's deadband (subscribe mode).")

    @model_validator(mode="after")
    def _one_address(self) -> OpcuaPoint:
        if (self.node is None) == (self.path is None):
            raise field_error("node", "give exactly one of `node` (a NodeId) or `path` (a browse "
                        "path from Objects)", None)
        try:
            if self.node is not None:
                parse_node_id(self.node)
            if self.path is not None:
                parse_browse_path(self.path)
        except ValueError as exc:
            raise field_error("node" if self.node is not None else "path", str(exc),
                        self.node or self.path) from None
        return self

    @property
    def address(self) -> str:
        """The address readings carry: the NodeId as written, or the browse path with ``/``."""
        if self.node is not None:
            return self.node
        assert self.path is not None
        return self.path if self.path.startswith(("/", ".", "<")) else f"/{self.path}"


class OpcuaSourceConfig(SourceBase):
    """An OPC-UA server, subscribed to or polled."""

    protocol: Literal["opcua"]
    url: PlainText = Field(description="Endpoint URL, `opc.tcp://host:4840/path`.")
    mode: Literal["subscribe", "poll"] = Field(
        default="subscribe", description="`subscribe`: monitored items, the server notifies "
        "changes. `poll`: batched reads every `poll_interval`.")
    publishing_interval: Duration = Field(
        default=1.0, gt=0, description="How often the server sends collected changes.")
    sampling_interval: Duration | None = Field(
        default=None, description="How often the server samples each node; unset, the "
        "publishing interval.")
    queue_size: int = Field(
        default=1, ge=1, description="Changes the server keeps per node between publishes; "
        "above 1 every sampled change is delivered, not only the last.")
    deadband: Deadband | None = Field(
        default=None, description="Data-change filter asked of the server for every point.")
    poll_interval: Duration = Field(default=1.0, gt=0, description="Poll mode: read cycle.")
    max_nodes_per_read: int | None = Field(
        default=None, ge=1, description="Poll mode: at most this many nodes per Read, on top "
        "of the server's own MaxNodesPerRead.")
    timeout: Duration = Field(
        default=5.0, gt=0, description="How long connecting, and each request, may take.")
    keepalive: Duration = Field(
        default=5.0, gt=0, description="How often an idle connection is checked (a read of "
        "the server state); a dead server is detected within about this long.")
    security: SecurityConfig = Field(
        default_factory=SecurityConfig, description="Secure channel and certificates.")
    auth: AuthConfig = Field(
        default_factory=AuthConfig, description="User identity; anonymous when unset.")
    prefix: PlainText | None = Field(
        default=None, description="Prefix of this source's point ids; default `<source id>.`.")
    report: ReportSpec | None = Field(
        default=None, description="Default report-by-exception settings of the points.")
    points: Sequence[OpcuaPoint] = Field(min_length=1, description="The nodes to read.")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials_in_url(cls, data: Any) -> Any:
        url = data.get("url") if isinstance(data, dict) else None
        if isinstance(url, str) and "@" in urlsplit(url).netloc:
            # Raised here so that the message shows the URL redacted, not as written.
            raise field_error("url", "credentials do not belong in the URL: use auth.username and "
                        "auth.password", redact_url(url))
        return data

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme != "opc.tcp" or not parts.hostname:
            raise ValueError("expected an endpoint URL such as opc.tcp://plc.local:4840")
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError as exc:
            raise ValueError(f"invalid port in the URL: {exc}") from None
        return url

    def endpoint(self) -> str:
        """The endpoint URL, credentials redacted, and the security in use."""
        url = redact_url(self.url)
        if self.security.policy == "None":
            return url
        return f"{url} ({self.security.policy}, {self.security.mode})"

    @property
    def point_prefix(self) -> str:
        """What point ids start with."""
        return self.prefix if self.prefix is not None else f"{self.id}."


def opcua_source(source: SourceBase) -> OpcuaSourceConfig:
    """``source`` as an OPC-UA source (the registry only hands us our own)."""
    if not isinstance(source, OpcuaSourceConfig):
        raise TypeError(f"source {source.id} is not an OPC-UA source")
    return source


def merged_report(config: OpcuaSourceConfig, point: OpcuaPoint) -> ReportSpec:
    """The point's report settings over the source's; raises ``ValidationError`` on a clash."""
    return ReportSpec().merged(config.report).merged(point.report)


def source_points(source: SourceBase, path: KeyPath) -> list[ResolvedPoint]:
    """The source's points with their ids, tags and report settings merged."""
    config = opcua_source(source)
    resolved = []
    for index, point in enumerate(config.points):
        try:
            report = merged_report(config, point)
        except ValidationError:
            # `check` reports the clash with its location; resolve with the point's own.
            report = ReportSpec().merged(point.report)
        resolved.append(ResolvedPoint(
            id=f"{config.point_prefix}{point.name}",
            source=config.id,
            device=None,
            spec=point,
            tags={**config.tags, **point.tags},
            report=report,
            path=(*path, "points", index),
        ))
    return resolved


_SUBSCRIPTION_KEYS = ("publishing_interval", "sampling_interval", "queue_size", "deadband")
_POINT_SUBSCRIPTION_KEYS = ("sampling_interval", "queue_size", "deadband")


def check(source: SourceBase, points: Sequence[ResolvedPoint]) -> list[tuple[KeyPath, str]]:
    """Settings that do not apply to the mode, and one node monitored two different ways."""
    config = opcua_source(source)
    issues: list[tuple[KeyPath, str]] = []
    if not points:
        return issues
    source_path = points[0].path[:-2]
    if config.mode == "poll":
        for key in _SUBSCRIPTION_KEYS:
            if key in config.model_fields_set:
                issues.append(((*source_path, key), f"`{key}` applies to mode subscribe; in "
                               "poll mode use poll_interval (and report.deadband for a "
                               "deadband)"))
    elif "poll_interval" in config.model_fields_set:
        issues.append(((*source_path, "poll_interval"), "`poll_interval` applies to mode poll"))
    if config.mode == "subscribe" and "max_nodes_per_read" in config.model_fields_set:
        issues.append(((*source_path, "max_nodes_per_read"),
                       "`max_nodes_per_read` applies to mode poll"))
    first: dict[str, tuple[ResolvedPoint, tuple[Any, ...]]] = {}
    for point in points:
        spec = point.spec
        if not isinstance(spec, OpcuaPoint):
            continue
        try:
            merged_report(config, spec)
        except ValidationError as exc:
            problem = "; ".join(error["msg"].removeprefix("Value error, ")
                                for error in exc.errors())
            issues.append(((*point.path, "report"), f"with the source's report settings: "
                           f"{problem}"))
        if config.mode == "poll":
            for key in _POINT_SUBSCRIPTION_KEYS:
                if key in spec.model_fields_set:
                    issues.append(((*point.path, key), f"`{key}` applies to mode subscribe"))
        settings = (spec.sampling_interval, spec.queue_size, spec.deadband)
        seen = first.setdefault(spec.address, (point, settings))
        if seen[0] is not point and seen[1] != settings:
            issues.append((point.path, f"point '{seen[0].id}' monitors the same node with "
                           "other sampling_interval, queue_size or deadband; one node is "
                           "monitored one way"))
    return issues
