"""Certificates for OPC-UA security: load what is configured, generate what is not.

A server trusts a client by its certificate, so the generated one is made once, kept in the
state directory and reused on every start; a new certificate per start would have to be
trusted again each time. Files are read here rather than by asyncua, which reads through
worker threads, and PEM or DER is told by the content, not by the file name.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from asyncua import ua
from asyncua.crypto import cert_gen, security_policies, uacrypto
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

logger = logging.getLogger(__name__)

POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
"""asyncua's policy class for each configured policy name (``None`` needs none)."""

MODES: dict[str, ua.MessageSecurityMode] = {
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}

CERTIFICATE_FILE = "client-cert.der"
KEY_FILE = "client-key.pem"
VALIDITY = timedelta(days=5 * 365)
"""How long a generated certificate is valid; an expired one is replaced (and re-trusted)."""


@dataclass(frozen=True)
class Material:
    """The bytes of a certificate or key file and their encoding."""

    content: bytes
    encoding: Literal["pem", "der"]

    def properties(self, password: str | None = None) -> uacrypto.CertProperties:
        """As asyncua takes it, content rather than a path."""
        return uacrypto.CertProperties(self.content, self.encoding, password)


def read_material(path: Path) -> Material:
    """Read a PEM or DER file; raises ``OSError`` when it cannot be read."""
    content = path.read_bytes()
    encoding: Literal["pem", "der"] = "pem" if b"-----BEGIN" in content[:4096] else "der"
    return Material(content, encoding)


def load_certificate(material: Material) -> x509.Certificate:
    """The certificate in ``material``; raises ``ValueError`` if it is not one."""
    if material.encoding == "pem":
        return x509.load_pem_x509_certificate(material.content)
    return x509.load_der_x509_certificate(material.content)


def first_certificate(der: bytes) -> x509.Certificate:
    """The first certificate of a DER blob that may hold its chain after it (servers do)."""
    if len(der) < 2 or der[0] != 0x30:
        raise ValueError("not a DER certificate")
    length = der[1]
    if length < 0x80:
        end = 2 + length
    else:
        size = length & 0x7F
        end = 2 + size + int.from_bytes(der[2:2 + size], "big")
    return x509.load_der_x509_certificate(der[:end])


def load_private_key(material: Material, password: str | None = None) -> PrivateKeyTypes:
    """The private key in ``material``; raises ``ValueError`` or ``TypeError`` if unusable."""
    secret = password.encode() if password is not None else None
    if material.encoding == "pem":
        return serialization.load_pem_private_key(material.content, secret)
    return serialization.load_der_private_key(material.content, secret)


def thumbprint(certificate: x509.Certificate) -> str:
    """The SHA-1 thumbprint, as OPC-UA servers list trusted certificates."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def application_uris(certificate: x509.Certificate) -> list[str]:
    """The URIs in the certificate's subject alternative names."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(names.value.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass(frozen=True)
class ClientCertificate:
    """The application certificate a source uses, and whether it was just made."""

    certificate: Path
    private_key: Path
    thumbprint: str
    generated: bool


def ensure_client_certificate(
    directory: Path, application_uri: str, *, hostname: str, now: datetime | None = None
) -> ClientCertificate:
    """The certificate in ``directory``, generated only if missing, expired or for another URI.

    Generating takes an RSA key (about a tenth of a second) once per source and lifetime of
    the certificate, so it runs inline rather than in a thread.
    """
    moment = now or datetime.now(UTC)
    certificate_path = directory / CERTIFICATE_FILE
    key_path = directory / KEY_FILE
    reason = "none was generated yet"
    if certificate_path.is_file() and key_path.is_file():
        existing = x509.load_der_x509_certificate(certificate_path.read_bytes())
        if existing.not_valid_after_utc <= moment:
            reason = f"the previous one expired on {existing.not_valid_after_utc:%Y-%m-%d}"
        elif application_uri not in application_uris(existing):
            reason = f"the application URI changed to {application_uri}"
        else:
            return ClientCertificate(certificate_path, key_path, thumbprint(existing), False)
    key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(application_uri), x509.DNSName(hostname)]
    certificate = cert_gen.generate_self_signed_app_certificate(
        key, f"Fieldbridge {application_uri}", {}, names,
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=VALIDITY.days)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(key_path, cert_gen.dump_private_key_as_pem(key), mode=0o600)
    _write(certificate_path, certificate.public_bytes(serialization.Encoding.DER), mode=0o644)
    generated = ClientCertificate(certificate_path, key_path, thumbprint(certificate), True)
    logger.warning("generated OPC-UA client certificate %s (SHA-1 %s) because %s; servers "
                   "must trust it once", certificate_path, generated.thumbprint, reason)
    return generated


def _write(path: Path, content: bytes, *, mode: int) -> None:
    """Write atomically with ``mode`` from the start, so a key is never world-readable."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
