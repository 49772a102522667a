"""Templates and addresses: ``{placeholder}`` strings, topic filters and routing-key patterns.

A ``Template`` is a string with ``{name}`` placeholders, parsed once and filled per message (a
message point's name and tags, a sink's topic). An ``AddressPattern`` is a topic filter or
routing-key pattern whose levels may be named (``sensors/{site}/+/#``): it yields the broker
subscription and matches an address to the values of its named levels. ``AddressSyntax``
says how a protocol spells levels and wildcards (``MQTT_TOPIC``, ``AMQP_ROUTING_KEY``).

May import: the standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

POINT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
"""What an expanded point id must look like (the config's ``Identifier``)."""
POINT_ID_MAX = 200

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[^{}\s]+)?$")
_SEGMENT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAME_TEMPLATE = r"^(?:[A-Za-z0-9_.:-]|\{[A-Za-z_][^{}\s]*\})+$"
"""What a templated point name must look like: id characters and ``{placeholders}``."""


# --- templates --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """A string with ``{name}`` placeholders, parsed once."""

    text: str
    literals: tuple[str, ...]
    """The text around the placeholders; one more than ``names``."""
    names: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        """Parse ``text``; ``ValueError`` for an unbalanced brace or a bad placeholder name."""
        literals: list[str] = []
        names: list[str] = []
        position = 0
        for match in _PLACEHOLDER.finditer(text):
            literals.append(text[position:match.start()])
            name = match.group(1)
            if not _VARIABLE.match(name):
                raise ValueError(f"'{{{name}}}' is not a valid placeholder; expected a name such "
                                 "as {device}, {item.id} or {headers.site}")
            names.append(name)
            position = match.end()
        literals.append(text[position:])
        if any("{" in literal or "}" in literal for literal in literals):
            raise ValueError(f"unbalanced brace in {text!r}")
        return cls(text, tuple(literals), tuple(names))

    @property
    def is_static(self) -> bool:
        """Whether the template has no placeholders."""
        return not self.names

    def expand(self, variables: Mapping[str, str]) -> str:
        """The text with every placeholder filled; ``KeyError`` names a missing variable."""
        if not self.names:
            return self.text
        parts = [self.literals[0]]
        for name, literal in zip(self.names, self.literals[1:], strict=True):
            parts.append(variables[name])
            parts.append(literal)
        return "".join(parts)


# --- topic filters and routing-key patterns ---------------------------------------------------


@dataclass(frozen=True)
class AddressSyntax:
    """How a protocol spells hierarchical addresses and their wildcards."""

    separator: str
    single: str
    """Wildcard for exactly one level (MQTT ``+``, AMQP ``*``)."""
    multi: str
    """Wildcard for any number of levels (``#``)."""
    multi_last_only: bool
    """MQTT allows ``#`` only as the last level."""
    single_matches_empty: bool
    """MQTT ``+`` matches an empty level; AMQP ``*`` needs a word."""


MQTT_TOPIC = AddressSyntax("/", "+", "#", multi_last_only=True, single_matches_empty=True)
AMQP_ROUTING_KEY = AddressSyntax(".", "*", "#", multi_last_only=False, single_matches_empty=False)


@dataclass(frozen=True)
class AddressPattern:
    """A topic filter or routing-key pattern whose levels may be named: ``a/{site}/+/#``."""

    text: str
    subscription: str
    """The pattern with named levels replaced by the single-level wildcard."""
    names: tuple[str, ...]
    regex: re.Pattern[str] = field(repr=False)

    @classmethod
    def parse(cls, text: str, syntax: AddressSyntax) -> AddressPattern:
        """Compile ``text``; ``ValueError`` says what is wrong with it."""
        if not text:
            raise ValueError("an empty pattern matches nothing")
        levels = text.split(syntax.separator)
        names: list[str] = []
        subscription: list[str] = []
        pieces: list[str] = []
        separator = re.escape(syntax.separator)
        word = f"[^{separator}]" + ("*" if syntax.single_matches_empty else "+")
        skip_separator = False
        for index, level in enumerate(levels):
            first = index == 0
            lead = "" if first or skip_separator else separator
            skip_separator = False
            if level == syntax.multi:
                if syntax.multi_last_only and index != len(levels) - 1:
                    raise ValueError(f"'{syntax.multi}' must be the last level of {text!r}")
                if index > 0 and levels[index - 1] == syntax.multi:
                    continue
                subscription.append(level)
                if len(levels) == 1:
                    pieces.append(".*")
                elif first:
                    pieces.append(f"(?:.*{separator})?")
                    skip_separator = True
                else:
                    pieces.append(f"(?:{separator}.*)?")
                continue
            if level.startswith("{") and level.endswith("}"):
                name = level[1:-1]
                if not _SEGMENT_NAME.match(name):
                    raise ValueError(f"'{level}' in {text!r}: a level name is letters, digits "
                                     "and _, not starting with a digit")
                if name in names:
                    raise ValueError(f"level name '{name}' is used twice in {text!r}")
                names.append(name)
                subscription.append(syntax.single)
                pieces.append(f"{lead}(?P<{name}>{word})")
                continue
            if "{" in level or "}" in level:
                raise ValueError(f"'{level}' in {text!r}: a placeholder must fill a whole level")
            if syntax.multi in level or syntax.single in level:
                if level != syntax.single:
                    raise ValueError(f"'{level}' in {text!r}: a wildcard must fill a whole level")
                subscription.append(level)
                pieces.append(f"{lead}{word}")
                continue
            subscription.append(level)
            pieces.append(lead + re.escape(level))
        return cls(
            text=text,
            subscription=syntax.separator.join(subscription),
            names=tuple(names),
            regex=re.compile("".join(pieces)),
        )

    def match(self, address: str) -> dict[str, str] | None:
        """The named levels of ``address``, or ``None`` when it does not match."""
        found = self.regex.fullmatch(address)
        if found is None:
            return None
        return found.groupdict()

