"""API keys and scopes.

Keys are configured as their SHA-256 (``fieldbridge hash-key``), never in clear. A request
presents its key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; the key's hash is
compared with every configured hash in constant time. With no keys configured the API is
open, which is why it listens on loopback unless told otherwise.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.config.models import ApiKey


class Scope(enum.StrEnum):
    """What a key may do; ``admin`` implies every other scope."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the name of the key and its scopes (never the key itself)."""

    name: str
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        """Whether this key carries ``scope`` (``admin`` carries all)."""
        return scope in self.scopes or Scope.ADMIN in self.scopes


ANONYMOUS = Principal(name="anonymous", scopes=frozenset(Scope))
"""The principal of every request when no keys are configured."""


class AuthFailure(enum.StrEnum):
    """Why a request was refused; the ``error.code`` of the response."""

    UNAUTHENTICATED = "unauthenticated"
    """No key, or a key that matches no configured hash: 401."""
    FORBIDDEN = "forbidden"
    """A known key without the scope the request needs: 403."""


class AuthError(Exception):
    """A request was refused; carries why and the name of the key when it was known."""

    def __init__(self, failure: AuthFailure, message: str, hint: str) -> None:
        self.failure = failure
        self.message = message
        self.hint = hint
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal


class KeyRing:
    """The configured keys, checked against presented ones."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._entries = [
            _Entry(bytes.fromhex(key.sha256),
                   Principal(key.name, frozenset(Scope(scope) for scope in key.scopes)))
            for key in keys
        ]
        self.failures: Counter[AuthFailure] = Counter()
        """Refused requests by reason, for the metrics."""

    @property
    def enabled(self) -> bool:
        """Whether requests must present a key."""
        return bool(self._entries)

    def identify(self, presented: str | None) -> Principal:
        """The principal a presented key belongs to; raise ``AuthError`` (401) when none."""
        if not self._entries:
            return ANONYMOUS
        if not presented:
            raise self._refuse(AuthError(
                AuthFailure.UNAUTHENTICATED, "this endpoint needs an API key",
                "send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"))
        digest = hashlib.sha256(presented.encode()).digest()
        found: Principal | None = None
        # Compare with every entry, matched or not, so timing does not tell which one matched.
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry.principal
        if found is None:
            raise self._refuse(AuthError(
                AuthFailure.UNAUTHENTICATED, "the API key is not known",
                "check the key; the configuration holds its SHA-256 "
                "(print it with 'fieldbridge hash-key')"))
        return found

    def authorize(self, presented: str | None, scope: Scope) -> Principal:
        """The principal of a presented key if it carries ``scope``; else raise ``AuthError``."""
        principal = self.identify(presented)
        if not principal.allows(scope):
            raise self._refuse(AuthError(
                AuthFailure.FORBIDDEN,
                f"the key '{principal.name}' lacks the '{scope}' scope",
                f"add '{scope}' (or 'admin') to the scopes of key '{principal.name}' "
                "under api.keys"))
        return principal

    def _refuse(self, error: AuthError) -> AuthError:
        self.failures[error.failure] += 1
        return error
