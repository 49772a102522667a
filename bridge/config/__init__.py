"""Configuration: the models, YAML loading with file and line, substitution, the reference.

``models`` declares every section once (pydantic, ``extra="forbid"``), with its description
and default; ``loader`` reads a file (``yamlsource`` keeps the file and line of every key and
does the ``${...}`` substitution), merges includes, validates with the whole-file model built
from the protocol registry, and resolves profiles and devices into points; ``reference``
renders the configuration reference from the models.

May import: ``bridge.errors`` and, from the loader and the reference only, ``bridge.registry``.
The models never import the loader.
"""
