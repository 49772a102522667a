"""The built-in protocol connectors: one sub-package each, registered as entry points.

Each of ``modbus``, ``opcua``, ``mqtt`` and ``amqp`` exposes a ``SPEC``
(``bridge.registry.ProtocolSpec``) that ``pyproject.toml`` registers under the entry point
group ``fieldbridge.protocols``, exactly as a third-party connector does. The core never
imports this package, and no connector imports another.
"""
