"""A connector whose import fails, as one with a missing dependency does."""

from __future__ import annotations

import fieldbridge_no_such_dependency  # noqa: F401

SPEC = None
