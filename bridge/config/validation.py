"""Helpers for config models' own validators."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

NOT_GIVEN: Any = object()
"""Marks an error about a key that was not written (so there is no value to echo)."""


def field_error(field: str | tuple[str | int, ...], message: str,
                value: Any = NOT_GIVEN) -> ValidationError:
    """A validation error located at ``field`` (a key, or a path such as ``("urls", 1)``) of
    the model being validated.

    Raised from a model validator, pydantic prefixes the model's own location, so the config
    error names the exact key instead of the whole block.
    """
    # An empty mapping as the input keeps the loader from echoing "(got ...)".
    details = InitErrorDetails(type=PydanticCustomError("config", message),
                               loc=(field,) if isinstance(field, str) else field,
                               input={} if value is NOT_GIVEN else value)
    return ValidationError.from_exception_data("config", [details])
