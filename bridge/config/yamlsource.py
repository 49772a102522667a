"""YAML loading that remembers where every key came from, with ``${...}`` substitution.

PyYAML builds the node tree; we construct plain Python data from it ourselves so that each
key path keeps its file and line, which config errors then point at.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bridge.errors import ConfigIssue, excerpt

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Location:
    """Where a key or item was written."""

    file: str
    line: int


@dataclass
class Document:
    """Plain data from one or more YAML files, with the location of every key path."""

    data: Any
    locations: dict[KeyPath, Location] = field(default_factory=dict)
    substituted: set[KeyPath] = field(default_factory=set)
    """Key paths whose value came from ``${...}``: treated as secret in any message."""

    def locate(self, path: KeyPath) -> Location | None:
        """The location of the longest known prefix of ``path``."""
        for end in range(len(path), -1, -1):
            location = self.locations.get(path[:end])
            if location is not None:
                return location
        return None

    def issue(self, path: KeyPath, message: str) -> ConfigIssue:
        """A config issue at ``path``, located by its longest known prefix."""
        location = self.locate(path)
        file = location.file if location else "<config>"
        line = location.line if location else None
        return ConfigIssue(file=file, line=line, path=format_path(path), message=message)


def format_path(path: KeyPath) -> str:
    """``("sources", 0, "port")`` as ``sources[0].port``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = _key_text(part)
            text += f".{key}" if text else key
    return text


def _key_text(key: str) -> str:
    """A key as a path shows it: a long one or one with control characters as an excerpt."""
    if len(key) <= 80 and key.isprintable():
        return key
    return excerpt(key, 40)


MAX_FILE_BYTES = 16 * 1024 * 1024
"""The largest configuration or included file: far beyond any real bridge's."""

MAX_SECRET_BYTES = 1024 * 1024
"""The largest file a ``${file:...}`` reference may read."""


class FileReadError(Exception):
    """A file cannot be read as configuration text; the message says why, never its content."""


def read_bounded(path: Path, limit: int) -> str:
    """The UTF-8 text of the regular file ``path``, refused past ``limit`` bytes.

    Devices (``/dev/zero``), FIFOs, sockets and directories are refused before anything is
    read, and no more than ``limit + 1`` bytes are ever read, whatever the file claims.
    """
    try:
        # O_NONBLOCK: opening a FIFO with no writer must not hang; fstat then refuses it.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise FileReadError(exc.strerror or type(exc).__name__) from exc
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = ("a directory" if stat.S_ISDIR(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
                "a FIFO" if stat.S_ISFIFO(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise FileReadError(f"{kind}, not a regular file")
    with os.fdopen(descriptor, "rb") as file:
        try:
            data = file.read(limit + 1)
        except OSError as exc:
            raise FileReadError(exc.strerror or type(exc).__name__) from exc
    if len(data) > limit:
        raise FileReadError(f"larger than {_size(limit)}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileReadError(f"not UTF-8 text (byte {exc.start})") from None


def _size(count: int) -> str:
    return f"{count // (1024 * 1024)} MiB" if count % (1024 * 1024) == 0 else f"{count:,} bytes"


_REFERENCE = re.compile(r"\$\$|\$\{([^}]*)\}")


def substitute(text: str, base: Path) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``${file:/path}``; ``$$`` is a literal ``$``.

    Raises ``ValueError`` naming what is missing; the caller adds the location.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        reference = match.group(1)
        if reference.startswith("file:"):
            path = Path(reference[5:]).expanduser()
            if not path.is_absolute():
                path = base / path
            try:
                return read_bounded(path, MAX_SECRET_BYTES).rstrip("\r\n")
            except FileReadError as exc:
                raise ValueError(f"cannot read secret file {path}: {exc}") from exc
        name, has_default, default = reference.partition(":-")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{excerpt('${' + reference + '}')} is not a valid reference")
        value = os.environ.get(name)
        if value is None or (has_default and value == ""):
            if has_default:
                return default
            raise ValueError(f"environment variable {name} is not set")
        return value

    return _REFERENCE.sub(replace, text)


MAX_VALUES = 200_000
"""Values a configuration file may expand to, aliases included: far beyond any real bridge,
far below what an alias bomb ("billion laughs") would build."""


class _ExpansionError(Exception):
    """The document expands without bound: aliases nested into a bomb, or into themselves."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def load_yaml(path: Path, issues: list[ConfigIssue]) -> Document:
    """Parse one YAML file; problems are appended to ``issues`` with their line."""
    document = Document(data=None)
    name = str(path)
    try:
        text = read_bounded(path, MAX_FILE_BYTES)
    except FileReadError as exc:
        issues.append(ConfigIssue(name, None, "", f"cannot read file: {exc}"))
        return document
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            document.data = {}
            return document
        document.data = _Builder(loader, document, name, path.parent, issues).build(node, ())
    except _ExpansionError as exc:
        issues.append(ConfigIssue(name, exc.line, "", exc.message))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        issues.append(ConfigIssue(name, line, "", f"invalid YAML: {_short(problem)}"))
    except yaml.YAMLError as exc:
        issues.append(ConfigIssue(name, None, "", f"invalid YAML: {_short(str(exc))}"))
    finally:
        loader.dispose()
    return document


def _short(message: str) -> str:
    """A parser's message cut short: it may quote what it could not parse."""
    return message if len(message) <= 200 else f"{message[:200]}…"


class _Builder:
    """Builds a document's data from its node tree, recording where every key was written.

    Aliases share nodes, so the tree is a graph: the builder bounds how many values it makes
    (``MAX_VALUES``) and refuses a node that contains itself.
    """

    def __init__(self, loader: yaml.SafeLoader, document: Document, name: str, base: Path,
                 issues: list[ConfigIssue]) -> None:
        self.loader = loader
        self.document = document
        self.name = name
        self.base = base
        self.issues = issues
        self.remaining = MAX_VALUES
        self.building: set[int] = set()

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        """The value of ``node``, written at ``path``."""
        line = node.start_mark.line + 1
        self.remaining -= 1
        if self.remaining < 0:
            raise _ExpansionError(line, f"the file expands to more than {MAX_VALUES:,} values "
                                  "(aliases nested into aliases?)")
        if id(node) in self.building:
            raise _ExpansionError(line, "an alias refers to a node that contains it")
        self.document.locations.setdefault(path, Location(self.name, line))
        if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            return self._scalar(node, path)
        self.building.add(id(node))
        try:
            return self._collection(node, path)
        finally:
            self.building.discard(id(node))

    def _collection(self, node: yaml.Node, path: KeyPath) -> Any:
        if isinstance(node, yaml.MappingNode):
            explicit = sum(1 for key_node, _ in node.value
                           if key_node.tag != "tag:yaml.org,2002:merge")
            self.loader.flatten_mapping(node)
            merged = len(node.value) - explicit
            result: dict[Any, Any] = {}
            written: set[Any] = set()
            for position, (key_node, value_node) in enumerate(node.value):
                key = self.loader.construct_object(key_node, deep=True)
                if not isinstance(key, str | int | float | bool):
                    self.issues.append(ConfigIssue(self.name, key_node.start_mark.line + 1, "",
                                                   "a mapping key must be a plain scalar"))
                    continue
                child: KeyPath = (*path, key if isinstance(key, str | int) else str(key))
                if key in written:
                    self.issues.append(ConfigIssue(self.name, key_node.start_mark.line + 1,
                                                   format_path(child), "duplicate key"))
                    continue
                if position >= merged:
                    # Keys written out override keys merged in with `<<`; twice written is an
                    # error.
                    written.add(key)
                self.document.locations[child] = Location(self.name,
                                                          key_node.start_mark.line + 1)
                result[key] = self.build(value_node, child)
            return result
        return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]

    def _scalar(self, node: yaml.Node, path: KeyPath) -> Any:
        value = self.loader.construct_object(node, deep=True)
        if isinstance(value, str) and "$" in value:
            try:
                expanded = substitute(value, self.base)
            except ValueError as exc:
                self.issues.append(ConfigIssue(self.name, node.start_mark.line + 1,
                                               format_path(path), str(exc)))
                return value
            if expanded != value:
                # Kept a string: pydantic's lax mode turns "5020" into an int where one is
                # expected, and a password such as "yes" stays a password.
                self.document.substituted.add(path)
            return expanded
        return value
