"""YAML loading that remembers where every key came from, with ``${...}`` substitution.

PyYAML builds the node tree; we construct plain Python data from it ourselves so that each
key path keeps its file and line, which config errors then point at.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import yaml.reader

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

MAX_SUBSTITUTED_BYTES = 16 * 1024 * 1024
"""Characters that ``${...}`` references may produce in one file, all values together: a
file's secrets and variables come nowhere near it, and a reference written many times (or
a value aliased many times) cannot make the loader build gigabytes."""


class SubstitutionBudgetError(ValueError):
    """The ``${...}`` references of a file produce more than ``MAX_SUBSTITUTED_BYTES``."""


@dataclass
class SubstitutionBudget:
    """What ``${...}`` references may still produce while one file is loaded."""

    remaining: int = MAX_SUBSTITUTED_BYTES

    def spend(self, count: int) -> None:
        """Count ``count`` characters produced; raise ``SubstitutionBudgetError`` past it."""
        self.remaining -= count
        if self.remaining < 0:
            raise SubstitutionBudgetError(
                f"${{...}} references produce more than {_size(MAX_SUBSTITUTED_BYTES)} in "
                "this file (a secret file referenced many times?)")


def substitute(text: str, base: Path, budget: SubstitutionBudget | None = None) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``${file:/path}``; ``$$`` is a literal ``$``.

    Raises ``ValueError`` naming what is missing; the caller adds the location. With a
    ``budget``, what the references produce is counted against it (the text around them is
    bounded by the file's size already).
    """

    def replace(match: re.Match[str]) -> str:
        produced = _replacement(match)
        if budget is not None:
            budget.spend(len(produced))
        return produced

    def _replacement(match: re.Match[str]) -> str:
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


MAX_DEPTH = 100
"""How deeply collections may nest in one file: real configurations nest about ten deep; a
file of a hundred thousand ``[`` must be an error with its line, not a ``RecursionError``."""


_BOOL = "tag:yaml.org,2002:bool"
_YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
"""The booleans of YAML 1.2. PyYAML follows YAML 1.1, where ``on``, ``off``, ``yes``, ``no``,
``y`` and ``n`` are booleans too: ``enum: {0: off, 1: on}`` would map to ``False``/``True``
and ``on:`` as a key would be ``True``. Here they are the words they look like; a boolean
setting still takes them (the models read ``yes`` or ``on`` as true)."""


class _DepthLimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans, whose recursive composer refuses to nest
    past ``MAX_DEPTH``."""

    yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Compose one node, counting how deep it sits."""
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _ExpansionError(self.get_mark().line + 1,
                                      f"collections nest more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_DepthLimitedLoader.add_implicit_resolver(_BOOL, _YAML12_BOOL, list("tTfF"))


def load_yaml(path: Path, issues: list[ConfigIssue]) -> Document:
    """Parse one YAML file; problems are appended to ``issues`` with their line.

    Whatever the file holds, the outcome is data or issues: the reader, the parser and the
    builder's own limits (depth, values, substituted characters) all end as an issue.
    """
    document = Document(data=None)
    name = str(path)
    try:
        text = read_bounded(path, MAX_FILE_BYTES)
    except FileReadError as exc:
        issues.append(ConfigIssue(name, None, "", f"cannot read file: {exc}"))
        return document
    loader: _DepthLimitedLoader | None = None
    try:
        # The reader checks every character when it is made: a NUL (/proc/self/environ)
        # is refused here.
        loader = _DepthLimitedLoader(text)
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
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        issues.append(ConfigIssue(name, line, "", f"not a YAML text file: character "
                                  f"#x{exc.character:04x} ({exc.reason}) at position "
                                  f"{exc.position:,}" if isinstance(exc.character, int) else
                                  f"not a YAML text file: {exc.reason}"))
    except yaml.YAMLError as exc:
        issues.append(ConfigIssue(name, None, "", f"invalid YAML: {_short(str(exc))}"))
    except RecursionError:
        # Past the depth limit's reach (a deep key inside a flow mapping, say).
        issues.append(ConfigIssue(name, None, "", "the file nests too deeply to be read"))
    except MemoryError:
        issues.append(ConfigIssue(name, None, "", "the file needs more memory than this "
                                  "machine has to be read"))
    finally:
        if loader is not None:
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
        self.budget = SubstitutionBudget()
        self.refused: set[int] = set()
        """Scalar nodes already reported as unreadable (once, however often aliased)."""
        self.scalars: dict[int, Any] = {}
        """The value of each scalar node by identity: an alias shares its anchor's value
        (substituted once) instead of building a copy."""

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
                key = self._construct(key_node, path)
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

    def _construct(self, node: yaml.Node, path: KeyPath) -> Any:
        """PyYAML's value of a scalar node; a value it cannot make (an integer of more
        than 4,300 digits) or a number that is not finite is an issue at its line."""
        line = node.start_mark.line + 1
        try:
            value = self.loader.construct_object(node, deep=True)
        except (ValueError, OverflowError) as exc:
            if id(node) in self.refused:
                return None
            self.refused.add(id(node))
            self.issues.append(ConfigIssue(self.name, line, format_path(path),
                                           "not a valid value: "
                                           f"{_short(str(exc).split(';')[0])}"))
            return None
        if isinstance(value, float) and not math.isfinite(value):
            if id(node) in self.refused:
                return None
            self.refused.add(id(node))
            self.issues.append(ConfigIssue(self.name, line, format_path(path),
                                           f"a number must be finite (got {value})"))
            return None
        return value

    def _scalar(self, node: yaml.Node, path: KeyPath) -> Any:
        known = self.scalars.get(id(node), _UNBUILT)
        if known is not _UNBUILT:
            if isinstance(known, _Substituted):
                self.document.substituted.add(path)
                return known.value
            return known
        value = self._construct(node, path)
        result: Any = value
        if isinstance(value, str) and "$" in value:
            try:
                expanded = substitute(value, self.base, self.budget)
            except SubstitutionBudgetError as exc:
                raise _ExpansionError(node.start_mark.line + 1, str(exc)) from None
            except ValueError as exc:
                self.issues.append(ConfigIssue(self.name, node.start_mark.line + 1,
                                               format_path(path), str(exc)))
                self.scalars[id(node)] = value  # reported once, not once per alias
                return value
            if expanded != value:
                # Kept a string: pydantic's lax mode turns "5020" into an int where one is
                # expected, and a password such as "yes" stays a password.
                self.document.substituted.add(path)
                self.scalars[id(node)] = _Substituted(expanded)
                return expanded
        self.scalars[id(node)] = result
        return result


_UNBUILT: Any = object()
"""Marks a scalar node not built yet."""


@dataclass(frozen=True, slots=True)
class _Substituted:
    """A scalar's value that came from ``${...}``: each path it is used at is secret."""

    value: str
