"""Discovery: browse, scan or sample an endpoint and write the mapping for the user.

The contract every connector's discovery follows, whatever its protocol: a request model
(the parameters, the same for the command line and the REST API), a ``DiscoveryContext``
(progress, budget, state directory) and a ``Discovery`` result (the configuration as YAML
text, a JSON listing of what was found, whether it is partial, and warnings). The helpers
here make point names valid and unique and write the YAML with comments.

A discovery that cannot start (the endpoint is unreachable, the security policy is refused)
raises ``ConnectorError``; one that fails part-way returns what it found with ``partial`` set
and the failure in ``error``.

May import: ``bridge.errors`` and ``bridge.config``.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from bridge.config.models import StrictModel

MAX_NAME = 200
"""The longest point name the configuration accepts."""

_INVALID = re.compile(r"[^A-Za-z0-9_.:-]+")
_SEPARATORS = re.compile(r"[._]{2,}")


def sanitize_name(text: str, *, fallback: str = "point") -> str:
    """``text`` as a valid point name: letters, digits and ``_ . : -``, starting with a
    letter or digit, at most ``MAX_NAME`` characters; other characters become ``_``."""
    name = _INVALID.sub("_", text.strip())
    name = _SEPARATORS.sub(lambda match: "." if "." in match.group(0) else "_", name)
    name = name.strip("._:-")
    if not name:
        name = fallback
    return name[:MAX_NAME].rstrip("._:-") or fallback


class UniqueNames:
    """Hands out names once each: a name already taken gets ``_2``, ``_3`` … appended."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken = {name.lower() for name in taken}

    def take(self, name: str) -> str:
        """``name``, or the first free ``name_N``; compared without case, as people read them."""
        candidate = name
        counter = 1
        while candidate.lower() in self._taken:
            counter += 1
            suffix = f"_{counter}"
            candidate = name[:MAX_NAME - len(suffix)] + suffix
        self._taken.add(candidate.lower())
        return candidate


def point_name(parts: Sequence[str], names: UniqueNames, *, fallback: str = "point") -> str:
    """A unique point name from path elements, each sanitized, joined with ``.``."""
    cleaned = [sanitize_name(part, fallback="_") for part in parts]
    return names.take(sanitize_name(".".join(part for part in cleaned if part != "_"),
                                    fallback=fallback))


@dataclass(frozen=True)
class DiscoveredItem:
    """One thing found, as the JSON listing shows it."""

    name: str
    """The point name in the generated configuration."""
    address: str
    """Where it lives, in the protocol's own notation."""
    type: str
    unit: str | None = None
    writable: bool = False
    description: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Protocol-specific facts (browse path, table, JMESPath, example value …)."""

    def to_dict(self) -> dict[str, Any]:
        """The listing's JSON object."""
        return {"name": self.name, "address": self.address, "type": self.type,
                "unit": self.unit, "writable": self.writable, "description": self.description,
                **self.extra}


@dataclass
class Discovery:
    """What a discovery found: the configuration and the listing."""

    protocol: str
    yaml: str
    """A complete configuration file that ``fieldbridge validate`` accepts."""
    items: list[DiscoveredItem]
    partial: bool = False
    """Some of the endpoint was not covered (an error, a time or size bound)."""
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    """Why the discovery ended early, when it did."""

    def to_dict(self) -> dict[str, Any]:
        """The REST API's response body."""
        return {"protocol": self.protocol, "yaml": self.yaml,
                "items": [item.to_dict() for item in self.items], "partial": self.partial,
                "warnings": list(self.warnings)}


class Progress:
    """Where a long discovery stands; this base reports nowhere."""

    def announce(self, note: str) -> None:
        """Something to say before the work starts (how long it will take, say)."""

    def update(self, done: int, total: int | None, note: str) -> None:
        """``done`` of ``total`` (unknown: ``None``) steps; ``note`` says what is going on."""

    def finish(self, note: str) -> None:
        """The discovery is over."""


class StreamProgress(Progress):
    """Progress on a stream: a redrawn bar on a terminal, a plain line now and then otherwise."""

    WIDTH = 30
    LINE_INTERVAL = 2.0
    """Seconds between two plain lines."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._clock = clock
        self._last = -math.inf
        self._drawn = False

    def announce(self, note: str) -> None:
        """Print a line, on a terminal too (it stays above the bar)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False
        self.stream.write(f"discover: {note}\n")
        self.stream.flush()

    def update(self, done: int, total: int | None, note: str) -> None:
        """Redraw the bar (on a terminal, at most ten times a second) or print a line."""
        now = self._clock()
        interval = 0.1 if self.tty else self.LINE_INTERVAL
        if now - self._last < interval:
            return
        self._last = now
        if self.tty:
            if total:
                filled = min(self.WIDTH, self.WIDTH * done // total)
                bar = "#" * filled + "-" * (self.WIDTH - filled)
                text = f"[{bar}] {done}/{total} {note}"
            else:
                text = f"{done} {note}"
            self.stream.write(f"\r\x1b[K{text[:120]}")
            self._drawn = True
        else:
            of = f"/{total}" if total else ""
            self.stream.write(f"discover: {done}{of} {note}\n")
        self.stream.flush()

    def finish(self, note: str) -> None:
        """Clear the bar and print the last line."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"discover: {note}\n")
        self.stream.flush()


@dataclass
class Budget:
    """How long and how large a discovery may get; past either it stops, partial."""

    max_seconds: float | None = None
    max_items: int = 100_000
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def remaining(self) -> float | None:
        """Seconds left, or ``None`` without a time bound."""
        if self.max_seconds is None:
            return None
        return max(0.0, self.max_seconds - (self.clock() - self.started))

    def expired(self) -> bool:
        """Whether the time bound has passed."""
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    def why_stopped(self, items: int) -> str | None:
        """Why the discovery must stop now, or ``None`` when it may go on."""
        if items >= self.max_items:
            return f"stopped at {self.max_items} points (the size bound)"
        if self.expired():
            return f"stopped after {self.max_seconds:g} s (the time bound)"
        return None


@dataclass
class DiscoveryContext:
    """What a discovery is given besides its request."""

    progress: Progress = field(default_factory=Progress)
    budget: Budget = field(default_factory=Budget)
    state_dir: Path | None = None
    """Where a connector keeps what it must reuse (an OPC-UA client certificate)."""
    command: str = ""
    """How the user asked for it, quoted in the generated file's header."""


class DiscoveryRequest(StrictModel):
    """Base of every protocol's discovery parameters (the CLI options, the REST body)."""


@dataclass(frozen=True)
class DiscoverySpec:
    """A connector's discovery: its parameters and how to run it."""

    request_model: type[DiscoveryRequest]
    run: Callable[[Any, DiscoveryContext], Coroutine[Any, Any, Discovery]]
    """Run a validated request (an instance of ``request_model``)."""
    target: Callable[[str], dict[str, Any]]
    """The command line's positional argument (``URL``, ``HOST[:PORT]``) as request fields."""
    target_name: str
    """How the positional argument is shown in the help (``URL``, ``HOST[:PORT]``)."""
    summary: str
    """One line for the command's help."""


# --- YAML ----------------------------------------------------------------------------------


def comment_lines(lines: Iterable[str]) -> list[str]:
    """Each line as a YAML comment (``#`` alone for an empty one)."""
    return [f"# {line}".rstrip() for text in lines for line in (text.splitlines() or [""])]


def render_yaml(document: Mapping[str, Any], *, header: Sequence[str] = (),
                footer: Sequence[str] = ()) -> str:
    """``document`` as YAML in the order given, between comment lines."""
    body = yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True, width=100,
                          default_flow_style=False)
    top = "\n".join(comment_lines(header))
    bottom = "\n".join(comment_lines(footer))
    return "".join(part + "\n" for part in (top, body.rstrip("\n"), bottom) if part)


def secret_reference(variable: str) -> str:
    """What a generated file writes for a secret: a reference, never the secret."""
    return f"${{{variable}}}"
