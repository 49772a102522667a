"""TLS settings of a client connection to a broker (MQTT, AMQP): the model and its SSL context.

May import: ``bridge.config.models``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from bridge.config.models import StrictModel


class ClientTls(StrictModel):
    """TLS towards a broker: CA to trust, and a client certificate if the broker asks for one."""

    ca: Path | None = Field(
        default=None, description="PEM CA bundle that signs the broker's certificate; unset: "
        "the system's trust store.")
    cert: Path | None = Field(default=None, description="PEM client certificate (chain).")
    key: Path | None = Field(
        default=None, description="PEM private key of `cert`; unset: in the `cert` file.")
    key_password: SecretStr | None = Field(
        default=None, description="Password of an encrypted `key`.")
    verify_hostname: bool = Field(
        default=True, description="Check that the certificate names the host connected to.")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> ClientTls:
        if (self.key is not None or self.key_password is not None) and self.cert is None:
            raise ValueError("`key` and `key_password` go with `cert`")
        return self

    def context(self) -> ssl.SSLContext:
        """An SSL context; reads files, so call it off the event loop.

        Raises ``OSError`` or ``ssl.SSLError`` when a file is missing or invalid.
        """
        context = ssl.create_default_context(
            cafile=str(self.ca) if self.ca is not None else None)
        context.check_hostname = self.verify_hostname
        if self.cert is not None:
            password = self.key_password.get_secret_value() if self.key_password else None
            context.load_cert_chain(str(self.cert), str(self.key) if self.key else None,
                                    password)
        return context

