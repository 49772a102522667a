"""OPC-UA sessions: connecting a client (security, identity, certificates), closing it, and
turning asyncua's and the network's failures into reasons and error categories.

What the connector needs from asyncua's internals (the publish task a disconnect does not
wait for, a lost connection's socket, the log lines asyncua writes about a connection that is
already gone) is reached through ``protocols/opcua/asyncua_adapter.py`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.crypto import security_policies
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge.core.status import EndpointStatus
from bridge.errors import ConnectorError, ErrorCategory
from protocols.opcua import asyncua_adapter
from protocols.opcua.config import OpcuaSourceConfig
from protocols.opcua.security import (
    MODES,
    POLICIES,
    Material,
    application_uris,
    ensure_client_certificate,
    first_certificate,
    load_certificate,
    load_private_key,
    read_material,
    thumbprint,
)

logger = logging.getLogger(__name__)

asyncua_adapter.quiet_lost_connections()

DEFAULT_PORT = 4840
SESSION_TIMEOUT = 60.0
"""Seconds the server keeps our session (and subscription) after we vanish without closing."""

_AUTH_STATUSES = frozenset({
    "BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected",
    "BadSecurityChecksFailed", "BadUserSignatureInvalid", "BadApplicationSignatureInvalid",
    "BadNoValidCertificates", "BadRequestNotAllowed",
})
_CONFIG_STATUSES = frozenset({
    "BadSecurityPolicyRejected", "BadSecurityModeRejected", "BadTcpEndpointUrlInvalid",
    "BadServerUriInvalid", "BadServiceUnsupported",
})
_TRANSIENT_STATUSES = frozenset({
    "BadTimeout", "BadRequestTimeout", "BadServerHalted", "BadShutdown",
    "BadCommunicationError", "BadConnectionClosed", "BadConnectionRejected",
    "BadSecureChannelClosed", "BadSecureChannelIdInvalid", "BadSessionClosed",
    "BadSessionIdInvalid", "BadSessionNotActivated", "BadNoCommunication",
    "BadServerNotConnected", "BadTooManySessions", "BadMaxConnectionsReached",
    "BadTcpServerTooBusy", "BadResourceUnavailable", "BadOutOfMemory", "BadNoSubscription",
    "BadSubscriptionIdInvalid", "BadTooManyPublishRequests",
})
CATEGORIZED_STATUSES = _AUTH_STATUSES | _CONFIG_STATUSES | _TRANSIENT_STATUSES
"""Every status name given a category other than ``protocol``."""


def status_category(name: str) -> ErrorCategory:
    """The error category of a status code's symbolic name."""
    if name in _AUTH_STATUSES or name.startswith("BadCertificate"):
        return ErrorCategory.AUTH
    if name in _CONFIG_STATUSES:
        return ErrorCategory.CONFIG
    if name in _TRANSIENT_STATUSES:
        return ErrorCategory.TRANSIENT
    return ErrorCategory.PROTOCOL


def describe(exc: BaseException) -> tuple[str, ErrorCategory]:
    """What went wrong, for the inventory, and its category."""
    if isinstance(exc, UaStatusCodeError):
        status = ua.StatusCode(exc.code)
        return f"{status.name} ({status.doc.strip().rstrip('.')})", status_category(status.name)
    if isinstance(exc, TimeoutError):
        return "no answer in time", ErrorCategory.TRANSIENT
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}", ErrorCategory.TRANSIENT
    if isinstance(exc, OSError):
        # asyncio words a refused connection "Connect call failed (address)": the errno says it.
        text = os.strerror(exc.errno) if exc.errno else str(exc)
        return text or type(exc).__name__, ErrorCategory.TRANSIENT
    text = str(exc)
    if text.startswith("No matching endpoints"):
        return ("the server offers no endpoint with this security policy and mode",
                ErrorCategory.CONFIG)
    if "certificate mismatch" in text:
        return "the server presented another certificate than at discovery", ErrorCategory.AUTH
    return text or type(exc).__name__, ErrorCategory.PROTOCOL


@contextlib.contextmanager
def translated(endpoint: str, doing: str) -> Iterator[None]:
    """Turn asyncua's and the network's exceptions into ``ConnectorError``."""
    try:
        yield
    except (UaError, OSError, TimeoutError) as exc:
        reason, category = describe(exc)
        raise ConnectorError(endpoint, f"{doing}: {reason}", category) from exc


def connect_url(url: str) -> str:
    """The URL with the default port made explicit, which asyncua needs."""
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    has_port = "]:" in host if host.startswith("[") else ":" in host
    if has_port:
        return url
    return f"{scheme}://{host}:{DEFAULT_PORT}{slash}{path}"


class SessionClient(Client):
    """asyncua's client, able to encrypt a password on an unsecured channel.

    On a channel without security the server sends no certificate with CreateSession, yet
    its user token policy may still ask for the password encrypted with the server's key;
    asyncua then has no key to encrypt with. ``token_certificate`` (the certificate of the
    endpoint description) fills that gap for the one ActivateSession that needs it.
    """

    token_certificate: bytes | None = None
    """The server certificate (DER) to encrypt the identity token with, if the channel
    brings none."""

    async def activate_session(
        self, username: str | None = None, password: str | None = None,
        certificate: x509.Certificate | None = None,
    ) -> ua.ActivateSessionResult:
        """ActivateSession, with ``token_certificate`` standing in for the channel's."""
        policy = self.security_policy
        channel_certificate = policy.peer_certificate
        borrowed = not channel_certificate and self.token_certificate is not None
        if borrowed:
            policy.peer_certificate = self.token_certificate
        try:
            return await super().activate_session(username, password, certificate)
        finally:
            if borrowed:
                # Only the token is encrypted with it: the unsecured channel, renewed
                # later, must not name a receiver certificate.
                policy.peer_certificate = channel_certificate


ClientFactory = Callable[[OpcuaSourceConfig], SessionClient]
"""Creates the asyncua client for one run; tests may pass their own."""


def default_client(config: OpcuaSourceConfig) -> SessionClient:
    """An asyncua client for ``config``; its own reconnecting stays off."""
    return SessionClient(connect_url(config.url), timeout=config.timeout,
                         watchdog_intervall=config.keepalive, auto_reconnect=False)


class Session:
    """How the clients of one source connect and leave: the application identity, the
    secure channel, the user identity and the server certificate checks."""

    def __init__(self, config: OpcuaSourceConfig, *, endpoint: str, application_uri: str,
                 certificate_dir: Path, description: str) -> None:
        self.config = config
        self.endpoint = endpoint
        self.application_uri = application_uri
        self.certificate_dir = certificate_dir
        """Where the generated client certificate is kept."""
        self.description = description

    def failures(self, doing: str) -> contextlib.AbstractContextManager[None]:
        """Translate what fails inside into ``ConnectorError`` naming ``doing``."""
        return translated(self.endpoint, doing)

    async def open(self, client: SessionClient, status: EndpointStatus) -> None:
        """Connect ``client``: secure channel, then session with the configured identity."""
        config = self.config
        client.name = "Fieldbridge"
        client.description = self.description
        client.product_uri = "urn:fieldbridge"
        client.application_uri = self.application_uri
        client.session_timeout = int(SESSION_TIMEOUT * 1000)
        if config.security.policy != "None":
            await self._secure(client, status)
        auth = config.auth
        if auth.username is not None and auth.password is not None:
            client.set_user(auth.username)
            client.set_password(auth.password.get_secret_value())
            if config.security.policy == "None":
                client.token_certificate = await self._token_certificate(client)
        elif auth.certificate is not None and auth.private_key is not None:
            password = auth.private_key_password
            certificate = self._material(auth.certificate, "auth.certificate")
            key = self._material(auth.private_key, "auth.private_key")
            try:
                client.user_certificate = load_certificate(certificate)
                client.user_private_key = load_private_key(
                    key, password.get_secret_value() if password else None)
            except (ValueError, TypeError) as exc:
                raise ConnectorError(self.endpoint, f"auth: cannot load the user certificate "
                                     f"or key: {exc}", ErrorCategory.CONFIG) from exc
        with self.failures("connect"):
            await client.connect()

    async def _secure(self, client: Client, status: EndpointStatus) -> None:
        security = self.config.security
        password = security.private_key_password
        if security.client_certificate is not None and security.private_key is not None:
            certificate = self._material(security.client_certificate,
                                         "security.client_certificate")
            key = self._material(security.private_key, "security.private_key")
            try:
                loaded = load_certificate(certificate)
            except ValueError as exc:
                raise ConnectorError(self.endpoint, f"security.client_certificate: {exc}",
                                     ErrorCategory.CONFIG) from exc
            if security.application_uri is None:
                uris = application_uris(loaded)
                client.application_uri = uris[0] if uris else self.application_uri
            status.details["certificate"] = {"path": str(security.client_certificate),
                                             "thumbprint": thumbprint(loaded)}
        else:
            try:
                generated = ensure_client_certificate(
                    self.certificate_dir, self.application_uri, hostname=socket.gethostname())
            except (OSError, ValueError) as exc:
                raise ConnectorError(self.endpoint, f"cannot keep a client certificate in "
                                     f"{self.certificate_dir}: {exc}",
                                     ErrorCategory.CONFIG) from exc
            certificate = self._material(generated.certificate, "client certificate")
            key = self._material(generated.private_key, "client key")
            status.details["certificate"] = {"path": str(generated.certificate),
                                             "thumbprint": generated.thumbprint}
        endpoint = await self._endpoint(client)
        server = self._server_certificate(endpoint)
        with self.failures("security setup"):
            await client.set_security(
                POLICIES[security.policy],
                certificate.properties(),
                key.properties(password.get_secret_value() if password else None),
                server_certificate=Material(server, "der").properties(),
                mode=MODES[security.mode],
            )

    async def _endpoint(self, client: Client) -> ua.EndpointDescription:
        """The server's endpoint with our policy and mode, asked over an unsecured discovery
        channel, as every client must."""
        security = self.config.security
        if security.policy == "None":
            mode, uri = ua.MessageSecurityMode.None_, security_policies.SecurityPolicyNone.URI
        else:
            mode, uri = MODES[security.mode], POLICIES[security.policy].URI
        with self.failures("get endpoints"):
            endpoints = await client.connect_and_get_server_endpoints()
            return Client.find_endpoint(endpoints, mode, uri)

    async def _token_certificate(self, client: Client) -> bytes | None:
        """The server certificate to encrypt the password with on an unsecured channel, when
        the endpoint's username token policy asks for encryption (else ``None``)."""
        endpoint = await self._endpoint(client)
        for token in endpoint.UserIdentityTokens or []:
            if token.TokenType != ua.UserTokenType.UserName:
                continue
            if token.SecurityPolicyUri in ("", None, security_policies.SecurityPolicyNone.URI):
                return None
            if not endpoint.ServerCertificate:
                raise ConnectorError(
                    self.endpoint, "the server asks for the password encrypted with "
                    f"{token.SecurityPolicyUri.rpartition('#')[2]} but its endpoint carries no "
                    "certificate to encrypt it with", ErrorCategory.PROTOCOL)
            return self._server_certificate(endpoint)
        return None

    def _server_certificate(self, endpoint: ua.EndpointDescription) -> bytes:
        """The endpoint's certificate (DER), checked against the pin.

        A wrong pin found here is a clear refusal, where encrypting for the wrong key would
        only time out.
        """
        security = self.config.security
        try:
            offered = first_certificate(endpoint.ServerCertificate or b"")
        except ValueError as exc:
            raise ConnectorError(self.endpoint, f"the server's certificate is unreadable: {exc}",
                                 ErrorCategory.PROTOCOL) from exc
        if security.server_certificate is not None:
            pinned = self._material(security.server_certificate, "security.server_certificate")
            try:
                expected = thumbprint(load_certificate(pinned))
            except ValueError as exc:
                raise ConnectorError(self.endpoint, f"security.server_certificate: {exc}",
                                     ErrorCategory.CONFIG) from exc
            if thumbprint(offered) != expected:
                raise ConnectorError(
                    self.endpoint, f"the server's certificate (SHA-1 {thumbprint(offered)}) is "
                    f"not security.server_certificate (SHA-1 {expected})", ErrorCategory.AUTH)
        return offered.public_bytes(serialization.Encoding.DER)

    def _material(self, path: Path, what: str) -> Material:
        try:
            return read_material(path)
        except OSError as exc:
            raise ConnectorError(self.endpoint, f"cannot read {what} {path}: "
                                 f"{exc.strerror or exc}", ErrorCategory.CONFIG) from exc

    async def close(self, client: Client, connected: bool) -> None:
        """Close the session (deleting its subscription) and wait for asyncua's tasks."""
        if not connected and client.state is UaClientState.DISCONNECTED:
            return
        # disconnect() cancels the publish loop but does not wait for it to finish.
        publish = asyncua_adapter.publish_task(client)
        if client.state is UaClientState.DISCONNECTED:
            # Lost: nobody answers a CloseSession, so only our side is torn down. asyncua
            # may have given up on a socket that is still open (a failed keep-alive).
            asyncua_adapter.drop_lost_transport(client)
            if publish is not None:
                publish.cancel()
        try:
            async with asyncio.timeout(self.config.timeout):
                await client.disconnect()
        except (TimeoutError, OSError, UaError) as exc:
            logger.debug("closing the session to %s: %s", self.endpoint, exc)
            client.disconnect_socket()
        if publish is not None and not publish.done():
            await asyncio.wait([publish], timeout=self.config.timeout)
