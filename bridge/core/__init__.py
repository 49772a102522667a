"""The core of the flow: Reading in, Event out, and what turns one into the other.

``model`` declares the normalized event once (its JSON Schema, the API's models, the store's
rows and the worker frames derive from it); ``codec`` decodes and encodes register values;
``mapping`` holds the compiled per-point programs (scale, deadband, report-by-exception);
``counters`` declares every status counter once; ``status`` is the state and counters of
one endpoint; ``source`` and ``sink`` are the connector contracts, ``batching`` hands a
message source's readings on in batches.
For the message protocols: ``templates`` parses ``{placeholder}`` strings and topic or
routing-key patterns, ``message_points`` declares the point models, ``message_values``
converts payload values and timestamps, ``message_mapper`` turns payloads into events.

May import: ``bridge.errors`` and ``bridge.config``. Never a protocol, the pipeline or the API.
"""
