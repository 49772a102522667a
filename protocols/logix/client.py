"""The seam to pycomm3: a small synchronous client the source runs in its own thread.

``LogixClient`` is what the source and discovery use; ``Pycomm3Client`` implements it with
pycomm3's ``LogixDriver`` (a controller) or ``CIPDriver`` (another EtherNet/IP device).
Tests pass a fake through a ``ClientFactory``.

pycomm3 reads a tag only when it knows the tag's definition, which it takes from the
controller's tag database. A target that refuses the upload (cpppo's simulator, say) is read
with definitions made from the configured types (``declare``); structures then cannot be
read, since their layout comes only from the controller.

Imports pycomm3 and the Logix config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pycomm3 import CIPDriver, LogixDriver, Services
from pycomm3.cip.data_types import DataTypes as _DataTypes
from pycomm3.exceptions import CommError, PycommError, ResponseError

from protocols.logix.config import CipAttribute, LogixSourceConfig

logger = logging.getLogger(__name__)

# pycomm3 logs every refused or failed request as an error with its traceback; the failure
# reaches the status and the points' reasons instead. A level set for `pycomm3` by the user
# (to debug it) is kept.
if logging.getLogger("pycomm3").level == logging.NOTSET:
    logging.getLogger("pycomm3").setLevel(logging.CRITICAL)

DataTypes: Any = _DataTypes
"""pycomm3's types by name (subscripted by name at run time, which its stubs do not say)."""


class ClientError(Exception):
    """The connection failed (``lost``: it was up and stopped answering)."""

    def __init__(self, reason: str, *, lost: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.lost = lost


@dataclass(frozen=True, slots=True)
class TagResult:
    """One tag (or attribute) read: its value, or why the target refused it."""

    request: str
    value: Any
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Declared:
    """A tag's type as the configuration gives it, for a target that refuses the upload."""

    type: str
    elements: int = 0
    """Array length (0: not an array)."""


class LogixClient(Protocol):
    """What the source and discovery need from an EtherNet/IP connection."""

    @property
    def connection_size(self) -> int:
        """The connection size the target granted, in bytes."""
        ...

    def open(self) -> None:
        """Connect (and forward open); ``ClientError`` when the target cannot be reached."""
        ...

    def close(self) -> None:
        """Disconnect; never raises."""
        ...

    def tag_database(self) -> dict[str, dict[str, Any]] | None:
        """The controller's tags by name, as uploaded; ``None`` when it refused the upload."""
        ...

    def declare(self, tags: Mapping[str, Declared]) -> None:
        """Definitions for tags the controller did not describe."""
        ...

    def read_tags(self, requests: Sequence[str]) -> list[TagResult]:
        """Read tags in one multi-service request; ``ClientError`` when the connection
        fails, a result with ``error`` for a tag the target refuses."""
        ...

    def write_tag(self, tag: str, value: Any) -> str | None:
        """Write one tag; the target's reason when it refuses, ``ClientError`` when the
        connection fails."""
        ...

    def read_attribute(self, attribute: CipAttribute, type_name: str) -> TagResult:
        """Read one CIP attribute (Get_Attribute_Single), decoded as ``type_name``."""
        ...

    def identity(self) -> dict[str, Any]:
        """The target's identity object: vendor, product name and type, revision, serial."""
        ...


ClientFactory = Callable[[LogixSourceConfig], LogixClient]
"""Makes the client for a source's settings (tests pass a fake)."""


_ATTRIBUTE_TYPES = {"STRING": "SHORT_STRING"}
"""CIP attributes carry the one-byte-length string (the Identity object's product name)."""


def _type_class(declared: Declared) -> Any:
    base = DataTypes[declared.type]
    return base[declared.elements] if declared.elements else base


def definition(name: str, declared: Declared) -> dict[str, Any]:
    """The definition pycomm3 keeps for an atomic tag, made from its configured type."""
    return {
        "tag_name": name, "dim": 1 if declared.elements else 0,
        "dimensions": [declared.elements, 0, 0], "alias": False, "tag_type": "atomic",
        "data_type": declared.type, "data_type_name": declared.type,
        "external_access": "Read/Write", "instance_id": 0,
        "type_class": _type_class(declared),
    }


class Pycomm3Client:
    """``LogixClient`` over pycomm3."""

    def __init__(self, config: LogixSourceConfig) -> None:
        self._config = config
        host = f"{config.host}:{config.port}"
        self._driver: CIPDriver
        if config.controller:
            self._driver = LogixDriver(
                f"{host}/{config.route_path}", init_tags=False, init_program_name=False,
                init_info=False)
        else:
            self._driver = CIPDriver(host)
        self._driver._cfg["socket_timeout"] = config.timeout
        self._driver._cfg["connection_size"] = config.connection_size
        # A standard forward open carries at most 511 bytes; larger needs the Large one.
        self._driver._cfg["extended forward open"] = config.connection_size > 511
        self._database: dict[str, dict[str, Any]] | None = None

    @property
    def connection_size(self) -> int:
        """The size granted at forward open."""
        size: int = self._driver.connection_size
        return size

    def open(self) -> None:
        """Connect, forward open, and upload the tag database when asked to."""
        try:
            opened = self._driver.open()  # type: ignore[no-untyped-call]
        except PycommError as exc:
            raise ClientError(f"cannot connect: {exc}") from exc
        if not opened:
            raise ClientError("cannot connect: the target did not answer")
        if isinstance(self._driver, LogixDriver) and self._config.upload_tags:
            try:
                self._driver.get_tag_list(program="*")
            except CommError as exc:
                raise ClientError(f"connection lost during the tag upload: {exc}",
                                  lost=True) from exc
            except ResponseError as exc:
                logger.info("%s refuses the tag upload (%s): reading with the configured "
                            "types", self._config.endpoint(), exc)
                self._database = None
                # Some targets end the session on the refused request: start a new one.
                self.close()
                try:
                    self._driver.open()  # type: ignore[no-untyped-call]
                except PycommError as again:
                    raise ClientError(f"cannot connect: {again}") from again
            else:
                self._database = dict(self._driver.tags)

    def close(self) -> None:
        """Close the connection, ignoring a target that no longer answers."""
        try:
            self._driver.close()  # type: ignore[no-untyped-call]
        except PycommError:
            logger.debug("closing %s failed", self._config.endpoint(), exc_info=True)

    def tag_database(self) -> dict[str, dict[str, Any]] | None:
        """The uploaded tags, or ``None``."""
        return self._database

    def declare(self, tags: Mapping[str, Declared]) -> None:
        """Add definitions for tags the driver does not know (documented pycomm3 usage:
        ``plc._tags`` may be set from another driver's ``tags``)."""
        if not isinstance(self._driver, LogixDriver):
            return
        # Declared tags have no symbol instance ids: address every tag by its name.
        self._driver._cfg["use_instance_ids"] = False
        known: dict[str, Any] = dict(self._driver.tags)
        for name, declared in tags.items():
            known.setdefault(name, definition(name, declared))
        self._driver._tags = known

    def read_tags(self, requests: Sequence[str]) -> list[TagResult]:
        """One multi-service read (pycomm3 packs the requests within the connection size)."""
        if not isinstance(self._driver, LogixDriver):
            raise ClientError("tags need a Logix controller")
        try:
            tags = self._driver.read(*requests)
        except CommError as exc:
            raise ClientError(str(exc), lost=True) from exc
        except PycommError as exc:
            return [TagResult(request, None, str(exc)) for request in requests]
        listed = tags if isinstance(tags, list) else [tags]
        return [TagResult(request, tag.value, tag.error)
                for request, tag in zip(requests, listed, strict=True)]

    def write_tag(self, tag: str, value: Any) -> str | None:
        """Write one tag."""
        if not isinstance(self._driver, LogixDriver):
            raise ClientError("tags need a Logix controller")
        try:
            # pycomm3 1.2 appends its request twice to a lone (not multi-service) write
            # (harmless where the target ignores trailing data, refused where it does not):
            # the same write twice in one multi-service packet is one request and the same
            # end state.
            results = self._driver.write((tag, value), (tag, value))
        except CommError as exc:
            raise ClientError(str(exc), lost=True) from exc
        except PycommError as exc:
            return str(exc)
        error: str | None = results[0].error or results[1].error
        return error

    def read_attribute(self, attribute: CipAttribute, type_name: str) -> TagResult:
        """Get_Attribute_Single, unconnected (any EtherNet/IP device answers it)."""
        try:
            tag = self._driver.generic_message(
                service=Services.get_attribute_single, class_code=attribute.class_code,
                instance=attribute.instance, attribute=attribute.attribute,
                data_type=DataTypes[_ATTRIBUTE_TYPES.get(type_name, type_name)],
                connected=False, name=str(attribute))
        except CommError as exc:
            raise ClientError(str(exc), lost=True) from exc
        except PycommError as exc:
            return TagResult(str(attribute), None, str(exc))
        return TagResult(str(attribute), tag.value, tag.error)

    def identity(self) -> dict[str, Any]:
        """The controller's identity object (class 1, instance 1); empty for another
        device."""
        if not isinstance(self._driver, LogixDriver):
            return {}
        try:
            return dict(self._driver.get_plc_info())
        except CommError as exc:
            raise ClientError(f"the identity cannot be read: {exc}", lost=True) from exc
        except PycommError as exc:
            raise ClientError(f"the identity cannot be read: {exc}") from exc


def create_client(config: LogixSourceConfig) -> LogixClient:
    """The pycomm3 client for a source's settings."""
    return Pycomm3Client(config)
